"""GET /v1/jobs/{id}/events: a job's events, replayed from the start (or from after
``Last-Event-ID``), then followed live until the job ends.

Nothing is lost or repeated across reconnects. Each event's SSE id is its sequence number.
The tap subscribes *before* the replay buffer is read, and the worker appends to the buffer
before it publishes, so every event is either in the buffer or still to come live; events
seen in both are dropped by number. A gap in the live messages is filled from the buffer.
If the buffer no longer holds events asked for (it is capped, and expires after the job),
the stream says so with an ``error`` event rather than skip them.

Format: ``id: <seq>``, ``event: started | delta | finish | done | failed``, ``data: <the
event as JSON>`` (``config/contract/events.py``). The stream ends after ``done`` or ``failed``, or
with an ``error`` event; a comment line goes out every 10 s of silence so proxies keep it
open. Watching is passive: a watcher that disconnects does not cancel the job.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator

from flask import Response

from config.errors import NotFound, ServiceUnavailable
from config.tenants import ANY_OWNER
from tasks.jobs.record import JobRecord
from tasks.jobs.store import JobStore
from config.contract import events
from config.contract.protocol import events_log
from web.generation import client_watch
from tasks.core.relay import Tap

# Seconds a watcher of an ended job waits for its terminal event before re-reading the
# buffer (the worker records the end just before it publishes the last event).
SETTLE = 5
KEEPALIVE = 10


class EventsLost(Exception):
    pass


class Follower:
    """The events of one job, in order and once each, with sequence numbers above ``after``."""

    def __init__(self, jobs: JobStore, tap: Tap, job_id: str, after: int):
        self.jobs, self.tap, self.job_id = jobs, tap, job_id
        self.next = after + 1
        self.ended = False

    def events(self) -> Iterator[tuple[int, events.Event] | None]:
        """Events; ``None`` for each second in which nothing happened."""
        yield from self._from_buffer()
        quiet = 0
        while not self.ended:
            item = self.tap.next(timeout=1.0)
            if item is None:
                quiet += 1
                if quiet % SETTLE == 0:
                    yield from self._check_ended()
                yield None
                continue
            first, evs = item
            if first is None:
                raise EventsLost(evs[0].error["message"])
            if first > self.next:
                yield from self._from_buffer()  # a message went missing; the buffer has it
                continue
            for seq, ev in enumerate(evs, start=first):
                if seq == self.next:
                    yield self._accept(seq, ev)
                if self.ended:
                    return

    def _accept(self, seq: int, ev: events.Event) -> tuple[int, events.Event]:
        self.next = seq + 1
        self.ended = isinstance(ev, events.TERMINAL)
        return seq, ev

    def _from_buffer(self) -> Iterator[tuple[int, events.Event]]:
        for seq, ev in self.jobs.replay(self.job_id, self.next - 1):
            if seq > self.next:
                raise EventsLost(f"Events {self.next} to {seq - 1} of this job are no longer "
                                 "kept; GET the job for its result.")
            yield self._accept(seq, ev)
            if self.ended:
                return

    def _check_ended(self) -> Iterator[tuple[int, events.Event]]:
        record = self.jobs.get(self.job_id, owner=ANY_OWNER)  # the watcher may see it
        if record is not None and not record.done:
            return
        yield from self._from_buffer()
        if not self.ended:
            raise EventsLost("This job has ended, but its last events are no longer kept; "
                             "GET the job for its result.")


def stream(ferry, record: JobRecord, after: int) -> Response:
    if record.done and not ferry.relay.redis.exists(events_log(record.id)):
        raise NotFound(f"The events of job '{record.id}' are no longer kept (they are kept "
                       f"{int(ferry.jobs.events_ttl_ms / 1000)} s after its last one); GET "
                       "the job for its result.", code="events_expired")
    tap = ferry.relay.tap(record.id)  # subscribe first: see the module docstring
    follower = Follower(ferry.jobs, tap, record.id, after)
    return Response(_sse(follower, client_watch()), status=200, mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                             "X-Request-Id": record.id})


def _sse(follower: Follower, gone: Callable[[], bool]) -> Iterator[bytes]:
    idle = 0
    try:
        for item in follower.events():
            if item is None:
                idle += 1
                if gone():
                    return
                if idle % KEEPALIVE == 0:
                    yield b": keep-alive\n\n"
                continue
            idle = 0
            seq, ev = item
            data = json.dumps(dataclasses.asdict(ev), separators=(",", ":"))
            yield f"id: {seq}\nevent: {ev.t}\ndata: {data}\n\n".encode()
    except EventsLost as e:
        err = ServiceUnavailable(str(e), code="events_lost")
        yield f"event: error\ndata: {json.dumps({'error': err.to_dict()})}\n\n".encode()
    finally:
        follower.tap.close()
