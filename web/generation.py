"""The HTTP side of running a request (``tasks/core/generation.py`` runs it): the caller
read from the request, the answer as one JSON body or as server-sent events.

Chat and completions stream the core's events as OpenAI chunks; an embedding request is
answered with one body. A client that closes its connection is the core's
``Caller.abandoned``.
"""

from __future__ import annotations

import json
import select
import socket
from collections.abc import Callable, Iterator

from flask import Response, current_app, g, request

from config.contract import events
from config.errors import FerryError
from tasks.core.generation import Caller, ClientGone, Prepared, Run, collect, start
from tasks.jobs.shapes import usage_of
from web import logs
from web.auth import current_tenant

try:
    from gevent.monkey import get_original

    _poll = get_original("select", "poll")
except ImportError:  # pragma: no cover - gevent is a dependency
    _poll = select.poll


def client_watch() -> Callable[[], bool]:
    """For the current request: a check, usable after the handler returned (while a stream
    is sent), that is True once the client has closed its connection. Never blocks.

    poll, not select: select fails for descriptors >= 1024, i.e. past ~1000 open streams.
    The original (unpatched) poll is used: with a zero timeout it never blocks the hub.
    """
    sock = request.environ.get("gunicorn.socket")

    def gone() -> bool:
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


def caller() -> Caller:
    """The current request's caller: its tenant, watched for leaving, its jobs logged."""
    return Caller(current_tenant(), abandoned=client_watch(), on_enqueued=logs.enqueued)


def respond(prepared: list[Prepared], *, stream: bool, include_usage: bool) -> Response:
    """The synchronous endpoints: run the request's jobs (``tasks.core.generation.start``),
    answer with their stream or their body."""
    g.model = prepared[0].entry.name
    run = start(current_app.extensions["ferry"], prepared, caller())
    try:
        if stream:
            return _stream(run, include_usage)
        return _json(collect(run), run.id)
    except ClientGone:
        # Nobody to answer; 499 (nginx's "client closed request") keeps it out of the 5xx.
        return Response(status=499)


def _stream(run: Run, include_usage: bool) -> Response:
    # Wait for the worker to start the job before answering, so that errors found while
    # preparing it (context length, template) get their own status instead of a 200.
    try:
        first = next(run.events())
    except BaseException:
        run.close()
        raise
    return Response(_sse(run, include_usage, first), status=200,
                    mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                             "X-Request-Id": run.id})


def _sse(run: Run, include_usage: bool, first) -> Iterator[bytes]:
    """The stream's bytes. Chunks of events already waiting are sent in one write: when the
    web falls behind its workers, it catches up with fewer, larger sends instead of one
    syscall per token."""
    out: list[bytes] = []
    finished = False
    try:
        evs = [first] if isinstance(first, events.Done) else _chain(first, run.events())
        opened: set[int] = set()
        texts = _TextChunks(run.shape, include_usage)
        for ev in evs:
            out.extend(_sse_chunks(ev, run, include_usage, opened, texts))
            if isinstance(ev, events.Done):
                finished = True
            if out and (finished or not run.pending()):
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
            run.cancel()  # the client went away mid-stream
        run.close()


def _sse_chunks(ev: events.Event, run: Run, include_usage: bool,
                opened: set[int], texts: "_TextChunks") -> list[bytes]:
    shape = run.shape
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
    text = texts.get(ev) if isinstance(ev, events.Delta) else None
    if text is not None:
        chunks.append(text)
        return chunks
    chunk = shape.chunk(ev.index, ev)
    if chunk is not None:
        chunks.append(_data(chunk, include_usage))
    return chunks


class _TextChunks:
    """The SSE bytes of a delta that is only text, from the shape's own chunk for a marker
    text, split around it: per token, only the text is JSON-encoded (building the chunk's dict
    and encoding all of it cost more than the token). Used only where a chunk depends on
    nothing else: no logprobs asked for (completions' offsets run across chunks), no echo."""

    _MARK = "\x00ferry-text\x00"

    def __init__(self, shape, include_usage: bool):
        self.shape, self.include_usage = shape, include_usage
        self.usable = not getattr(shape, "logprobs", False)
        self._parts: dict[int, tuple[bytes, bytes]] = {}

    def get(self, ev: events.Delta) -> bytes | None:
        if not self.usable or ev.logprobs or ev.prompt:
            return None
        parts = self._parts.get(ev.index)
        if parts is None:
            chunk = self.shape.chunk(ev.index, events.Delta(ev.index, self._MARK))
            pieces = [] if chunk is None else \
                _data(chunk, self.include_usage).split(json.dumps(self._MARK).encode())
            if len(pieces) != 2:
                self.usable = False
                return None
            parts = self._parts[ev.index] = (pieces[0], pieces[1])
        return parts[0] + json.dumps(ev.text).encode() + parts[1]


def _chain(first, rest):
    yield first
    yield from rest


def _data(chunk: dict, include_usage: bool) -> bytes:
    if include_usage:
        chunk["usage"] = None
    return _encode(chunk)


def _encode(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def named_events(stream: Iterator[dict], headers: dict) -> Response:
    """A dialect's stream (Responses, Messages): each event as ``event: <type>`` and its
    JSON; a client that leaves ends it (its job is cancelled by the core)."""
    def sse() -> Iterator[bytes]:
        try:
            for ev in stream:
                yield (f"event: {ev['type']}\ndata: ".encode()
                       + json.dumps(ev, separators=(",", ":")).encode() + b"\n\n")
        except ClientGone:
            return

    return Response(sse(), status=200, mimetype="text/event-stream",
                    headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _json(body: dict, job_id: str) -> Response:
    return Response(json.dumps(body), status=200, mimetype="application/json",
                    headers={"X-Request-Id": job_id})
