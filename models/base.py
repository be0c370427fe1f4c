"""The backend interfaces. A model is either generative (``Backend``: CPU and GPU backends
are siblings implementing ``generate``) or an embedding model (``EmbeddingBackend``)."""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from config.errors import ContextLengthExceeded, InvalidRequest, Unsupported
from config.settings import ModelEntry
from config.contract.events import Event
from config.contract.job import GenerationJob

Cancelled = Callable[[], bool]


class CancelFlag:
    """A job's cancel: called, whether it is cancelled; ``set`` once by whoever cancels it.
    A task thread that waits for its loop's events registers ``on_set`` to be woken when the
    job is cancelled (``models.output.follow_choices``) instead of waking every so often to
    look: 32 or 64 task threads looking 10-20 times a second cost a GPU worker about a wake
    per token at 20 tokens/s per stream. ``on_set``'s hooks run on the cancelling thread and
    must not block. ``cancelled`` is the same as a call, for a per-token check to read
    without one."""

    __slots__ = ("cancelled", "_hooks", "_lock")

    def __init__(self):
        self.cancelled = False
        self._hooks: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def __call__(self) -> bool:
        return self.cancelled

    def set(self) -> None:
        with self._lock:
            if self.cancelled:
                return
            self.cancelled = True
            hooks, self._hooks = self._hooks, []
        for hook in hooks:
            hook()

    def on_set(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` once the job is cancelled (now, if it is)."""
        with self._lock:
            if not self.cancelled:
                self._hooks.append(hook)
                return
        hook()
# Content part types that hold an image: as OpenAI sends it, and as the web passes it on.
IMAGE_PARTS = ("image_url", "image")


def context_exceeded(job: GenerationJob, n_ctx: int, n_prompt: int,
                     wanted: int) -> ContextLengthExceeded:
    """The 400 for a prompt and completion that do not fit, worded as OpenAI words it.
    ``wanted`` 0 of a job without a fixed max_tokens: it was to take the rest of the
    context, and none is left."""
    field = "messages" if job.messages is not None else "prompt"
    if wanted == 0 and (job.max_tokens is None or job.fit_max_tokens):
        return ContextLengthExceeded(
            f"This model's maximum context length is {n_ctx} tokens. However, your {field} "
            f"resulted in {n_prompt} tokens, which leaves no room for a completion. Please "
            f"reduce the length of the {field}.", param=field)
    return ContextLengthExceeded(
        f"This model's maximum context length is {n_ctx} tokens. However, you requested "
        f"{n_prompt + wanted} tokens ({n_prompt} in the {field}, {wanted} in the completion). "
        "Please reduce the length of the prompt or completion.", param=field)


def completion_budget(entry: ModelEntry, job: GenerationJob, room: int) -> int:
    """max_tokens for a choice of ``job``: the job's own, or, when it gives none, the rest of
    the context (``room``) but no more than the model's per-job token budget shared among
    the job's choices; with ``fit_max_tokens``, the smaller of the two. An explicit ask
    beyond the budget is the web's 400; a job that got past it (submitted by an older web)
    is refused here the same way."""
    budget = entry.max_job_tokens
    fits = min(room, max(1, budget // job.n))
    if job.max_tokens is None:
        return fits
    if job.fit_max_tokens:
        return min(job.max_tokens, fits)
    if job.n * job.max_tokens > budget:
        raise InvalidRequest(f"n x max_tokens is {job.n * job.max_tokens} tokens; the model "
                             f"'{entry.name}' generates at most {budget} tokens per request "
                             "(max_job_tokens).", param="max_tokens")
    return job.max_tokens


class BaseBackend(ABC):
    """A loaded model. One instance per worker process, created once at worker start.

    ``worker_pool(entry)`` tells ``tasks/worker.py`` how to run jobs, before the model loads:
    an engine that runs one job at a time wants the solo pool; one that batches concurrent
    requests needs them to arrive concurrently, so it wants threads.
    """

    def __init__(self, entry: ModelEntry):
        self.entry = entry

    @classmethod
    def worker_pool(cls, entry: ModelEntry) -> tuple[str, int]:
        """The Celery pool and concurrency of a worker serving ``entry``: ("solo", 1) runs one
        job at a time in the main thread; ("threads", n) lets n task threads feed one engine
        that batches them. Decided before the model loads."""
        return "solo", 1

    def close(self) -> None:
        """Release the model's memory."""


class Backend(BaseBackend):
    """A generative model.

    The worker calls ``check(job)`` and then ``generate(job, cancelled)``. ``generate`` yields
    events in the order documented in ``config.contract.events``. A backend whose own thread
    makes every job's tokens (``supports_direct``) also takes ``direct``: a callable it hands
    each ``Delta`` and ``ToolCallDelta`` to, on that thread, as it makes them, instead of
    yielding them (``models.output.Outbox``); the rest it still yields, after the deltas it
    handed over before them. It checks ``cancelled()`` between decode steps and, once it
    returns True, stops within one step, finishing open choices
    with ``finish_reason="cancelled"``. Errors caused by the request are raised as
    ``config.errors.FerryError`` subclasses before ``Started`` where possible (so that they
    reach a streaming client as an HTTP status, not as an error event).

    Capability flags say what a backend can do with a job; ``check`` turns every ask a
    backend cannot serve into a 400 naming the parameter, so no field is silently ignored.
    """

    # Per-token log probabilities (``job.top_logprobs``), also of an echoed prompt.
    supports_logprobs: ClassVar[bool] = False
    # Image content parts (``job.images``). The registry entry's ``vision`` flag tells the
    # web process which models take images; ``models.load_backend`` refuses an entry that
    # claims vision its backend does not have.
    supports_vision: bool = False
    # Grammar-constrained output: ``response_format`` json_object / json_schema and tool calls.
    # A backend may turn it off per instance once the model is loaded (a tokenizer its
    # grammar engine cannot read).
    supports_constraints: bool = False
    # ``sampling.logit_bias``.
    supports_logit_bias: ClassVar[bool] = False
    # ``sampling.top_k``.
    supports_top_k: ClassVar[bool] = False
    # ``job.echo``: each choice opens with the prompt (a ``Delta`` with ``prompt=True``).
    supports_echo: ClassVar[bool] = False
    # Fill-in-the-middle (``job.suffix``). Depends on the model's vocabulary, so a backend
    # may set it per instance once the model is loaded.
    supports_fim: bool = False
    # ``generate(job, cancelled, direct=...)``, see above.
    supports_direct: ClassVar[bool] = False

    def check(self, job: GenerationJob) -> None:
        """Raise ``Unsupported`` (400, with ``param``) for anything this backend cannot do."""
        name = job.model
        if job.top_logprobs is not None and not self.supports_logprobs:
            raise Unsupported(f"The model '{name}' does not report log probabilities.",
                              param="logprobs")
        if job.sampling.logit_bias and not self.supports_logit_bias:
            raise Unsupported(f"The model '{name}' does not support logit_bias.",
                              param="logit_bias")
        if job.sampling.top_k and not self.supports_top_k:
            raise Unsupported(f"The model '{name}' does not support top_k.", param="top_k")
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
                        p.get("type") in IMAGE_PARTS for p in m["content"]):
                    raise Unsupported(f"The model '{name}' has no image input; send text only.",
                                      param=f"messages[{i}].content")

    @abstractmethod
    def generate(self, job: GenerationJob, cancelled: Cancelled) -> Iterator[Event]: ...

    def count_prompt(self, job: GenerationJob) -> int:
        """The prompt tokens ``generate`` would report for ``job`` (``job.count_only``)."""
        raise Unsupported(f"The model '{job.model}' cannot count prompt tokens.",
                          param="model")


def by_length(token_lists: Sequence[list[int]], batch_size: int, dimensions: int,
              embed_pass: Callable[[list[list[int]]], np.ndarray]) -> np.ndarray:
    """Rows for ``token_lists`` in their order, computed by ``embed_pass`` in passes of
    ``batch_size`` over the inputs sorted by length, longest first (as
    ``SentenceTransformer.encode`` does), so that each pass pads little."""
    out = np.empty((len(token_lists), dimensions), dtype=np.float32)
    order = sorted(range(len(token_lists)), key=lambda i: -len(token_lists[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        out[idx] = embed_pass([token_lists[i] for i in idx])
    return out


class EmbeddingOptions(BaseModel):
    """Options every embedding backend takes (``options`` of its registry entry)."""

    model_config = ConfigDict(extra="forbid")

    # Inputs per forward pass, and the most the micro-batcher collects at once.
    batch_size: int = Field(default=32, ge=1)
    # Inputs gathered for one call when only bulk (Batch API) work waits, sorted by length
    # into passes of batch_size: less padding than passes in arrival order.
    max_bulk_inputs: int = Field(default=128, ge=1)
    # How long the first waiting request waits for others to share its pass (ms).
    max_wait_ms: float = Field(default=5.0, ge=0)
    # Compute threads; 0: the runtime's default (one per physical core).
    n_threads: int = Field(default=0, ge=0)


class EmbeddingBackend(BaseBackend):
    """An embedding model, in two steps so that concurrent requests share forward passes:
    ``tokenize`` runs per request and rejects bad input (so a bad request fails alone),
    ``embed`` runs over the token lists of many requests at once (``models/batcher.py``).

    Subclasses set ``dimensions`` (vector size), ``max_tokens`` (longest input, special
    tokens included), ``vocab_size``, ``batch_size`` (inputs per forward pass),
    ``max_bulk_inputs`` (inputs gathered for one call when only bulk work waits) and
    ``max_wait`` (seconds a request may wait for others to share its pass).
    """

    # Requests in flight per worker: enough for the next bulk gather to fill while one runs.
    worker_concurrency: ClassVar[int] = 256

    @classmethod
    def worker_pool(cls, entry: ModelEntry) -> tuple[str, int]:
        return "threads", cls.worker_concurrency

    dimensions: int
    max_tokens: int
    vocab_size: int
    batch_size: int
    max_bulk_inputs: int
    max_wait: float

    def _batching(self, options: EmbeddingOptions) -> None:
        """Take the micro-batching settings from the entry's options."""
        self.batch_size = options.batch_size
        self.max_bulk_inputs = options.max_bulk_inputs
        self.max_wait = options.max_wait_ms / 1000

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
