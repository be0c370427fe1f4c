"""What a backend is asked to do: one generation or embedding job, independent of HTTP and
Celery."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Sampling(BaseModel):
    model_config = ConfigDict(frozen=True)

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] = {}


class GenerationJob(BaseModel):
    """Exactly one of ``messages`` (chat: rendered with the model's template) or ``prompt``."""

    model_config = ConfigDict(frozen=True)

    id: str
    model: str
    messages: list[dict[str, Any]] | None = None
    prompt: str | list[int] | None = None
    # None: as many as fit in the context.
    max_tokens: int | None = None
    stop: list[str] = []
    n: int = Field(default=1, ge=1)
    sampling: Sampling = Sampling()
    # Top alternatives per token when log probabilities are asked for, else None.
    top_logprobs: int | None = None
    # Unix time after which nobody waits for this job any more.
    deadline: float | None = None


class EmbeddingJob(BaseModel):
    """Vectors for ``input``: texts, or token-id lists in the model's own vocabulary."""

    model_config = ConfigDict(frozen=True)

    id: str
    model: str
    input: list[str | list[int]] = Field(min_length=1)
    # Shorten the vectors to this many components (re-normalised); None: the model's size.
    dimensions: int | None = None
    deadline: float | None = None
    # Bulk work (the Batch API): it waits behind interactive requests in the worker.
    bulk: bool = False
