"""Publishes job events from a worker: a few ms of every job's events in one round trip.

``put`` never blocks on Redis, nor on a lock: events go to an in-process queue (a deque,
whose append and popleft are atomic under real threads and greenlets alike) that one
thread drains. A drain waits up to ``window_s`` for more events (unless one must go at once:
a job's first delta, so the first token is never held, and every event that is not a delta:
start, end, error), or until one job holds ``window_tokens`` tokens. Then each job's
consecutive deltas become one (``events.coalesce``), numbered, and everything goes in one
script call:

- per job, its message appended to its replay buffer (a capped list with a TTL), *before*
  it is published: a watcher that subscribes and then reads the buffer misses nothing;
- per job, a PUBLISH on its own channel, for its watchers (``/v1/jobs/{id}/events``);
- per web process that waits for some of the jobs (``reply_to``), one PUBLISH holding all
  their batches, a line each (``events.encode_routed``).

The buffer's TTL is pushed forward on a job's first message, its last, and every half TTL
between: not with every token.

The script call goes over a connection of the publisher's own (``_Link``), packed here, and
its reply is read a window later, just before the next drain is sent: redis-py's generic
command path (pool, retry wrapper, per-argument packing) and a gevent wait for each reply
cost the worker more CPU than everything else it does per token. A job's events still go
in order (one drain in flight at most), and ``flush`` waits for Redis's reply.

A drain that finds Redis unreachable or loading (restarted) is sent again, with back-off,
for up to ``retry_s``: a script runs whole or not at all, so a failed send leaves no half of
a drain behind, and the job's buffer still ends with its terminal event once Redis is back.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import threading
import time
from dataclasses import dataclass

import redis as redis_lib

from config.contract import events
from config.contract.protocol import events_channel, events_log, own_connection

log = logging.getLogger(__name__)

Delta, ToolCallDelta, TERMINAL = events.Delta, events.ToolCallDelta, events.TERMINAL

# One drain in one call. KEYS: the jobs' replay buffers. ARGV: buffer cap, buffer TTL
# (ms), then per job (in KEYS' order) three: "1" to push its buffer's TTL forward (else
# "0"), its channel, its message; then per reply channel two: its name, its message.
# Arguments, not lines to split in Lua: Redis parses them in C, and a pattern match per job
# cost the script more than the RPUSH.
# A buffer is trimmed back to its cap (ARGV[1] messages) once it holds a sixteenth more, as
# XADD's MAXLEN ~ let a stream overshoot by a node. Redis's time per job's message, at the
# cap: 16-20 µs with an LTRIM per push, 12-13 with one per 625 (XADD: 18-22); below the
# cap 9-10 (XADD: 11-12); Redis 6.2, 150-byte messages, 10 jobs per call.
_SEND = """
local n, max = #KEYS, tonumber(ARGV[1])
local over = max + math.floor(max / 16)
for i = 1, n do
  local a = 3 * i
  if redis.call('RPUSH', KEYS[i], ARGV[a + 2]) > over then
    redis.call('LTRIM', KEYS[i], -max, -1)
  end
  if ARGV[a] == '1' then redis.call('PEXPIRE', KEYS[i], ARGV[2]) end
  redis.call('PUBLISH', ARGV[a + 1], ARGV[a + 2])
end
for k = 3 * n + 3, #ARGV, 2 do
  redis.call('PUBLISH', ARGV[k], ARGV[k + 1])
end
"""


def pack(*args: bytes) -> bytes:
    """A command in RESP (the protocol's array of bulk strings)."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        out += (b"$%d\r\n" % len(a), a, b"\r\n")
    return b"".join(out)


class _Link:
    """The publisher's own connection, made like the client's (address, auth, protocol,
    health checks), used by the sending thread alone.

    A drain is sent without waiting for its reply (``send``); the reply is read by the next
    ``confirm``, which the publisher calls before it sends the next drain, a window later,
    when the reply is there already: waiting for each reply cost a gevent worker more CPU
    than the rest of the drain. So at most one drain is in flight, and one whose reply did
    not come (the connection broke) is sent again by the next ``confirm``, on a new
    connection, as redis-py would have resent it. The script is sent by its SHA1, and
    loaded when Redis does not know it (it forgets scripts when it restarts)."""

    def __init__(self, redis, script: str):
        self._conn = own_connection(redis, client_name="ferry-publisher")
        self._script = script.encode()
        self._sha = hashlib.sha1(self._script).hexdigest().encode()
        self._in_flight: bytes | None = None  # the drain whose reply is not read yet
        self._lost = False                    # ...and whose send must be done again

    def load(self) -> None:
        self._conn.send_packed_command([pack(b"SCRIPT", b"LOAD", self._script)])
        self._conn.read_response()

    def send(self, keys: list[bytes], args: list[bytes]) -> None:
        """Send a script call; only after ``confirm`` (one drain in flight at most)."""
        assert self._in_flight is None
        self._in_flight, self._lost = pack(b"EVALSHA", self._sha, b"%d" % len(keys),
                                           *keys, *args), True
        self._conn.send_packed_command([self._in_flight])
        self._lost = False

    def confirm(self) -> None:
        """Read the reply of the drain in flight (sending it again first if it was lost).
        Raises what the call raised; on a connection error it stays in flight."""
        if self._in_flight is None:
            return
        try:
            if self._lost:
                self._conn.send_packed_command([self._in_flight])
                self._lost = False
            try:
                self._conn.read_response()
            except redis_lib.exceptions.NoScriptError:
                self.load()
                self._conn.send_packed_command([self._in_flight])
                self._conn.read_response()
        except redis_lib.ConnectionError:
            self._lost = True  # redis-py closed the connection; the next send opens one
            raise
        except BaseException:
            self._in_flight = None
            raise
        self._in_flight = None

    @property
    def in_flight(self) -> bool:
        return self._in_flight is not None

    def drop(self) -> None:
        self._in_flight, self._lost = None, False

    def close(self) -> None:
        self._conn.disconnect()


@dataclass
class _Job:
    reply_to: str | None
    log_key: bytes
    channel: bytes
    seq: int = 0             # the number of the next event sent
    expire_due: float = 0.0  # when the buffer's TTL must be pushed forward again


class Publisher:
    def __init__(self, redis, *, log_max: int, log_ttl_ms: int, retry_s: float = 0.0,
                 window_s: float = 0.0, window_tokens: int = 16):
        self.retry_s = retry_s
        self.log_ttl_ms = log_ttl_ms
        self._head = [b"%d" % log_max, b"%d" % log_ttl_ms]
        self.window_s, self.window_tokens = window_s, window_tokens
        # (job id, event, reply_to), or a flush's Event. Appended by any task thread, taken
        # by the sending thread: no lock (deque's append and popleft are atomic).
        self._queue: collections.deque = collections.deque()
        # Written by ``put`` without a lock, cleared by the drain: a count that races with
        # the clear is only ever too high, which makes a drain come early, never late.
        self._held: dict[str, int] = {}   # tokens queued per job since the last drain
        self._spoke: set[str] = set()     # jobs whose first delta was queued
        # ``_any``: something is queued; ``_now``: something must go without waiting for
        # the window. A put appends *before* it looks at ``_any``, and the drain clears
        # ``_any`` *before* it takes, and looks at the queue before it waits for ``_any``:
        # a put that finds ``_any`` set is taken by a drain to come.
        self._any, self._now = threading.Event(), threading.Event()
        self._jobs: dict[str, _Job] = {}  # only the sending thread touches it
        self._link = _Link(redis, _SEND)
        try:
            # Loaded now, while nothing waits: a job's first events would otherwise pay the
            # NOSCRIPT round trip.
            self._link.load()
        except redis_lib.RedisError:
            self._link.close()
        self._thread = threading.Thread(target=self._run, name="ferry-publisher", daemon=True)
        self._thread.start()

    def put(self, job_id: str, event: events.Event, reply_to: str | None = None) -> None:
        """Queue ``event``; ``reply_to``: the web process's channel waiting for the job.
        A delta that may wait wakes nobody: a drain takes it within the window."""
        self._queue.append((job_id, event, reply_to))
        if self._urgent(job_id, event):
            self._now.set()
        if not self._any.is_set():
            self._any.set()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything put so far has been sent (or given up on)."""
        done = threading.Event()
        self._queue.append(done)
        self._now.set()
        self._any.set()
        return done.wait(timeout)

    def _urgent(self, job_id: str, event: events.Event) -> bool:
        """Whether ``event`` must go at once. A job's events are put by one thread, so its
        entries in ``_spoke`` and ``_held`` have one writer besides the drain's clear."""
        kind = type(event)
        if kind is not Delta and kind is not ToolCallDelta:
            if kind in TERMINAL:
                self._spoke.discard(job_id)
            return True
        if job_id not in self._spoke:
            if not getattr(event, "prompt", False):  # an echo is not the first token
                self._spoke.add(job_id)
            return True
        held = self._held[job_id] = self._held.get(job_id, 0) + event.tokens
        return held >= self.window_tokens

    def _run(self) -> None:
        queue, jobs = self._queue, self._jobs
        while True:
            # Idle (nothing queued, nothing in flight): sleep until a put. Otherwise a drain
            # every window: one wait per drain, and a drain in flight is confirmed a window
            # after it was sent even if nothing follows it (so one that was lost is sent
            # again soon, not when the next event comes).
            if not queue and not self._link.in_flight:
                self._any.wait()
            self._now.wait(self.window_s)
            self._any.clear()
            self._now.clear()
            self._held.clear()
            batches: dict[str, list[events.Event]] = {}
            flushes = []
            for _ in range(len(queue)):
                item = queue.popleft()
                if type(item) is not tuple:
                    flushes.append(item)
                    continue
                job_id, event, reply_to = item
                batch = batches.get(job_id)
                if batch is None:
                    batch = batches[job_id] = []
                    if job_id not in jobs:
                        jobs[job_id] = _Job(reply_to, events_log(job_id).encode(),
                                            events_channel(job_id).encode())
                batch.append(event)
            if batches or flushes or self._link.in_flight:
                self._send(batches, wait=bool(flushes))
            for f in flushes:
                f.set()

    def _send(self, batches: dict[str, list[events.Event]], wait: bool) -> None:
        """Send the drain; with ``wait``, until Redis confirmed it (a flush)."""
        now = time.monotonic()
        keys, args, routed = [], list(self._head), {}
        for job_id, evs in batches.items():
            job = self._jobs[job_id]
            if len(evs) > 1:
                evs = events.coalesce(evs)
            first = job.seq
            message = events.encode(first, evs)
            job.seq = first + len(evs)
            ended = type(evs[-1]) in TERMINAL
            expire = ended or now >= job.expire_due
            if expire:
                job.expire_due = now + self.log_ttl_ms / 2000
            if ended:
                del self._jobs[job_id]
            keys.append(job.log_key)
            args += (b"1" if expire else b"0", job.channel, message.encode())
            if job.reply_to:
                routed.setdefault(job.reply_to, []).append(
                    events.routed(job_id, first, evs, message))
        for channel, lines in routed.items():
            args += (channel.encode(), events.encode_routed(lines).encode())
        self._deliver(keys, args, len(batches), wait)

    def _deliver(self, keys: list[bytes], args: list[bytes], jobs: int, wait: bool) -> None:
        """Confirm the drain in flight, then send this one (if it has jobs); with ``wait``,
        confirm it too. Retried on connection errors, with back-off, for up to ``retry_s``;
        the first retry goes at once, on a new connection (the one in hand may simply be
        stale: Redis restarted since the last drain)."""
        give_up, pause = time.monotonic() + self.retry_s, 0.0
        while True:
            try:
                self._link.confirm()
                if keys:
                    sending, keys = keys, []
                    self._link.send(sending, args)
                if wait:
                    self._link.confirm()
                return
            except redis_lib.ConnectionError as e:  # down, or loading its data (restarted)
                if time.monotonic() + pause > give_up:
                    log.error("could not publish events (%d jobs): %s", jobs, e)
                    self._link.drop()
                    return
                if pause:
                    log.warning("publishing events (%d jobs): %s; retrying", jobs, e)
                    time.sleep(pause)
                # Capped low: the buffer should be written soon after Redis is back, before
                # the runtime's end write (backing off to 2 s) makes watchers read it.
                pause = min(max(pause * 2, 0.2), 0.5)
            except Exception:
                # The web side notices the gap (or the dead connection) and fails the request.
                log.exception("could not publish events (%d jobs)", jobs)
                self._link.drop()
                if not keys:
                    return
