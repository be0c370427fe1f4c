"""Registry options of an ExLlamaV2 model, validated once when the worker loads it.

The per-sequence limit is the entry's ``num_ctx`` (one knob for every backend); the cache is
the *total* token budget shared by all running jobs, so it caps concurrency: each job
reserves pages for prompt + max_tokens when it starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

PAGE = 256  # ExLlamaV2's page size: cache and chunk sizes are multiples of it.
# ExLlamaV2DynamicGenerator's default max_q_size: tokens evaluated per sequence per step.
MAX_Q_SIZE = 8

CacheType = Literal["FP16", "Q8", "Q6", "Q4"]


def round_up(n: int, to: int = PAGE) -> int:
    return -(-n // to) * to


class DraftOptions(BaseModel):
    """A small model of the same family for speculative decoding."""

    model_config = ConfigDict(extra="forbid")

    weights: str
    cache_type: CacheType = "FP16"
    num_draft_tokens: int = Field(default=4, ge=1, le=MAX_Q_SIZE)


class ExLlamaV2Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Total tokens in the KV cache, shared by all jobs; None: one full context (num_ctx).
    cache_size: int | None = Field(default=None, ge=PAGE)
    # Q4 holds ~3.5x the tokens of FP16 in the same memory at a small quality cost.
    cache_type: CacheType = "FP16"
    # Sequences decoded together; the worker runs this many Celery threads (plus slack).
    max_batch_size: int = Field(default=16, ge=1)
    # Prompt tokens prefilled per step: larger is faster for long prompts but stalls the
    # other streams for longer.
    max_chunk_size: int = Field(default=2048, ge=PAGE)
    # GB of weights per GPU, or "auto" to fill the visible GPUs in turn.
    gpu_split: list[float] | Literal["auto"] = "auto"
    draft: DraftOptions | None = None
    # A chat template by name (an entry of tokenizer_config.json's list) or file path; None:
    # the model's own (chat_template.jinja, chat_template.json, tokenizer_config.json).
    chat_template: str | None = None
    # max_tokens for requests that give none. None: the rest of the context, as OpenAI does;
    # but every such request then reserves a whole context of cache pages.
    default_max_tokens: int | None = Field(default=None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _no_second_context_knob(cls, data):
        if isinstance(data, dict) and "max_seq_len" in data:
            raise ValueError("max_seq_len is the registry entry's num_ctx; set that instead")
        return data

    @model_validator(mode="after")
    def _pages(self) -> "ExLlamaV2Options":
        for name in ("cache_size", "max_chunk_size"):
            value = getattr(self, name)
            if value is not None and value % PAGE:
                raise ValueError(f"{name} must be a multiple of {PAGE}, not {value}")
        return self

    def limits(self, num_ctx: int) -> "Limits":
        """The sizes the engine is built with, checked against each other and the context."""
        draft = self.draft.num_draft_tokens if self.draft else 0
        # load_autosplit clamps max_input_len to max_seq_len; the chunk stays within both.
        chunk = min(self.max_chunk_size, num_ctx // PAGE * PAGE)
        if chunk < PAGE:
            raise ValueError(f"num_ctx must be at least {PAGE} for exllamav2, not {num_ctx}")
        # The generator asserts max_batch_size * max_q_size <= cfg.max_batch_size (1) *
        # cfg.max_input_len, and max_input_len is the chunk size.
        if self.max_batch_size * MAX_Q_SIZE > chunk:
            raise ValueError(f"max_batch_size {self.max_batch_size} needs a chunk of at least "
                             f"{self.max_batch_size * MAX_Q_SIZE} tokens; the chunk is {chunk}")
        need = round_up(num_ctx + draft)
        cache = self.cache_size if self.cache_size is not None else need
        if cache < need:
            raise ValueError(f"cache_size {cache} cannot hold one full context of num_ctx "
                             f"{num_ctx} tokens; use at least {need}")
        return Limits(max_seq_len=num_ctx, cache_tokens=cache, chunk=chunk,
                      max_batch_size=self.max_batch_size, num_draft_tokens=draft)

    def worker_threads(self) -> int:
        # A little slack beyond the batch: waiting jobs sit queued in the generator, so a
        # slot that frees up is refilled without a round trip to the broker.
        return self.max_batch_size + 2


@dataclass(frozen=True)
class Limits:
    max_seq_len: int       # per sequence: prompt + completion (the entry's num_ctx)
    cache_tokens: int      # the whole cache, shared by all jobs
    chunk: int             # prefill chunk, also cfg.max_input_len
    max_batch_size: int
    num_draft_tokens: int  # 0 without a draft model

    def pages(self, tokens: int) -> int:
        return -(-tokens // PAGE)
