"""The backend interface. CPU and GPU backends are siblings implementing ``generate``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import ClassVar

from config.errors import Unsupported
from config.settings import ModelEntry
from models.events import Event
from models.job import GenerationJob

Cancelled = Callable[[], bool]


class Backend(ABC):
    """A loaded model. One instance per worker process, created once at worker start.

    The worker calls ``check(job)`` and then ``generate(job, cancelled)``. ``generate`` yields
    events in the order documented in ``models.events``. It checks ``cancelled()`` between
    decode steps and, once it returns True, stops within one step, finishing open choices
    with ``finish_reason="cancelled"``. Errors caused by the request are raised as
    ``config.errors.FerryError`` subclasses before ``Started`` where possible (so that they
    reach a streaming client as an HTTP status, not as an error event).

    Capability flags say what a backend can do with a job; ``check`` turns every ask a
    backend cannot serve into a 400 naming the parameter, so no field is silently ignored.
    """

    # Per-token log probabilities (``job.top_logprobs``), also of an echoed prompt.
    supports_logprobs: ClassVar[bool] = False
    # ``image_url`` content parts.
    supports_vision: ClassVar[bool] = False
    # Grammar-constrained output: ``response_format`` json_object / json_schema and tool calls.
    supports_constraints: ClassVar[bool] = False
    # ``sampling.logit_bias``.
    supports_logit_bias: ClassVar[bool] = False
    # ``job.echo``: each choice opens with the prompt (a ``Delta`` with ``prompt=True``).
    supports_echo: ClassVar[bool] = False
    # Fill-in-the-middle (``job.suffix``). Depends on the model's vocabulary, so a backend
    # may set it per instance once the model is loaded.
    supports_fim: bool = False

    @classmethod
    def worker_pool(cls, entry: ModelEntry) -> tuple[str, int]:
        """The Celery pool and concurrency of a worker serving ``entry``: ("solo", 1) runs one
        job at a time in the main thread; ("threads", n) lets n task threads feed one engine
        that batches them (llama.cpp, ExLlamaV2). Decided before the model loads."""
        return "solo", 1

    def __init__(self, entry: ModelEntry):
        self.entry = entry

    def check(self, job: GenerationJob) -> None:
        """Raise ``Unsupported`` (400, with ``param``) for anything this backend cannot do."""
        name = job.model
        if job.top_logprobs is not None and not self.supports_logprobs:
            raise Unsupported(f"The model '{name}' does not report log probabilities.",
                              param="logprobs")
        if job.sampling.logit_bias and not self.supports_logit_bias:
            raise Unsupported(f"The model '{name}' does not support logit_bias.",
                              param="logit_bias")
        if not self.supports_constraints:
            if job.response_format is not None:
                raise Unsupported(f"The model '{name}' cannot constrain its output to JSON.",
                                  param="response_format")
            if job.calls_tools:
                raise Unsupported(f"The model '{name}' cannot call tools.", param="tools")
        if job.echo and not self.supports_echo:
            raise Unsupported(f"The model '{name}' cannot echo its prompt.", param="echo")
        if job.suffix is not None and not self.supports_fim:
            raise Unsupported(f"The model '{name}' has no fill-in-the-middle tokens; "
                              "suffix is not supported for it.", param="suffix")
        if not self.supports_vision:
            for i, m in enumerate(job.messages or ()):
                if isinstance(m.get("content"), list) and any(
                        p.get("type") == "image_url" for p in m["content"]):
                    raise Unsupported(f"The model '{name}' has no image input; send text only.",
                                      param=f"messages[{i}].content")

    @abstractmethod
    def generate(self, job: GenerationJob, cancelled: Cancelled) -> Iterator[Event]: ...

    def close(self) -> None:
        """Release the model's memory."""
