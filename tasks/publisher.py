"""Publishes job events from a worker, batching when Redis is slower than the model.

``put`` never blocks on Redis: events go to an in-process queue that one thread drains. Each
drain sends, per channel, one message holding every event queued so far, in a single
pipeline; so a fast token source costs one PUBLISH per drain, not one per token.

Each message is also appended to the job's replay buffer (a capped stream with a TTL) in the
same pipeline, *before* it is published: a watcher that subscribes and then reads the buffer
misses nothing (what was published before it subscribed is already in the buffer).

A drain that finds Redis unreachable or loading (restarted) is sent again, with back-off,
for up to ``retry_s``: its commands are one MULTI/EXEC, so a retry never appends twice, and
the job's buffer still ends with its terminal event once Redis is back.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict

import redis as redis_lib

from config.contract import events
from config.contract.protocol import events_channel, events_log

log = logging.getLogger(__name__)


class Publisher:
    def __init__(self, redis, *, log_max: int, log_ttl_ms: int, retry_s: float = 0.0):
        self.redis, self.retry_s = redis, retry_s
        self.log_max, self.log_ttl_ms = log_max, log_ttl_ms
        self._q: queue.Queue = queue.Queue()
        self._seq: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="ferry-publisher", daemon=True)
        self._thread.start()

    def put(self, job_id: str, event: events.Event) -> None:
        with self._lock:
            seq = self._seq[job_id]
            self._seq[job_id] = seq + 1
            if isinstance(event, events.TERMINAL):
                del self._seq[job_id]
        self._q.put((job_id, seq, event))

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything put so far has been sent (or given up on)."""
        done = threading.Event()
        self._q.put(done)
        return done.wait(timeout)

    def _run(self) -> None:
        while True:
            items = [self._q.get()]
            while True:
                try:
                    items.append(self._q.get_nowait())
                except queue.Empty:
                    break
            batches: dict[str, tuple[int, list]] = {}
            flushes = []
            for item in items:
                if isinstance(item, threading.Event):
                    flushes.append(item)
                    continue
                job_id, seq, event = item
                batches.setdefault(job_id, (seq, []))[1].append(event)
            if batches:
                self._send(batches)
            for f in flushes:
                f.set()

    def _send(self, batches) -> None:
        messages = [(job_id, events.encode(first, evs))
                    for job_id, (first, evs) in batches.items()]
        give_up, pause = time.monotonic() + self.retry_s, 0.2
        while True:
            # Built anew each try: a pipeline forgets its commands when it executes.
            pipe = self.redis.pipeline(transaction=True)
            for job_id, message in messages:
                pipe.xadd(events_log(job_id), {"m": message}, maxlen=self.log_max,
                          approximate=True)
                pipe.pexpire(events_log(job_id), self.log_ttl_ms)
                pipe.publish(events_channel(job_id), message)
            try:
                pipe.execute()
                return
            except redis_lib.ConnectionError as e:  # down, or loading its data (restarted)
                if time.monotonic() + pause > give_up:
                    log.error("could not publish events for %d jobs: %s", len(batches), e)
                    return
                log.warning("publishing events for %d jobs: %s; retrying", len(batches), e)
                time.sleep(pause)
                pause = min(pause * 2, 2.0)
            except Exception:
                # The web side notices the gap (or the dead connection) and fails the request.
                log.exception("could not publish events for %d jobs", len(batches))
                return
