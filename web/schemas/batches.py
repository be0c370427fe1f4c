"""POST /v1/batches and GET /v1/batches."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

MetadataKey = Annotated[str, StringConstraints(max_length=64)]
MetadataValue = Annotated[str, StringConstraints(max_length=512)]


class CreateBatchRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input_file_id: str
    endpoint: Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                      "/v1/responses", "/v1/messages"]
    completion_window: Literal["24h"]
    metadata: Annotated[dict[MetadataKey, MetadataValue], Field(max_length=16)] | None = None
    # Known to OpenAI, not supported by Ferry: a value is a 400, never ignored.
    output_expires_after: Any = None

    @field_validator("output_expires_after")
    @classmethod
    def _unsupported(cls, value: Any) -> None:
        if value is not None:
            raise ValueError("Ferry does not expire batch output files; omit it")
        return None


class ListBatchesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    after: str | None = None
    limit: Annotated[int, Field(ge=1, le=100)] = 20

    def page(self, data: list[Any], has_more: bool) -> dict[str, Any]:
        return {"object": "list", "data": data,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": has_more}
