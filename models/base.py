"""The backend interfaces. A model is either generative (``Backend``: CPU and GPU backends
are siblings implementing ``generate``) or an embedding model (``EmbeddingBackend``)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import ClassVar, Literal

import numpy as np

from config.errors import ContextLengthExceeded, InvalidRequest
from config.settings import ModelEntry
from models.events import Event
from models.job import GenerationJob

Cancelled = Callable[[], bool]


class BaseBackend(ABC):
    """A loaded model. One instance per worker process, created once at worker start.

    ``worker_pool`` and ``worker_concurrency`` tell ``tasks/worker.py`` how to run jobs: an
    engine that runs one job at a time wants the solo pool; one that batches concurrent
    requests needs them to arrive concurrently, so it wants threads. They are class
    attributes so the worker can choose before it loads the model.
    """

    worker_pool: ClassVar[Literal["solo", "threads"]] = "solo"
    worker_concurrency: ClassVar[int] = 1

    def __init__(self, entry: ModelEntry):
        self.entry = entry

    def close(self) -> None:
        """Release the model's memory."""


class Backend(BaseBackend):
    """A generative model.

    ``generate`` yields events in the order documented in ``models.events``. It checks
    ``cancelled()`` between decode steps and, once it returns True, stops within one step,
    finishing open choices with ``finish_reason="cancelled"``. Errors caused by the request
    are raised as ``config.errors.FerryError`` subclasses before ``Started`` where possible.
    """

    supports_logprobs: ClassVar[bool] = False
    supports_vision: ClassVar[bool] = False

    @abstractmethod
    def generate(self, job: GenerationJob, cancelled: Cancelled) -> Iterator[Event]: ...


class EmbeddingBackend(BaseBackend):
    """An embedding model, in two steps so that concurrent requests share forward passes:
    ``tokenize`` runs per request and rejects bad input (so a bad request fails alone),
    ``embed`` runs over the token lists of many requests at once (``models/batcher.py``).

    Subclasses set ``dimensions`` (vector size), ``max_tokens`` (longest input, special
    tokens included), ``vocab_size``, ``batch_size`` (inputs per forward pass),
    ``max_bulk_inputs`` (inputs gathered for one call when only bulk work waits) and
    ``max_wait`` (seconds a request may wait for others to share its pass).
    """

    worker_pool = "threads"
    # Requests in flight per worker: enough for the next bulk gather to fill while one runs.
    worker_concurrency = 256

    dimensions: int
    max_tokens: int
    vocab_size: int
    batch_size: int
    max_bulk_inputs: int
    max_wait: float

    @abstractmethod
    def _tokenize_texts(self, texts: list[str]) -> list[list[int]]:
        """Token ids as the model reads them, special tokens included, not truncated."""

    @abstractmethod
    def embed(self, token_lists: Sequence[list[int]]) -> np.ndarray:
        """One float32 row of ``dimensions`` per token list, in order."""

    def tokenize(self, inputs: Sequence[str | list[int]]) -> list[list[int]]:
        """Each input as token ids. Token-id inputs are the model's own vocabulary ids, read
        as given (no special tokens added). Too long an input is a 400, never truncated."""
        texts = [x for x in inputs if isinstance(x, str)]
        tokenized = iter(self._tokenize_texts(texts) if texts else [])
        out = [next(tokenized) if isinstance(x, str) else list(x) for x in inputs]
        for i, ids in enumerate(out):
            self._check(i, ids, len(inputs))
        return out

    def _check(self, i: int, ids: list[int], n: int) -> None:
        param = f"input[{i}]" if n > 1 else "input"
        if not ids:
            raise InvalidRequest("An input must not be empty.", param=param)
        if len(ids) > self.max_tokens:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.max_tokens} tokens, however you "
                f"requested {len(ids)} tokens in {param}. Please reduce your input.",
                param=param)
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"Token id {bad} in {param} is not in this model's vocabulary "
                                 f"(0 to {self.vocab_size - 1}).", param=param)
