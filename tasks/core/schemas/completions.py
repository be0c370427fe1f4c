"""POST /v1/completions."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator

from config.errors import InvalidRequest
from tasks.core.schemas.common import GenerationFields

TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
# Prompts one request may list, whatever max_prompts (a setting, checked after validation)
# says: a longer list is refused before pydantic validates its items, each against every
# member of the union (1.7 s for a million one-letter prompts).
MAX_PROMPT_LIST = 2048


class CreateCompletionRequest(GenerationFields):
    prompt: str | Annotated[list[str], Field(min_length=1)] | TokenIds | \
        Annotated[list[TokenIds], Field(min_length=1)]
    # OpenAI's default for the legacy endpoint.
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    echo: bool = False
    # The legacy shape: log probabilities of the chosen and this many most likely tokens.
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    # Candidates generated per prompt, of which the n with the highest mean token log
    # probability are returned.
    best_of: Annotated[int, Field(ge=1, le=20)] | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _count_first(cls, value):
        if isinstance(value, list) and len(value) > MAX_PROMPT_LIST and \
                not isinstance(value[0], int):
            raise ValueError(f"{len(value)} prompts; at most {MAX_PROMPT_LIST} are accepted "
                             "in one request")
        return value

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a batch of prompts is a list of strings or of token lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]
        return list(p)

    @property
    def candidates(self) -> int:
        """Choices generated per prompt."""
        return max(self.best_of or self.n, self.n)

    def check(self) -> None:
        if self.best_of is not None and self.best_of < self.n:
            raise InvalidRequest("best_of must be at least n.", param="best_of")
        if self.stream and self.candidates > self.n:
            raise InvalidRequest("best_of greater than n cannot be streamed: the best are "
                                 "known only at the end.", param="best_of")
        if self.suffix is not None and self.echo:
            raise InvalidRequest("echo cannot be combined with suffix.", param="echo")
