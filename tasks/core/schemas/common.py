"""Fields shared by the chat and completions requests, with OpenAI's ranges.

Unknown fields are ignored (OpenAI clients send fields a server may not know); fields that
are known but not supported by Ferry yet are rejected with a 400 naming them, never ignored.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

from config.contract.job import Sampling


class StreamOptions(BaseModel):
    include_usage: bool = False


Bias = Annotated[float, Field(ge=-100, le=100)]


class GenerationFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] = 1
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    # Token ids (as JSON object keys, so strings) to a bias in -100..100.
    logit_bias: Annotated[dict[str, Bias], Field(max_length=1024)] | None = None
    # Accepted and logged with the request id, as an end-user identifier for abuse tracing.
    user: str | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key in bias or {}:
            # ASCII digits only: "²" passes isdigit() and then fails int().
            if not (key.isascii() and key.isdigit()):
                raise ValueError(f"logit_bias keys are token ids; {key!r} is not one")
        return bias

    @property
    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else self.stop

    def sampling(self) -> Sampling:
        return Sampling(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed,
            frequency_penalty=self.frequency_penalty or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)
