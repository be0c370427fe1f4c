"""Running a request's jobs: record and enqueue them, then follow or collect their events.

No Flask here: what a caller is (its tenant, whether it is bulk work, how to tell that nobody
wants the answer any more) comes in as a ``Caller``; answers are plain values and failures
are the ``config.errors`` tree. A route (``web/generation.py``) turns HTTP into a ``Caller``
and a ``Run`` back into HTTP; the batch runner (``tasks/core/endpoints.py``) collects.

Chat and completions differ only in how they build their jobs (their ``prepare``) and the
JSON they answer with (``tasks/jobs/shapes.py``). ``/v1/jobs`` uses the same ``prepare`` and
``submit`` and leaves the waiting to its client.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import redis as redis_lib

from config.contract import events
from config.contract.job import EmbeddingJob, EmbeddingPartsJob, GenerationJob
from config.contract.protocol import (BULK_PRIORITY, EMBED_PARTS_TASK, EMBED_TASK,
                                      GENERATE_TASK, workers_key)
from config.errors import FerryError, ServiceUnavailable, rebuild
from config.settings import ModelEntry
from config.tenants import Tenant
from tasks.core import limits
from tasks.core.merge import MergedSubscription
from tasks.core.relay import Subscription
from tasks.core.services import Ferry
from tasks.core.timing import ROUTED
from tasks.jobs.record import JobRecord
from tasks.jobs.shapes import Outcome, ResponseSpec, Shape
from tasks.jobs.store import Refused
from tasks.routing import Route

log = logging.getLogger("ferry.web")

# How often a waiting or streaming request checks that its caller still wants the answer.
WATCH_INTERVAL = 0.1


@dataclass(frozen=True)
class Prepared:
    """A validated request, ready to run: what the endpoint's ``prepare`` builds, once, for
    the synchronous endpoint and for ``/v1/jobs`` alike."""

    entry: ModelEntry
    job: GenerationJob | EmbeddingJob | EmbeddingPartsJob
    spec: ResponseSpec


def _never() -> bool:
    return False


def _log_enqueued(job_id: str, model: str) -> None:
    log.info("enqueued job=%s model=%s", job_id, model)


@dataclass(frozen=True)
class Caller:
    """Who asks, and how. ``bulk``: batch work, queued behind interactive requests and
    outside the model's and the tenant's in-flight limits. ``abandoned()``: True once nobody
    wants the answer (the client left, the batch is being cancelled); it is called often
    and must not block. ``on_enqueued(job id, model)``: after each job is enqueued."""

    tenant: Tenant
    bulk: bool = False
    abandoned: Callable[[], bool] = _never
    on_enqueued: Callable[[str, str], None] = _log_enqueued


_TASKS = {GenerationJob: GENERATE_TASK, EmbeddingJob: EMBED_TASK,
          EmbeddingPartsJob: EMBED_PARTS_TASK}


class ClientGone(Exception):
    """Nobody wants the answer any more (``Caller.abandoned``); the job was cancelled."""


def submit(ferry: Ferry, prepared: Prepared, *, caller: Caller, deadline: float,
           webhook: str | None = None, live: bool = False,
           subscription: Subscription | None = None, streamed: bool = True) -> JobRecord:
    """Record the job as the caller's, then enqueue it. The record exists before any worker
    can start it. ``live``: 503 unless a worker serves the model now; ``subscription``:
    confirmed before the job is enqueued, and told where a routed job waits
    (``tasks/routing.py``: the own queue of the worker holding the prompt's prefix, else the
    model's). The checks and the record are one Redis round trip (``JobStore.create``), the
    choice of queue another."""
    entry, tenant, bulk = prepared.entry, caller.tenant, caller.bulk
    reply_to = subscription.channel if subscription is not None else None
    update = {"deadline": deadline, "reply_to": reply_to}
    if isinstance(prepared.job, GenerationJob):
        update["streamed"] = streamed  # ``streamed``: its tokens are read as they come
    job = prepared.job.model_copy(update=update)
    try:
        # Batch lines are paced by the batch worker (chunks x lines in flight) and queue
        # behind interactive work; the in-flight limit protects interactive clients.
        record = ferry.jobs.create(
            job_id=job.id, endpoint=prepared.spec.endpoint, model=entry.name,
            queue=entry.queue, spec=prepared.spec, deadline=deadline, owner=tenant.owner,
            webhook=webhook, in_flight=None if bulk else limits.in_flight(ferry.settings, entry),
            owner_in_flight=None if bulk else limits.owner_in_flight(ferry.settings, tenant),
            live_workers=workers_key(entry.queue) if live else None, bulk=bulk,
            reply_to=reply_to)
    except Refused as e:
        raise limits.refusal(entry, e, tenant) from None
    except redis_lib.RedisError as e:
        raise ServiceUnavailable(f"Redis is unreachable: {e}") from None
    try:
        if subscription is not None:
            subscription.wait_confirmed()
        route = _route(ferry, entry, job)
        _send(ferry, job, route.queue, bulk)
        if route.worker is not None and subscription is not None:
            subscription.reroute(route.worker, lambda: _send(ferry, job, entry.queue, bulk))
    except Exception as e:
        ferry.jobs.discard(job.id)
        limits.release(ferry.redis, entry.queue, job.id, tenant.owner)
        if isinstance(e, FerryError):
            raise
        raise ServiceUnavailable(f"Could not enqueue the request: {e}") from None
    caller.on_enqueued(job.id, entry.name)
    return record


def _send(ferry: Ferry, job, queue: str, bulk: bool) -> None:
    # ``argsrepr``: the message's description of its arguments, for monitors (Flower, `celery
    # inspect`): the job id, not Celery's saferepr of the whole job (its prompt, which
    # monitors should not show; it was ~6% of a request's web CPU). ``ignore_result``: no
    # result backend to tell (results live in the job record), ~1% more. ``result_cls``:
    # nothing reads the AsyncResult Celery returns, whose creation made a result backend
    # (Celery keeps one per thread, so per request greenlet), ~7% of a request's web CPU.
    # ``declare=[]``: kombu binds and copies the queue's entity to declare it on every
    # publish (~2%); a message sent to the default exchange goes to the list named by its
    # queue, bound or not, and the workers declare the queues they consume.
    ferry.celery.send_task(_TASKS[type(job)], args=[job.model_dump(mode="json")],
                           queue=queue, task_id=job.id,
                           expires=max(1.0, job.deadline - time.time()),
                           priority=BULK_PRIORITY if bulk else None,
                           argsrepr=f"[{job.id!r}]", kwargsrepr="{}", ignore_result=True,
                           result_cls=_Sent, add_to_parent=False, declare=[])


class _Sent:
    """What ``send_task`` returns here: the id and Celery's ``ignored`` flag, nothing else."""

    __slots__ = ("id", "ignored")

    def __init__(self, task_id: str):
        self.id = task_id


def _route(ferry: Ferry, entry: ModelEntry, job) -> Route:
    """The shared queue, or the own queue of the worker holding the job's prefix."""
    try:
        route = ferry.router.choose(entry.queue, job)
    except redis_lib.RedisError:
        route = Route(entry.queue, "error")  # the enqueue that follows reports Redis
    ROUTED.labels(entry.name, "worker" if route.worker else "shared", route.reason).inc()
    return route


class Run:
    """A request's jobs, submitted and followed as one: ``events()`` until the terminal one,
    under the request's ``id``, answered in its ``shape``. Close it when done."""

    def __init__(self, sub: Subscription | MergedSubscription, shape: Shape,
                 abandoned: Callable[[], bool]):
        self.sub, self.shape, self.abandoned = sub, shape, abandoned
        self.id = sub.job_id

    def events(self) -> Iterator[events.Event]:
        return follow(self.sub, self.abandoned)

    def pending(self) -> int:
        """Events already waiting (read without blocking)."""
        return self.sub.pending()

    def cancel(self) -> None:
        self.sub.cancel()

    def close(self) -> None:
        self.sub.close()


def start(ferry: Ferry, prepared: list[Prepared], caller: Caller, *, streamed: bool) -> Run:
    """Subscribe to each job's events, then submit it (one job per prompt for completions
    with several prompts: they run in parallel and are read as one, ``tasks.core.merge``,
    under the request id their ids share). Fails fast when no worker is live. ``streamed``:
    the caller sends the tokens on as they come (else the worker may hold them)."""
    entry = prepared[0].entry
    subs: list[Subscription] = []
    deadline = time.time() + ferry.settings.queue_timeout
    try:
        for p in prepared:
            sub = _subscribe(ferry, p, caller.tenant)
            try:
                record = submit(ferry, p, caller=caller, deadline=deadline, live=True,
                                subscription=sub, streamed=streamed)
            except BaseException:
                sub.close()  # its job was not enqueued
                raise
            subs.append(sub)
    except BaseException:
        for sub in subs:
            sub.cancel()
            sub.close()
        raise
    if len(subs) == 1:
        sub, job_id = subs[0], record.id
    else:
        job_id = record.id.rsplit("-", 1)[0]
        sub = MergedSubscription(job_id, subs, prepared[0].spec.candidates)
    shape = prepared[0].spec.shape(job_id, entry.name, int(record.created))
    return Run(sub, shape, caller.abandoned)


def _subscribe(ferry: Ferry, prepared: Prepared, tenant: Tenant) -> Subscription:
    entry, job_id = prepared.entry, prepared.job.id
    sub = ferry.relay.subscribe(job_id, entry.queue, entry.name, wait=False)
    # The script that ended the job released its admission; this covers a job nobody has
    # ended yet (its client left: a queued job's place is free at once, not once a worker
    # has taken its cancel) or whose end this process made up (Redis lost).
    sub.on_close(lambda: sub.ended or limits.release(ferry.redis, entry.queue, job_id,
                                                     tenant.owner))
    return sub


def follow(sub: Subscription | MergedSubscription,
           gone: Callable[[], bool]) -> Iterator[events.Event]:
    """Events until the terminal one. A ``Failed`` event is raised as its ``FerryError``.

    ``gone()`` is checked at most every ``WATCH_INTERVAL``, whether or not events flow (a
    write to a closed socket can still succeed): once it is true, the job is cancelled (a
    queued job then never runs) and ``ClientGone`` is raised.
    """
    checked = time.monotonic()
    while True:
        ev = sub.next(timeout=WATCH_INTERVAL)
        now = time.monotonic()
        if ev is None or now - checked >= WATCH_INTERVAL:
            checked = now
            if gone():
                sub.cancel()
                raise ClientGone()
        if ev is None:
            continue
        if isinstance(ev, events.Failed):
            raise rebuild(ev.error, ev.status)
        yield ev
        if isinstance(ev, events.TERMINAL):
            return


class Feed(Protocol):
    """How a dialect (Responses, Messages) spells a run's events as its own stream events:
    ``opening()`` before the first, ``feed(ev)`` for each, ``fail(err)`` for the failure
    that ends the stream. Called in order, one at a time, by whoever follows the run: the
    web's writer that sends them as they come, or ``Streaming.to_end``."""

    def opening(self) -> list[dict]: ...
    def feed(self, ev: events.Event) -> list[dict]: ...
    def fail(self, err: FerryError) -> list[dict]: ...


@dataclass
class Streaming:
    """A dialect's run, its job started by its worker (``first`` is its first event,
    ``rest`` the events after it): sent as it comes by the web's stream writer
    (``web/generation.py``), or run ``to_end`` for an answer in one body."""

    run: Run
    first: events.Event
    rest: Iterator[events.Event]
    feed: Feed

    def to_end(self) -> None:
        """Feed every event, for the answer the feed builds. A failure is raised as its
        ``FerryError``; ``ClientGone`` once the caller left (its job is cancelled)."""
        finished = False
        try:
            self.feed.opening()
            for ev in itertools.chain([self.first], self.rest):
                self.feed.feed(ev)
                finished = finished or isinstance(ev, events.Done)
        except FerryError:
            finished = True
            raise
        finally:
            if not finished:
                self.run.cancel()  # the caller went away
            self.run.close()


def stream(ferry: Ferry, prepared: Prepared, caller: Caller, feed: Feed, *,
           streamed: bool) -> Streaming:
    """Start the job and wait for its worker to start it, so that errors found while
    preparing it (context length, template) fail the request itself."""
    run = start(ferry, [prepared], caller, streamed=streamed)
    rest = run.events()
    try:
        first = next(rest)
    except BaseException:
        run.close()
        raise
    return Streaming(run, first, rest, feed)


def collect(run: Run) -> dict:
    """The run's whole answer, as the endpoint's JSON body; closes the run. Its failure is
    raised as the ``FerryError`` it ended with, ``ClientGone`` once it is abandoned."""
    outcome = Outcome()
    try:
        for ev in run.events():
            outcome.add(ev)
            if isinstance(ev, events.RESULTS):
                return outcome.body(run.shape)
    finally:
        run.close()
    raise ServiceUnavailable("The response ended early.")


def run_to_end(ferry: Ferry, prepared: Prepared, caller: Caller) -> tuple[str, dict]:
    """Run one job to its end: its id and result body (``collect``)."""
    run = start(ferry, [prepared], caller, streamed=False)
    return run.id, collect(run)
