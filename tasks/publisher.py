"""Publishes job events from a worker: a few ms of every job's events in one round trip.

``put`` never blocks on Redis: events go to an in-process queue that one thread drains. A
drain waits up to ``window_s`` for more events (unless one must go at once: a job's first
delta, so the first token is never held, and every event that is not a delta: start, end,
error), or until one job holds ``window_tokens`` tokens. Then each job's consecutive deltas
become one (``events.coalesce``), numbered, and everything goes in one script call:

- per job, its message appended to its replay buffer (a capped stream with a TTL), *before*
  it is published: a watcher that subscribes and then reads the buffer misses nothing;
- per job, a PUBLISH on its own channel, for its watchers (``/v1/jobs/{id}/events``);
- per web process that waits for some of the jobs (``reply_to``), one PUBLISH holding all
  their messages (``events.encode_routed``).

The buffer's TTL is pushed forward on a job's first message, its last, and every half TTL
between: not with every token.

A drain that finds Redis unreachable or loading (restarted) is sent again, with back-off,
for up to ``retry_s``: a script runs whole or not at all, so a failed send leaves no half of
a drain behind, and the job's buffer still ends with its terminal event once Redis is back.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import redis as redis_lib

from config.contract import events
from config.contract.protocol import events_channel, events_log

log = logging.getLogger(__name__)

_DELTAS = (events.Delta, events.ToolCallDelta)

# One drain in one call, its jobs' messages in one argument: packing a pipeline of three
# commands per job (redis-py's pack, per argument) cost the worker more CPU than all the rest
# of its work per token. ARGV: buffer length, buffer TTL (ms), the prefixes of a job's buffer
# and channel names, the jobs as lines of "<1 to push the TTL forward, else 0>\t<job id>\t
# <message>" (JSON has no raw tab or newline), then per reply channel its name and message.
# Job keys are named in the script, as in tasks/jobs/store.py's (single-instance Redis).
_SEND = """
for line in string.gmatch(ARGV[5], '[^\\n]+') do
  local expire, id, message = string.match(line, '^(%d)\\t([^\\t]+)\\t(.*)$')
  local buffer = ARGV[3] .. id
  redis.call('XADD', buffer, 'MAXLEN', '~', ARGV[1], '*', 'm', message)
  if expire == '1' then redis.call('PEXPIRE', buffer, ARGV[2]) end
  redis.call('PUBLISH', ARGV[4] .. id, message)
end
for k = 6, #ARGV, 2 do
  redis.call('PUBLISH', ARGV[k], ARGV[k + 1])
end
"""


@dataclass
class _Job:
    reply_to: str | None
    seq: int = 0             # the number of the next event sent
    expire_due: float = 0.0  # when the buffer's TTL must be pushed forward again


class Publisher:
    def __init__(self, redis, *, log_max: int, log_ttl_ms: int, retry_s: float = 0.0,
                 window_s: float = 0.0, window_tokens: int = 16):
        self.redis, self.retry_s = redis, retry_s
        self.log_max, self.log_ttl_ms = log_max, log_ttl_ms
        self.window_s, self.window_tokens = window_s, window_tokens
        # Guards the queue and the counts beside it (``put`` runs on any task thread).
        self._lock = threading.Lock()
        self._items: list = []
        self._held: dict[str, int] = {}   # tokens queued per job since the last drain
        self._spoke: set[str] = set()     # jobs whose first delta was queued
        # ``_any``: something is queued (set by the put that finds the queue empty);
        # ``_now``: something must go without waiting for the window.
        self._any, self._now = threading.Event(), threading.Event()
        self._jobs: dict[str, _Job] = {}  # only the sending thread touches it
        self._script = redis.register_script(_SEND)
        try:
            # Loaded now, while nothing waits: a job's first events would otherwise pay the
            # NOSCRIPT round trips (Redis forgets scripts when it restarts; redis-py then
            # loads it again by itself).
            self._script.sha = redis.script_load(_SEND)
        except redis_lib.RedisError:
            pass
        self._thread = threading.Thread(target=self._run, name="ferry-publisher", daemon=True)
        self._thread.start()

    def put(self, job_id: str, event: events.Event, reply_to: str | None = None) -> None:
        """Queue ``event``; ``reply_to``: the web process's channel waiting for the job.
        A delta that may wait wakes nobody: a drain takes it within the window."""
        with self._lock:
            was_empty = not self._items
            self._items.append((job_id, event, reply_to))
            now = self._urgent(job_id, event)
        if now:
            self._now.set()
        if was_empty:
            self._any.set()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything put so far has been sent (or given up on)."""
        done = threading.Event()
        with self._lock:
            self._items.append(done)
        self._now.set()
        self._any.set()
        return done.wait(timeout)

    def _urgent(self, job_id: str, event: events.Event) -> bool:
        """Whether ``event`` must go at once (called under the lock)."""
        if not isinstance(event, _DELTAS):
            if isinstance(event, events.TERMINAL):
                self._spoke.discard(job_id)
            return True
        if job_id not in self._spoke:
            if not getattr(event, "prompt", False):  # an echo is not the first token
                self._spoke.add(job_id)
            return True
        held = self._held[job_id] = self._held.get(job_id, 0) + event.tokens
        return held >= self.window_tokens

    def _run(self) -> None:
        while True:
            self._any.wait()
            self._now.wait(self.window_s)
            self._any.clear()
            self._now.clear()
            with self._lock:
                items, self._items = self._items, []
                self._held.clear()
            batches: dict[str, list[events.Event]] = {}
            flushes = []
            for item in items:
                if isinstance(item, threading.Event):
                    flushes.append(item)
                    continue
                job_id, event, reply_to = item
                if job_id not in self._jobs:
                    self._jobs[job_id] = _Job(reply_to)
                batches.setdefault(job_id, []).append(event)
            if batches:
                self._send(batches)
            for f in flushes:
                f.set()

    def _send(self, batches: dict[str, list[events.Event]]) -> None:
        now = time.monotonic()
        lines, routed = [], {}
        for job_id, evs in batches.items():
            job = self._jobs[job_id]
            evs = events.coalesce(evs)
            message = events.encode(job.seq, evs)
            job.seq += len(evs)
            ended = isinstance(evs[-1], events.TERMINAL)
            expire = ended or now >= job.expire_due
            if expire:
                job.expire_due = now + self.log_ttl_ms / 2000
            if ended:
                del self._jobs[job_id]
            lines.append(f"{1 if expire else 0}\t{job_id}\t{message}")
            if job.reply_to:
                routed.setdefault(job.reply_to, []).append((job_id, message))
        args = [self.log_max, self.log_ttl_ms, events_log(""), events_channel(""),
                "\n".join(lines)]
        for channel, messages in routed.items():
            args += [channel, events.encode_routed(messages)]
        give_up, pause = time.monotonic() + self.retry_s, 0.2
        while True:
            try:
                self._script(args=args)
                return
            except redis_lib.ConnectionError as e:  # down, or loading its data (restarted)
                if time.monotonic() + pause > give_up:
                    log.error("could not publish events for %d jobs: %s", len(batches), e)
                    return
                log.warning("publishing events for %d jobs: %s; retrying", len(batches), e)
                time.sleep(pause)
                # Capped low: the buffer should be written soon after Redis is back, before
                # the runtime's end write (backing off to 2 s) makes watchers read it.
                pause = min(pause * 2, 0.5)
            except Exception:
                # The web side notices the gap (or the dead connection) and fails the request.
                log.exception("could not publish events for %d jobs", len(batches))
                return
