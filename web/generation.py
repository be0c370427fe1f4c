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
from flask import Response, current_app, request

from config.errors import FerryError, ServiceUnavailable, rebuild
from config.settings import ModelEntry
from models import events
from models.job import EmbeddingJob, GenerationJob
from tasks.protocol import BULK_PRIORITY, GENERATE_TASK
from web.relay import Subscription

log = logging.getLogger(__name__)


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


# Set in the WSGI environ by the Batch API's in-process dispatch (``tasks/batch_lines.py``);
# a client cannot set it (headers arrive as HTTP_*), so it can only lower priority from within.
BULK_ENVIRON = "ferry.bulk"


def is_bulk() -> bool:
    """True for requests of a batch job: they are queued behind interactive ones."""
    return bool(request.environ.get(BULK_ENVIRON))


def start(entry: ModelEntry, job: GenerationJob | EmbeddingJob,
          task: str = GENERATE_TASK) -> Subscription:
    """Subscribe to the job's events, then enqueue it. Fails fast when no worker is live."""
    ferry = current_app.extensions["ferry"]
    try:
        live = ferry.relay.live_workers(entry.queue)
    except redis_lib.RedisError as e:
        raise ServiceUnavailable(f"Redis is unreachable: {e}") from None
    if not live:
        raise ServiceUnavailable(f"No worker is serving the model '{entry.name}' right now.")
    sub = ferry.relay.subscribe(job.id, entry.queue)
    try:
        ferry.celery.send_task(task, args=[job.model_dump(mode="json")],
                               queue=entry.queue, task_id=job.id,
                               expires=ferry.settings.queue_timeout,
                               priority=BULK_PRIORITY if is_bulk() else None)
    except Exception as e:
        sub.close()
        raise ServiceUnavailable(f"Could not enqueue the request: {e}") from None
    return sub


def follow(sub: Subscription, gone: Callable[[], bool]) -> Iterator[events.Event]:
    """Events until the terminal one. A ``Failed`` event is raised as its ``FerryError``.

    While waiting, the client's connection is watched: if it goes, the job is cancelled
    (a queued job then never runs) and ``ClientGone`` is raised.
    """
    while True:
        ev = sub.next(timeout=0.5)
        if ev is None:
            if gone():
                sub.cancel()
                raise ClientGone()
            continue
        if isinstance(ev, events.Failed):
            raise rebuild(ev.error, ev.status)
        yield ev
        if isinstance(ev, events.TERMINAL):
            return


class Shape(Protocol):
    """How one endpoint spells its responses (see ``ShapeBase``)."""

    def chunk(self, index: int, ev: events.Event | None) -> dict | None:
        """A stream chunk for a Delta or Finish; with ``ev=None``, the choice's opening chunk
        (None if the endpoint has none)."""

    def usage_chunk(self, usage: dict) -> dict: ...
    def response(self, texts: dict[int, str], finishes: dict[int, str], usage: dict) -> dict: ...


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
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    try:
        for ev in follow(sub, client_watch()):
            if isinstance(ev, events.Delta):
                texts[ev.index] = texts.get(ev.index, "") + ev.text
            elif isinstance(ev, events.Finish):
                finishes[ev.index] = public_reason(ev.finish_reason)
            elif isinstance(ev, events.Done):
                body = shape.response(texts, finishes, usage_of(ev))
                return _json(body, sub.job_id)
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
            if isinstance(ev, (events.Delta, events.Finish)):
                if ev.index not in opened:
                    opened.add(ev.index)
                    opening = shape.chunk(ev.index, None)
                    if opening is not None:
                        yield _data(opening, include_usage)
                if isinstance(ev, events.Delta) and not ev.text:
                    continue
                yield _data(shape.chunk(ev.index, ev), include_usage)
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
