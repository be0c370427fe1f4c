"""Running a generation job from a request: record and enqueue it, then stream or collect.

Shared by the chat and completions endpoints, which differ only in how they build the job
(their ``prepare``) and the JSON they answer with (``jobs/shapes.py``). ``/v1/jobs`` uses the
same ``prepare`` and ``submit`` and leaves the waiting to its client.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import redis as redis_lib
from flask import Response, current_app, g, request

from config.errors import FerryError, ServiceUnavailable, rebuild
from config.settings import ModelEntry
from config.tenants import Tenant
from tasks.jobs.record import JobRecord
from tasks.jobs.shapes import Outcome, ResponseSpec, Shape, usage_of
from models import events
from models.job import EmbeddingJob, EmbeddingPartsJob, GenerationJob
from tasks.jobs.store import Refused
from tasks.protocol import (BULK_PRIORITY, EMBED_PARTS_TASK, EMBED_TASK, GENERATE_TASK,
                            workers_key)
from tasks.routing import Route
from web import limits, logs, metrics
from web.auth import current_tenant
from web.merge import MergedSubscription
from web.relay import Subscription

log = logging.getLogger(__name__)

try:
    from gevent.monkey import get_original

    _poll = get_original("select", "poll")
except ImportError:  # pragma: no cover - gevent is a dependency
    _poll = select.poll


# How often a waiting or streaming request checks that its client is still connected.
WATCH_INTERVAL = 0.1


@dataclass(frozen=True)
class Prepared:
    """A validated request, ready to run: what the endpoint's ``prepare`` builds, once, for
    the synchronous endpoint and for ``/v1/jobs`` alike."""

    entry: ModelEntry
    job: GenerationJob | EmbeddingJob | EmbeddingPartsJob
    spec: ResponseSpec


_TASKS = {GenerationJob: GENERATE_TASK, EmbeddingJob: EMBED_TASK,
          EmbeddingPartsJob: EMBED_PARTS_TASK}


class ClientGone(Exception):
    pass


def client_watch() -> Callable[[], bool]:
    """For the current request: a check, usable after the handler returned (while a stream
    is sent), that is True once the client has closed its connection. Never blocks.

    poll, not select: select fails for descriptors >= 1024, i.e. past ~1000 open streams.
    The original (unpatched) poll is used: with a zero timeout it never blocks the hub.
    """
    sock = request.environ.get("gunicorn.socket")
    abandoned = request.environ.get(ABANDONED_ENVIRON)

    def gone() -> bool:
        if abandoned is not None and abandoned():
            return True
        if sock is None:
            return False
        try:
            poller = _poll()
            poller.register(sock.fileno(), select.POLLIN | select.POLLPRI)
            ready = poller.poll(0)
            if not ready:
                return False
            if ready[0][1] & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                return True
            return sock.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    return gone


# Set in the WSGI environ by the Batch API's in-process dispatch (``tasks/batch_lines.py``);
# a client cannot set it (headers arrive as HTTP_*), so it can only lower priority from within.
BULK_ENVIRON = "ferry.bulk"
# Also set by the batch worker: a callable, True once nobody wants the answer any more (its
# batch is being cancelled). The request is then treated as one whose client left.
ABANDONED_ENVIRON = "ferry.abandoned"


def is_bulk() -> bool:
    """True for requests of a batch job: they are queued behind interactive ones."""
    return bool(request.environ.get(BULK_ENVIRON))


def submit(prepared: Prepared, *, tenant: Tenant, deadline: float, webhook: str | None = None,
           bulk: bool | None = None, live: bool = False,
           subscription: Subscription | None = None) -> JobRecord:
    """Record the job as ``tenant``'s, then enqueue it. The record exists before any worker
    can start it. ``bulk`` (default: whether this request is a batch line) queues it behind
    interactive work and outside the model's and the tenant's in-flight limits; ``live``:
    503 unless a worker serves the model now; ``subscription``: confirmed before the job is
    enqueued, and told where a routed job waits (``tasks/routing.py``: the own queue of the
    worker holding the prompt's prefix, else the model's). The checks and the record are one
    Redis round trip (``JobStore.create``), the choice of queue another."""
    ferry = current_app.extensions["ferry"]
    entry = prepared.entry
    g.model = entry.name
    bulk = is_bulk() if bulk is None else bulk
    job = prepared.job.model_copy(update={"deadline": deadline})
    try:
        # Batch lines are paced by the batch worker (chunks x lines in flight) and queue
        # behind interactive work; the in-flight limit protects interactive clients.
        record = ferry.jobs.create(
            job_id=job.id, endpoint=prepared.spec.endpoint, model=entry.name,
            queue=entry.queue, spec=prepared.spec, deadline=deadline, owner=tenant.owner,
            webhook=webhook, in_flight=None if bulk else limits.in_flight(ferry.settings, entry),
            owner_in_flight=None if bulk else limits.owner_in_flight(ferry.settings, tenant),
            live_workers=workers_key(entry.queue) if live else None, bulk=bulk)
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
    logs.enqueued(job.id, entry.name)
    return record


def _send(ferry, job, queue: str, bulk: bool) -> None:
    ferry.celery.send_task(_TASKS[type(job)], args=[job.model_dump(mode="json")],
                           queue=queue, task_id=job.id,
                           expires=max(1.0, job.deadline - time.time()),
                           priority=BULK_PRIORITY if bulk else None)


def _route(ferry, entry: ModelEntry, job) -> Route:
    """The shared queue, or the own queue of the worker holding the job's prefix."""
    try:
        route = ferry.router.choose(entry.queue, job)
    except redis_lib.RedisError:
        route = Route(entry.queue, "error")  # the enqueue that follows reports Redis
    metrics.ROUTED.labels(entry.name, "worker" if route.worker else "shared",
                          route.reason).inc()
    return route


def respond(prepared: Prepared, *, stream: bool, include_usage: bool) -> Response:
    """The synchronous endpoints: subscribe to the job's events, submit it, answer with its
    stream or its body. Fails fast when no worker is live."""
    return respond_all([prepared], stream=stream, include_usage=include_usage)


def respond_all(prepared: list[Prepared], *, stream: bool, include_usage: bool) -> Response:
    """``respond`` for one job per prompt (completions with several prompts): the jobs run in
    parallel and are read as one response (``web.merge``), under the request id their ids
    share."""
    ferry = current_app.extensions["ferry"]
    entry = prepared[0].entry
    tenant = current_tenant()
    subs: list[Subscription] = []
    deadline = time.time() + ferry.settings.queue_timeout
    try:
        for p in prepared:
            sub = _subscribe(p, tenant)
            try:
                record = submit(p, tenant=tenant, deadline=deadline, live=True,
                                subscription=sub)
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
    try:
        if stream:
            return _stream(sub, shape, include_usage)
        return collect(sub, shape)
    except ClientGone:
        # Nobody to answer; 499 (nginx's "client closed request") keeps it out of the 5xx.
        return Response(status=499)


def run_to_end(prepared: Prepared, *, tenant: Tenant, bulk: bool = False,
               abandoned: Callable[[], bool] = lambda: False) -> tuple[str, dict]:
    """Run a job of ``tenant`` with no client connection to answer (the Batch API's
    in-process work): its id and result body, or its failure raised as the ``FerryError``
    it ended with. Once ``abandoned()`` is true the job is cancelled and ``ClientGone``
    raised."""
    ferry = current_app.extensions["ferry"]
    sub = _subscribe(prepared, tenant)
    try:
        record = submit(prepared, tenant=tenant,
                        deadline=time.time() + ferry.settings.queue_timeout, bulk=bulk,
                        live=True, subscription=sub)
        shape = prepared.spec.shape(record.id, prepared.entry.name, int(record.created))
        outcome = Outcome()
        for ev in follow(sub, abandoned):
            outcome.add(ev)
        return record.id, outcome.body(shape)
    finally:
        sub.close()


def _subscribe(prepared: Prepared, tenant: Tenant) -> Subscription:
    ferry, entry, job_id = current_app.extensions["ferry"], prepared.entry, prepared.job.id
    sub = ferry.relay.subscribe(job_id, entry.queue, entry.name, wait=False)
    # The worker releases the job's admission when it ends; this covers jobs it never runs.
    sub.on_close(lambda: limits.release(ferry.redis, entry.queue, job_id, tenant.owner))
    return sub


def follow(sub: Subscription, gone: Callable[[], bool]) -> Iterator[events.Event]:
    """Events until the terminal one. A ``Failed`` event is raised as its ``FerryError``.

    The client's connection is watched, at most every ``WATCH_INTERVAL`` and whether or not
    events flow (a write to a closed socket can still succeed): if it goes, the job is
    cancelled (a queued job then never runs) and ``ClientGone`` is raised.
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


def collect(sub: Subscription, shape: Shape) -> Response:
    outcome = Outcome()
    try:
        for ev in follow(sub, client_watch()):
            outcome.add(ev)
            if isinstance(ev, events.RESULTS):
                return _json(outcome.body(shape), sub.job_id)
    finally:
        sub.close()
    raise ServiceUnavailable("The response ended early.")


def _stream(sub: Subscription, shape: Shape, include_usage: bool) -> Response:
    # Wait for the worker to start the job before answering, so that errors found while
    # preparing it (context length, template) get their own status instead of a 200.
    gone = client_watch()
    try:
        first = next(follow(sub, gone))
    except BaseException:
        sub.close()
        raise
    return Response(_sse(sub, shape, include_usage, first, gone), status=200,
                    mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                             "X-Request-Id": sub.job_id})


def _sse(sub: Subscription, shape: Shape, include_usage: bool, first,
         gone: Callable[[], bool]) -> Iterator[bytes]:
    """The stream's bytes. Chunks of events already waiting are sent in one write: when the
    web falls behind its workers, it catches up with fewer, larger sends instead of one
    syscall per token."""
    out: list[bytes] = []
    finished = False
    try:
        evs = [first] if isinstance(first, events.Done) else _chain(first, follow(sub, gone))
        opened: set[int] = set()
        for ev in evs:
            out.extend(_sse_chunks(ev, shape, include_usage, opened))
            if isinstance(ev, events.Done):
                finished = True
            if out and (finished or not sub.pending()):
                yield b"".join(out)
                out.clear()
    except ClientGone:
        pass
    except FerryError as e:
        finished = True
        out.append(_encode({"error": e.to_dict()}))
        yield b"".join(out)
    finally:
        if not finished:
            sub.cancel()  # the client went away mid-stream
        sub.close()


def _sse_chunks(ev: events.Event, shape: Shape, include_usage: bool,
                opened: set[int]) -> list[bytes]:
    if isinstance(ev, events.Done):
        usage = [_encode(shape.usage_chunk(usage_of(ev)))] if include_usage else []
        return [*usage, b"data: [DONE]\n\n"]
    if not isinstance(ev, (events.Delta, events.ToolCallDelta, events.Finish)):
        return []
    chunks = []
    if ev.index not in opened:
        opened.add(ev.index)
        opening = shape.chunk(ev.index, None)
        if opening is not None:
            chunks.append(_data(opening, include_usage))
    if isinstance(ev, events.Delta) and not ev.text and not ev.logprobs:
        return chunks
    chunk = shape.chunk(ev.index, ev)
    if chunk is not None:
        chunks.append(_data(chunk, include_usage))
    return chunks


def _chain(first, rest):
    yield first
    yield from rest


def _data(chunk: dict, include_usage: bool) -> bytes:
    if include_usage:
        chunk["usage"] = None
    return _encode(chunk)


def _encode(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _json(body: dict, job_id: str) -> Response:
    return Response(json.dumps(body), status=200, mimetype="application/json",
                    headers={"X-Request-Id": job_id})
