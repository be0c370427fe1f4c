"""Running a generation job from a request: enqueue, then stream or collect its events.

Shared by the chat and completions endpoints, which differ only in the JSON they build
(see ``Shape`` implementations in ``web/chat.py`` and ``web/completions.py``).
"""

from __future__ import annotations

import json
import logging
import select
import socket
import time
from collections.abc import Callable, Iterator
from typing import Protocol

import redis as redis_lib
from flask import Response, current_app, g, request

from config.errors import FerryError, ServiceUnavailable, rebuild
from config.settings import ModelEntry
from models import events
from models.job import GenerationJob
from tasks.protocol import GENERATE_TASK
from web import limits, logs
from web.merge import MergedSubscription
from web.relay import Subscription
from web.results import ChoiceResult

log = logging.getLogger(__name__)


# How often a waiting or streaming request checks that its client is still connected.
WATCH_INTERVAL = 0.1


class ClientGone(Exception):
    pass


def client_watch() -> Callable[[], bool]:
    """For the current request: a check, usable after the handler returned (while a stream
    is sent), that is True once the client has closed its connection. Never blocks."""
    sock = request.environ.get("gunicorn.socket")

    def gone() -> bool:
        if sock is None:
            return False
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    return gone


def start(entry: ModelEntry, job: GenerationJob) -> Subscription:
    """Subscribe to the job's events, then enqueue it. Fails fast when no worker is live."""
    ferry = current_app.extensions["ferry"]
    g.model = entry.name
    try:
        live = ferry.relay.live_workers(entry.queue)
    except redis_lib.RedisError as e:
        raise ServiceUnavailable(f"Redis is unreachable: {e}") from None
    if not live:
        raise ServiceUnavailable(f"No worker is serving the model '{entry.name}' right now.")
    limits.admit(ferry.relay.redis, ferry.settings, entry, job.id)
    try:
        sub = ferry.relay.subscribe(job.id, entry.queue, entry.name)
    except BaseException:
        limits.release(ferry.relay.redis, entry.queue, job.id)
        raise
    sub.on_close(lambda: limits.release(ferry.relay.redis, entry.queue, job.id))
    logs.enqueued(job.id, entry.name)
    try:
        ferry.celery.send_task(GENERATE_TASK, args=[job.model_dump(mode="json")],
                               queue=entry.queue, task_id=job.id,
                               expires=ferry.settings.queue_timeout)
    except Exception as e:
        sub.close()
        raise ServiceUnavailable(f"Could not enqueue the request: {e}") from None
    return sub


def start_all(request_id: str, entry: ModelEntry, jobs: list[GenerationJob], per_prompt: int
              ) -> Subscription | MergedSubscription:
    """``start`` for one job per prompt (see ``web.merge``)."""
    if len(jobs) == 1:
        return start(entry, jobs[0])
    subs: list[Subscription] = []
    try:
        for job in jobs:
            subs.append(start(entry, job))
    except BaseException:
        for sub in subs:
            sub.cancel()
            sub.close()
        raise
    return MergedSubscription(request_id, subs, per_prompt)


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
        if isinstance(ev, events.Done):
            return


class Shape(Protocol):
    """How one endpoint spells its responses (see ``ShapeBase``)."""

    def chunk(self, index: int, ev: events.Event | None) -> dict | None:
        """A stream chunk for a Delta, ToolCallDelta or Finish (None: nothing to send);
        with ``ev=None``, the choice's opening chunk (None if the endpoint has none)."""

    def usage_chunk(self, usage: dict) -> dict: ...
    def response(self, choices: dict[int, ChoiceResult], usage: dict) -> dict: ...


class ShapeBase:
    """What every response of one request shares: id, object, created, model."""

    object = ""

    def __init__(self, job_id: str, model: str):
        self.base = {"id": job_id, "object": self.object, "created": now(), "model": model,
                     "system_fingerprint": None}

    def _chunk(self, choices: list[dict]) -> dict:
        return {**self.base, "choices": choices}

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._chunk([]), "usage": usage}


def usage_of(done: events.Done) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def public_reason(reason: str) -> str:
    return "stop" if reason == "cancelled" else reason


def collect(sub: Subscription, shape: Shape) -> Response:
    choices: dict[int, ChoiceResult] = {}
    try:
        for ev in follow(sub, client_watch()):
            if isinstance(ev, (events.Delta, events.ToolCallDelta, events.Finish)):
                choices.setdefault(ev.index, ChoiceResult()).add(ev)
            elif isinstance(ev, events.Done):
                return _json(shape.response(choices, usage_of(ev)), sub.job_id)
    finally:
        sub.close()
    raise ServiceUnavailable("The response ended early.")


def stream(sub: Subscription, shape: Shape, include_usage: bool) -> Response:
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
    opened: set[int] = set()
    finished = False
    try:
        evs = [first] if isinstance(first, events.Done) else _chain(first, follow(sub, gone))
        for ev in evs:
            if isinstance(ev, (events.Delta, events.ToolCallDelta, events.Finish)):
                if ev.index not in opened:
                    opened.add(ev.index)
                    opening = shape.chunk(ev.index, None)
                    if opening is not None:
                        yield _data(opening, include_usage)
                if isinstance(ev, events.Delta) and not ev.text and not ev.logprobs:
                    continue
                chunk = shape.chunk(ev.index, ev)
                if chunk is not None:
                    yield _data(chunk, include_usage)
            elif isinstance(ev, events.Done):
                if include_usage:
                    yield _encode(shape.usage_chunk(usage_of(ev)))
                yield b"data: [DONE]\n\n"
                finished = True
    except ClientGone:
        pass
    except FerryError as e:
        finished = True
        yield _encode({"error": e.to_dict()})
    finally:
        if not finished:
            sub.cancel()  # the client went away mid-stream
        sub.close()


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


def now() -> int:
    return int(time.time())
