"""The HTTP side of running a request (``tasks/core/generation.py`` runs it): the caller
read from the request, the answer as one JSON body or as server-sent events.

Chat and completions stream the core's events as OpenAI chunks; an embedding request is
answered with one body. A client that closes its connection is the core's
``Caller.abandoned``.
"""

from __future__ import annotations

import json
import os
import select
import socket
import time
from collections.abc import Callable, Iterator
from typing import Protocol

import gevent.event
from flask import Response, current_app, g, request

from config.contract import events
from config.errors import FerryError
from tasks.core.generation import (Caller, ClientGone, Feed, Prepared, Run, Streaming, collect,
                                   start)
from tasks.core.relay import Subscription
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
    run = start(current_app.extensions["ferry"], prepared, caller(), streamed=stream)
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
    evs = [first] if isinstance(first, events.Done) else _chain(first, run.events())
    return _sse_response(run, evs, _OpenAIChunks(run, include_usage), {"X-Request-Id": run.id})


def dialect_stream(streaming: Streaming, headers: dict) -> Response:
    """A dialect's stream (Responses, Messages: ``tasks.core.generation.Streaming``), each
    event as ``event: <type>`` and its JSON, written as ``_sse`` writes every stream."""
    evs = _chain(streaming.first, streaming.rest)
    return _sse_response(streaming.run, evs, _NamedChunks(streaming.feed), headers)


def _sse_response(run: Run, evs: Iterator[events.Event], chunks: "_Chunks",
                  headers: dict) -> Response:
    pump = _Pump.of_request(run, chunks) if isinstance(run.sub, Subscription) else None
    return Response(_sse(run, evs, chunks, pump), status=200, mimetype="text/event-stream",
                    headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _Chunks(Protocol):
    """How one dialect writes a run's events as SSE bytes."""

    def opening(self) -> list[bytes]:
        """What goes before the first event's chunks."""

    def chunks(self, ev: events.Event) -> list[bytes]:
        """An event's SSE events (none, one or several); ``Done``'s end the stream."""

    def text(self, ev: events.Delta) -> bytes | None:
        """A text delta's one SSE event when it is built the quick way, else None."""

    def wire_text(self, text: events.WireText) -> bytes | None:
        """The same, from the text as the relay got it (its JSON string), else None."""

    def error(self, err: FerryError) -> list[bytes]:
        """What ends a stream that failed."""


def _sse(run: Run, evs: Iterator[events.Event], chunks: _Chunks,
         pump: "_Pump | None" = None) -> Iterator[bytes]:
    """The stream's bytes. Chunks of events already waiting are sent in one write: when the
    web falls behind its workers, it catches up with fewer, larger sends instead of one
    syscall per token. Once the headers are out and the stream has caught up, its chunks
    are written by the ``pump`` (when there is one) until it hands the stream back."""
    out: list[bytes] = []
    finished = False
    try:
        out.extend(chunks.opening())
        for ev in evs:
            out.extend(chunks.chunks(ev))
            if isinstance(ev, events.Done):
                finished = True
            if out and (finished or not run.pending()):
                yield b"".join(out)
                out.clear()
                if pump is not None and not finished and not run.pending():
                    if pump.usable():
                        pump.run()
                    else:
                        pump = None
    except ClientGone:
        pass
    except FerryError as e:
        finished = True
        out.extend(chunks.error(e))
        yield b"".join(out)
    finally:
        if not finished:
            run.cancel()  # the client went away mid-stream
        run.close()


class _OpenAIChunks:
    """Chat and completions chunks (``data: {...}``), ``data: [DONE]`` at the end."""

    def __init__(self, run: Run, include_usage: bool):
        self.run, self.include_usage = run, include_usage
        self.opened: set[int] = set()
        self.texts = _TextChunks(run.shape, include_usage)

    def opening(self) -> list[bytes]:
        return []

    def chunks(self, ev: events.Event) -> list[bytes]:
        return _sse_chunks(ev, self.run, self.include_usage, self.opened, self.texts)

    def text(self, ev: events.Delta) -> bytes | None:
        return self.texts.get(ev) if ev.index in self.opened and ev.text else None

    def wire_text(self, text: events.WireText) -> bytes | None:
        return self.texts.wire(text) if text.index in self.opened else None

    def error(self, err: FerryError) -> list[bytes]:
        return [_encode({"error": err.to_dict()})]


class _NamedChunks:
    """A dialect's events (``tasks.core.generation.Feed``) as ``event: <type>`` + JSON."""

    def __init__(self, feed: Feed):
        self.feed = feed

    def opening(self) -> list[bytes]:
        return [_named(ev) for ev in self.feed.opening()]

    def chunks(self, ev: events.Event) -> list[bytes]:
        return [_named(out) for out in self.feed.feed(ev)]

    def text(self, ev: events.Delta) -> bytes | None:
        return None

    def wire_text(self, text: events.WireText) -> bytes | None:
        return None

    def error(self, err: FerryError) -> list[bytes]:
        return [_named(out) for out in self.feed.fail(err)]


def _named(ev: dict) -> bytes:
    return (f"event: {ev['type']}\ndata: ".encode()
            + json.dumps(ev, separators=(",", ":")).encode() + b"\n\n")


class _Pump:
    """Writes a stream's chunks to its client's socket from the relay's reader greenlet, as
    its events arrive (``Subscription.divert``): per token, no greenlet switch and no pass
    through the WSGI iterator, gunicorn's writer and gevent's socket, which together cost
    several times the chunk itself. The request's greenlet waits meanwhile, and takes the
    stream back for whatever the pump does not write: an event that is not a chunk of text,
    a tool call or a finish (the end, above all), a write the socket took only in part (a
    slow client: the greenlet sends the rest, blocking only itself), a client gone.

    Only under gunicorn, on a plain (not TLS) socket, with the chunked framing gunicorn
    chose for this response (read from its ``start_response``, kept in the environ by
    ``keep_start_response``): the pump frames its chunks as gunicorn does, so the two
    writers' bytes interleave in one valid body. Anywhere else the stream is written as
    before, through the response iterator.
    """

    # Chunks the pump writes: the events a stream sends while it runs.
    TAKES = (events.Delta, events.ToolCallDelta, events.Finish)
    # Seconds without a write after which the client's connection is checked (a write to a
    # closed connection fails by the second token: while tokens flow, nothing is polled).
    # One greenlet checks all pumps (``_watch``): a timer per stream woke its greenlet,
    # whose switches cost more than its tokens' writes.
    IDLE = 0.25
    _pumping: set["_Pump"] = set()
    _watcher = None

    def __init__(self, sock, start_response, run: Run, chunks: "_Chunks"):
        self.sock, self._start_response = sock, start_response
        self.fd = sock.fileno()
        self.sub, self.abandoned, self.chunks = run.sub, run.abandoned, chunks
        self.woken = gevent.event.Event()
        self.rest = b""
        self.gone = False
        self.wrote = 0.0

    @classmethod
    def of_request(cls, run: Run, chunks: "_Chunks") -> "_Pump | None":
        """The current request's pump for ``run``'s stream, written as ``chunks`` says."""
        environ = request.environ
        sock = environ.get("gunicorn.socket")
        start_response = environ.get(START_RESPONSE)
        if sock is None or start_response is None or hasattr(sock, "getpeercert"):
            return None
        return cls(sock, start_response, run, chunks)

    def usable(self) -> bool:
        """After the headers went out: whether gunicorn frames this response in chunks on
        the socket the pump writes to."""
        resp = getattr(self._start_response, "__self__", None)
        return getattr(resp, "chunked", None) is True and getattr(resp, "sock", None) is self.sock

    def run(self) -> None:
        """Pump the stream's events until something needs the request's greenlet; then
        send what the socket did not take. Raises ``ClientGone`` once the client left."""
        sub = self.sub
        self.wrote = time.monotonic()
        self.woken.clear()
        sub.divert(self)
        cls = type(self)
        cls._pumping.add(self)
        if cls._watcher is None or cls._watcher.dead:
            cls._watcher = gevent.spawn(cls._watch)
        try:
            self.woken.wait()
        finally:
            cls._pumping.discard(self)
            sub.divert(None)
        if self.rest and not self.gone:
            rest, self.rest = self.rest, b""
            try:
                self.sock.sendall(rest)
            except OSError:
                self.gone = True
        if self.gone:
            raise ClientGone()

    # -- on the reader greenlet -------------------------------------------------------

    def take(self, evs: list[events.Event]) -> int:
        taken, out, text, shape = 0, [], self.chunks.text, self.chunks.chunks
        for ev in evs:
            chunk = text(ev) if type(ev) is events.Delta else None
            if chunk is not None:
                out.append(chunk)
            elif isinstance(ev, self.TAKES):
                out.extend(shape(ev))
            else:
                break
            taken += 1
        if out:
            self._send(out[0] if len(out) == 1 else b"".join(out))
        return taken

    def take_text(self, text: events.WireText) -> bool:
        chunk = self.chunks.wire_text(text)
        if chunk is None:
            return False
        self._send(chunk)
        return True

    def _send(self, data: bytes) -> None:
        """Write ``data`` as one chunk; hand the stream back if the socket did not take it
        all or the client left."""
        self._write(b"%X\r\n%s\r\n" % (len(data), data))
        if self.rest or self.gone:
            self.sub.divert(None)
            self.woken.set()

    def release(self) -> None:
        self.woken.set()

    @classmethod
    def _watch(cls) -> None:
        """Wake the pumps whose clients left while no tokens came."""
        while True:
            gevent.sleep(cls.IDLE)
            idle_since = time.monotonic() - cls.IDLE
            for pump in [p for p in cls._pumping if p.wrote < idle_since]:
                try:
                    gone = pump.abandoned()
                except Exception:
                    gone = True
                if gone:
                    pump.gone = True
                    pump.woken.set()

    def _write(self, data: bytes) -> None:
        try:
            n = os.write(self.fd, data)  # the socket is non-blocking (gevent's)
        except BlockingIOError:
            n = 0
        except OSError:
            self.gone = True
            return
        self.wrote = time.monotonic()
        if n < len(data):
            self.rest = data[n:]


START_RESPONSE = "ferry.start_response"


def keep_start_response(wsgi_app):
    """WSGI middleware: the server's ``start_response`` in the environ, for ``_Pump``."""
    def app(environ, start_response):
        environ[START_RESPONSE] = start_response
        return wsgi_app(environ, start_response)
    return app


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
        parts = self._parts.get(ev.index) or self._split(ev.index)
        return None if parts is None else parts[0] + _json_str(ev.text).encode() + parts[1]

    def wire(self, text: events.WireText) -> bytes | None:
        """``get``'s chunk for a text as the relay got it: its JSON string is the chunk's."""
        if not self.usable:
            return None
        parts = self._parts.get(text.index) or self._split(text.index)
        return None if parts is None else parts[0] + text.text + parts[1]

    def _split(self, index: int) -> tuple[bytes, bytes] | None:
        chunk = self.shape.chunk(index, events.Delta(index, self._MARK))
        pieces = [] if chunk is None else \
            _data(chunk, self.include_usage).split(json.dumps(self._MARK).encode())
        if len(pieces) != 2:
            self.usable = False
            return None
        parts = self._parts[index] = (pieces[0], pieces[1])
        return parts


# What json.dumps does with a str, without its two Python calls (once per token).
_json_str = json.encoder.encode_basestring_ascii


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
    """Stream events made elsewhere (a background response replayed): each as ``event:
    <type>`` and its JSON; a client that leaves ends it."""
    def sse() -> Iterator[bytes]:
        try:
            for ev in stream:
                yield _named(ev)
        except ClientGone:
            return

    return Response(sse(), status=200, mimetype="text/event-stream",
                    headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _json(body: dict, job_id: str) -> Response:
    return Response(json.dumps(body), status=200, mimetype="application/json",
                    headers={"X-Request-Id": job_id})
