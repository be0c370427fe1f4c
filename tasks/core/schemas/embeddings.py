"""POST /v1/embeddings."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# OpenAI's limit on inputs per request.
MAX_INPUTS = 2048

Text = Annotated[str, Field(min_length=1)]
# Token ids in the model's own vocabulary; strict, so "12" or true are not read as ids.
TokenIds = Annotated[list[Annotated[int, Field(ge=0, strict=True)]], Field(min_length=1)]


class CreateEmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    input: (Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_INPUTS)]
            | TokenIds | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_INPUTS)])
    encoding_format: Literal["float", "base64"] = "float"

    @field_validator("input", mode="before")
    @classmethod
    def _count_first(cls, value):
        # Before the items: pydantic tries every member of the union on every item, and took
        # 7 s (holding the web's event loop) to find 4M one-letter inputs too many.
        if isinstance(value, list) and len(value) > MAX_INPUTS and not isinstance(value[0], int):
            raise ValueError(f"{len(value)} inputs; at most {MAX_INPUTS} are accepted")
        return value
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: str | None = None

    def inputs(self) -> list[str | list[int]]:
        """One entry per vector: a text or a token-id list."""
        x = self.input
        if isinstance(x, str) or isinstance(x[0], int):
            return [x]
        return list(x)
