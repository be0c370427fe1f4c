"""POST /v1/completions."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from web.schemas.common import GenerationFields

TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CreateCompletionRequest(GenerationFields):
    prompt: str | list[str] | TokenIds | list[TokenIds]
    # OpenAI's default for the legacy endpoint.
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    echo: bool = False

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a batch of prompts is a list of strings or of token lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]
        return list(p)
