"""The backend interface. CPU and GPU backends are siblings implementing ``generate``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import ClassVar

from config.settings import ModelEntry
from models.events import Event
from models.job import GenerationJob

Cancelled = Callable[[], bool]


class Backend(ABC):
    """A loaded model. One instance per worker process, created once at worker start.

    ``generate`` yields events in the order documented in ``models.events``. It checks
    ``cancelled()`` between decode steps and, once it returns True, stops within one step,
    finishing open choices with ``finish_reason="cancelled"``. Errors caused by the request
    are raised as ``config.errors.FerryError`` subclasses before ``Started`` where possible.
    """

    supports_logprobs: ClassVar[bool] = False
    supports_vision: ClassVar[bool] = False

    @classmethod
    def worker_pool(cls, entry: ModelEntry) -> tuple[str, int]:
        """The Celery pool and concurrency of a worker serving ``entry``: ("solo", 1) runs one
        job at a time in the main thread (llama.cpp); ("threads", n) lets n task threads
        feed one engine that batches them (ExLlamaV2). Decided before the model loads."""
        return "solo", 1

    def __init__(self, entry: ModelEntry):
        self.entry = entry

    @abstractmethod
    def generate(self, job: GenerationJob, cancelled: Cancelled) -> Iterator[Event]: ...

    def close(self) -> None:
        """Release the model's memory."""
