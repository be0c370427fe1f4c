"""The batching loop: the one thread that owns the ExLlamaV2DynamicGenerator.

The generator is not thread-safe, so Celery's task threads never touch it: they hand
``Ticket``s to this loop through a queue and read their choice's events from the ticket's
own queue. Between two ``iterate()`` calls the loop enqueues new jobs, cancels jobs, and
fails jobs still waiting past their deadline (Celery time limits do not work in a threads
pool). Everything ``iterate()`` returns is translated here, so a task thread only waits.

Guarantees to a ticket's reader: it receives Deltas, then exactly one final item — a
``Finish`` (its reason ``cancelled`` after a cancel; ``generator.cancel`` emits nothing, so
the loop sends it) or a ``FerryError``. An exception from ``iterate()`` fails every live
ticket and the generator is rebuilt (its page table is lost), as TabbyAPI did; a choice whose
grammar failed (``grammar.MaskFilterLogic.failure``) ends with its own ``GenerationFailed``.
"""

from __future__ import annotations

import itertools
import logging
import queue
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

from config.errors import ContextLengthExceeded, FerryError, GenerationFailed, RequestExpired
from models.exllamav2.grammar import failure_of
from models.exllamav2.results import ChoiceStream
from models.loop import InboxLoop
from models.exllamav2.spec import JobSpec, sync_penalty_window

log = logging.getLogger(__name__)

_keys = itertools.count()


class Engine(Protocol):
    """What the loop needs of the GPU line (``engine.Exl2Engine``, or a test double)."""

    def new_generator(self) -> Any: ...
    def new_job(self, spec: JobSpec, identifier: int) -> Any: ...


@dataclass(eq=False)
class Ticket:
    """One job of one choice, from the task thread that submitted it to the loop and back."""

    spec: JobSpec
    stream: ChoiceStream
    # Delta | Finish | FerryError, in order; written by the loop, read by the task thread.
    out: queue.Queue = field(default_factory=queue.Queue)
    # Unix time: a job the generator has not started by then fails with 408.
    deadline: float | None = None
    # Unix time: the job's time budget (``max_job_seconds``) ends; a choice still live then
    # ends with finish_reason "length", as at max_tokens.
    stop_by: float | None = None
    key: int = field(default_factory=lambda: next(_keys))
    job: Any = None
    started: bool = False


class BatchLoop(InboxLoop):
    thread_name = "exl2-loop"

    def __init__(self, engine: Engine, *, clock: Callable[[], float] = time.time,
                 idle_wait: float = 0.5, rebuild_wait: float = 1.0):
        super().__init__(idle_wait)
        self.engine, self.clock = engine, clock
        self.rebuild_wait = rebuild_wait
        # Built before the thread exists; from then on only the loop thread touches it.
        self.generator: Any = engine.new_generator()
        self.rebuilds = 0
        self._live: dict[int, Ticket] = {}
        self._next_rebuild = 0.0

    # --- called from task threads -------------------------------------------------------

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the loop thread between two generator steps (GPU work other than
        decoding, such as a vision tower's forward pass, must not race the generator)."""
        future: Future = Future()
        self._inbox.put(("call", (fn, future)))
        return future

    # --- the loop thread ----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                if self.generator is None and self.clock() >= self._next_rebuild:
                    self._rebuild()
                if not self._drain(block=not self._busy()):
                    return
                self._expire()
                if self._busy():
                    self._step()
            except Exception:
                log.exception("the ExLlamaV2 generator failed; failing %d jobs and rebuilding it",
                              len(self._live))
                self._fail_all(GenerationFailed("The model failed while generating."))
                self._rebuild()

    def _busy(self) -> bool:
        return self.generator is not None and self.generator.num_remaining_jobs() > 0

    def _apply(self, op: str, arg: Any) -> None:
        if op == "submit":
            self._submit(arg)
        elif op == "call":
            self._call(*arg)
        else:
            self._cancel(arg)

    def _shutdown(self) -> None:
        self._fail_all(GenerationFailed("The worker is shutting down."))

    def _submit(self, ticket: Ticket) -> None:
        if self.generator is None:
            ticket.out.put(GenerationFailed("The model is recovering from a failure; retry."))
            return
        try:
            ticket.job = self.engine.new_job(ticket.spec, ticket.key)
        except Exception:
            log.exception("could not build an ExLlamaV2 job")
            ticket.out.put(GenerationFailed("The model could not start the request."))
            return
        try:
            self.generator.enqueue(ticket.job)
        except AssertionError as e:
            # The backend checks the cache before submitting; this is the generator's own
            # check (pages for prompt + max_new_tokens), should the two ever disagree.
            ticket.out.put(ContextLengthExceeded(f"The request does not fit in the model's "
                                                 f"cache: {e}"))
            return
        self._live[ticket.key] = ticket

    @staticmethod
    def _call(fn: Callable[[], Any], future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as e:  # the caller's error, not the generator's
            future.set_exception(e)

    def _cancel(self, ticket: Ticket) -> None:
        if ticket.key not in self._live:
            return  # finished (or failed) before the cancel got here
        # Cancel before forgetting it: should cancel() raise, _fail_all still reaches it.
        self.generator.cancel(ticket.job)
        del self._live[ticket.key]
        ticket.out.put(ticket.stream.cancelled())

    def _expire(self) -> None:
        now = self.clock()
        for t in [t for t in self._live.values() if not t.started and t.deadline is not None]:
            if now > t.deadline:
                self.generator.cancel(t.job)
                del self._live[t.key]
                t.out.put(RequestExpired("The request expired before the model could start it."))
        for t in [t for t in self._live.values() if t.stop_by is not None and now > t.stop_by]:
            self.generator.cancel(t.job)
            del self._live[t.key]
            for event in t.stream.cut():
                t.out.put(event)

    def _step(self) -> None:
        for r in self.generator.iterate():
            self._dispatch(r)
        for t in self._live.values():
            sync_penalty_window(t.job)

    def _dispatch(self, r: dict[str, Any]) -> None:
        ticket = self._live.get(r.get("identifier"))
        if ticket is None:
            return
        if r["stage"] == "started":
            ticket.started = True
        failure = failure_of(ticket.spec.filters) if r["eos"] else None
        if failure is not None:
            # The filter ended the job with an end token; the reply is not complete.
            log.warning("a grammar failed while generating: %s", failure)
            ticket.out.put(failure)
        else:
            for event in ticket.stream.feed(r):
                ticket.out.put(event)
        if r["eos"]:
            del self._live[ticket.key]

    def _fail_all(self, error: FerryError) -> None:
        for ticket in self._live.values():
            ticket.out.put(error)
        self._live.clear()

    def _rebuild(self) -> None:
        self.generator = None
        try:
            self.generator = self.engine.new_generator()
            self.rebuilds += 1
        except Exception:
            log.exception("could not rebuild the ExLlamaV2 generator; retrying")
            self._next_rebuild = self.clock() + self.rebuild_wait
