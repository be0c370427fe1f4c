"""Relays job events from Redis pub/sub to the requests waiting for them.

One pub/sub connection per web process, read by one greenlet, dispatches to per-request
queues: the number of Redis connections does not grow with the number of open streams.

Guarantees to a ``Subscription`` reader: the subscription is confirmed by Redis before
``subscribe`` returns (so the job may be enqueued safely: pub/sub drops what is published
before SUBSCRIBE); events arrive in order; a gap in sequence numbers, a lost Redis
connection, a dead worker or a job nobody picks up ends the stream with a ``Failed`` event.
Every subscription therefore ends with ``Done`` or ``Failed``.
"""

from __future__ import annotations

import logging
import time

import gevent
import gevent.event
import gevent.queue
import redis as redis_lib

from config.errors import FerryError, ServiceUnavailable, WorkerLost
from config.settings import Settings
from models import events
from tasks.protocol import events_channel, request_cancel, workers_key
from web.metrics import Timing

log = logging.getLogger(__name__)


class Subscription:
    def __init__(self, relay: "Relay", job_id: str, queue: str, model: str = ""):
        self.relay, self.job_id, self.queue = relay, job_id, queue
        self.timing = Timing(model or queue)
        self.channel = events_channel(job_id)
        self.created = time.monotonic()
        self.worker: str | None = None
        self.confirmed = gevent.event.Event()
        self.finished = False
        self._q: gevent.queue.Queue = gevent.queue.Queue()
        self._next_seq = 0
        self._on_close: list = []

    def on_close(self, callback) -> None:
        """Run ``callback()`` when the subscription closes (e.g. to release admission)."""
        self._on_close.append(callback)

    def _deliver(self, first_seq: int, evs: list[events.Event]) -> None:
        if self.finished:
            return
        if first_seq != self._next_seq:
            self._fail(ServiceUnavailable(f"Lost {first_seq - self._next_seq} events of this "
                                          "response between worker and web."))
            return
        self._next_seq = first_seq + len(evs)
        if any(isinstance(ev, events.Delta) and ev.text for ev in evs):
            self.timing.tokens()
        for ev in evs:
            if isinstance(ev, events.Started):
                self.worker = ev.worker
            elif isinstance(ev, events.Done):
                self.timing.done(ev.completion_tokens)
            self._q.put(ev)
            if isinstance(ev, events.TERMINAL):
                self.finished = True
                return

    def _fail(self, err: FerryError) -> None:
        if not self.finished:
            self.finished = True
            self._q.put(events.failed(err))

    def next(self, timeout: float | None = None) -> events.Event | None:
        """The next event, or None if none arrived within ``timeout``."""
        try:
            return self._q.get(timeout=timeout)
        except gevent.queue.Empty:
            return None

    def cancel(self) -> None:
        """Ask the worker to stop (or never start) this job."""
        try:
            request_cancel(self.relay.redis, self.job_id)
        except redis_lib.RedisError as e:
            log.warning("could not cancel %s: %s", self.job_id, e)

    def close(self) -> None:
        if self._on_close is None:
            return
        self.relay._unsubscribe(self)
        self.timing.close()
        callbacks, self._on_close = self._on_close, None
        for callback in callbacks:
            callback()


class Relay:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.redis = redis_lib.Redis.from_url(settings.redis_url, socket_timeout=10,
                                              socket_connect_timeout=5)
        self._subs: dict[str, Subscription] = {}
        self._pubsub = None
        self._reader = None
        self._watchdog = None

    # -- public ---------------------------------------------------------------------------

    def live_workers(self, queue: str) -> list[str]:
        now_ms = int(time.time() * 1000)
        return [w.decode() for w in self.redis.zrangebyscore(workers_key(queue), now_ms, "+inf")]

    def subscribe(self, job_id: str, queue: str, model: str = "") -> Subscription:
        sub = Subscription(self, job_id, queue, model)
        self._subs[sub.channel] = sub
        try:
            self._ensure_running()
            self._pubsub.subscribe(sub.channel)
        except redis_lib.RedisError as e:
            sub.close()
            raise ServiceUnavailable(f"Redis is unreachable: {e}") from None
        if not sub.confirmed.wait(5):
            sub.close()
            raise ServiceUnavailable("Redis did not confirm the subscription in time.")
        return sub

    @property
    def open_streams(self) -> int:
        return len(self._subs)

    # -- internals ------------------------------------------------------------------------

    def _ensure_running(self) -> None:
        if self._pubsub is None:
            self._pubsub = self.redis.pubsub()
            # Subscribe once to something so that the reader has a connection to block on.
            self._pubsub.subscribe("ferry:relay")
        if self._reader is None or self._reader.dead:
            self._reader = gevent.spawn(self._read_loop)
        if self._watchdog is None or self._watchdog.dead:
            self._watchdog = gevent.spawn(self._watch_loop)

    def _unsubscribe(self, sub: Subscription) -> None:
        if self._subs.pop(sub.channel, None) is not None and self._pubsub is not None:
            try:
                self._pubsub.unsubscribe(sub.channel)
            except redis_lib.RedisError:
                pass

    def _read_loop(self) -> None:
        pubsub = self._pubsub
        try:
            while True:
                msg = pubsub.get_message(timeout=1.0)
                if msg is None:
                    continue
                channel = msg["channel"].decode()
                sub = self._subs.get(channel)
                if sub is None:
                    continue
                if msg["type"] == "subscribe":
                    sub.confirmed.set()
                elif msg["type"] == "message":
                    try:
                        first, evs = events.decode(msg["data"])
                    except (ValueError, KeyError, TypeError):
                        sub._fail(ServiceUnavailable("A worker sent an unreadable event."))
                        continue
                    sub._deliver(first, evs)
        except (redis_lib.RedisError, OSError) as e:
            log.warning("relay lost Redis (%s); failing %d open streams", e, len(self._subs))
            self._pubsub = None
            for sub in list(self._subs.values()):
                sub._fail(ServiceUnavailable("The connection to Redis was lost mid-response."))
            try:
                pubsub.close()
            except Exception:
                pass

    def _watch_loop(self) -> None:
        """Fail requests whose worker died, and queued requests no live worker can take."""
        interval = min(1.0, self.settings.worker_timeout / 2)
        while True:
            gevent.sleep(interval)
            if not self._subs:
                continue
            now = time.monotonic()
            by_queue: dict[str, list[Subscription]] = {}
            for sub in list(self._subs.values()):
                if not sub.finished:
                    by_queue.setdefault(sub.queue, []).append(sub)
            for queue, subs in by_queue.items():
                try:
                    live = set(self.live_workers(queue))
                except redis_lib.RedisError:
                    continue  # the reader fails the streams if Redis is really gone
                for sub in subs:
                    self._check(sub, live, now)

    def _check(self, sub: Subscription, live: set[str], now: float) -> None:
        waited = now - sub.created
        if sub.worker is not None:
            if sub.worker not in live:
                sub._fail(WorkerLost(f"The worker running this request ({sub.worker}) stopped "
                                     "responding."))
        elif not live and waited > self.settings.worker_timeout:
            sub._fail(ServiceUnavailable("No worker is serving this model any more."))
        elif waited > self.settings.queue_timeout:
            sub.cancel()
            sub._fail(ServiceUnavailable("The request waited too long in the queue."))
