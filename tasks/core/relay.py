"""Relays job events from Redis pub/sub to the requests waiting for them.

One pub/sub connection per web process, read by one greenlet, dispatches to per-request
queues: the number of Redis connections does not grow with the number of open streams.
The synchronous requests' jobs all publish on the process's own reply channel
(``protocol.reply_channel``, subscribed once; each message holds the events of several jobs,
by job id), so opening a stream sends Redis nothing. Watchers of ``/v1/jobs/{id}/events``
subscribe to the job's own channel while any of them is open.

Guarantees to a ``Subscription`` reader: the subscription is confirmed by Redis before
``subscribe`` returns (so the job may be enqueued safely: pub/sub drops what is published
before SUBSCRIBE); events arrive in order; a gap in sequence numbers, a lost Redis
connection, a dead worker or a job nobody picks up ends the stream with a ``Failed`` event.
Every subscription therefore ends with ``Done`` or ``Failed``.

A ``Tap`` promises less: the numbered messages published after it was confirmed, as they
come; its reader fills gaps from the job's replay buffer (see ``web/job_events.py``).
"""

from __future__ import annotations

import logging
import math
import time
import uuid

import gevent
import gevent.event
import gevent.queue
import redis as redis_lib

from config.errors import FerryError, ServiceUnavailable, WorkerLost
from config.settings import Settings
from config.tenants import ANY_OWNER
from tasks.jobs.store import JobStore
from config.contract import events
from config.contract.protocol import events_channel, reply_channel, workers_key
from tasks.core.timing import Timing

log = logging.getLogger(__name__)

# Seconds: a waiting ``Subscription.next(timeout)`` returns None within a tick after its
# timeout (the relay's one ticker wakes it), instead of arming a timer per wait.
TICK = 0.05


class _Listener:
    # Whether the watchdog fails it when its worker dies or it waits too long.
    watched = False

    def __init__(self, relay: "Relay", job_id: str, channel: str, key: str):
        self.relay, self.job_id = relay, job_id
        # The channel its events come on, and its key among the relay's listeners: the
        # channel for a tap, the job id for a subscription (on the shared reply channel).
        self.channel, self.key = channel, key
        self.confirmed = gevent.event.Event()
        self.finished = False
        self._q: gevent.queue.Queue = gevent.queue.Queue()

    def _deliver(self, first_seq: int, evs: list[events.Event]) -> None:
        raise NotImplementedError

    def _fail(self, err: FerryError) -> None:
        raise NotImplementedError

    def next(self, timeout: float | None = None):
        """The next item, or None if none arrived within ``timeout``."""
        try:
            if self._q.qsize():
                return self._q.get_nowait()  # no timer to arm and cancel
            return self._q.get(timeout=timeout)
        except gevent.queue.Empty:
            return None

    def pending(self) -> int:
        """Items waiting to be read (without blocking)."""
        return self._q.qsize()

    def close(self) -> None:
        self.relay._remove(self)

    def wait_confirmed(self, timeout: float = 5.0) -> None:
        """Block until Redis has confirmed the channel's subscription: from then on nothing
        published on it is missed. Closes the listener and raises 503 if it does not come."""
        if not self.confirmed.wait(timeout):
            self.close()
            raise ServiceUnavailable("Redis did not confirm the subscription in time.")


class Tap(_Listener):
    """Items are ``(first_seq, events)`` as published, or ``(None, [Failed])`` if the relay
    lost Redis; nothing is judged or reordered."""

    def _deliver(self, first_seq: int, evs: list[events.Event]) -> None:
        if not self.finished:
            self._q.put((first_seq, evs))

    def _fail(self, err: FerryError) -> None:
        if not self.finished:
            self.finished = True
            self._q.put((None, [events.failed(err)]))


class Subscription(_Listener):
    """The synchronous client's view of its job: ``next`` returns events in order."""

    watched = True

    def __init__(self, relay: "Relay", job_id: str, queue: str, model: str = ""):
        super().__init__(relay, job_id, relay.channel, job_id)
        self.queue = queue
        self.created = time.monotonic()
        self.worker: str | None = None
        # The worker whose own queue the job was sent to, and how to send it to the shared
        # queue instead (``reroute``).
        self.routed_to: str | None = None
        self._resend = None
        self.timing = Timing(model or queue)
        self._next_seq = 0
        self._idle_ticks = self._wake_after = 0
        self._on_close: list | None = []

    def next(self, timeout: float | None = None):
        """The next event, or None if none arrived within ``timeout`` (None up to a ``TICK``
        later). A stream waits between every two tokens: gevent's ``get(timeout)`` armed
        and cancelled a timer each time, ~7% of the web's CPU at 100 streams; the relay's
        ticker (``_tick_loop``) wakes only the subscriptions idle that long."""
        if self._q.qsize() or timeout is None:
            return super().next(timeout)
        self._idle_ticks, self._wake_after = 0, max(1, math.ceil(timeout / TICK))
        self.relay._waiting.add(self)
        try:
            return self._q.get()
        finally:
            self.relay._waiting.discard(self)

    def _tick(self) -> None:
        """One ``TICK`` passed while ``next`` waits: wake it with None once its timeout has.
        Only into an empty queue: an item there wakes it anyway, and a None behind an event
        would look like one more event pending."""
        self._idle_ticks += 1
        if self._idle_ticks > self._wake_after and not self._q.qsize():
            self._q.put(None)

    def reroute(self, worker: str, resend) -> None:
        """The job waits in ``worker``'s own queue: should that worker's heartbeat lapse
        before the job starts, the watchdog calls ``resend()`` once (the job's record lets
        only one of the two messages start it)."""
        self.routed_to, self._resend = worker, resend

    def on_close(self, callback) -> None:
        """Run ``callback()`` when the subscription closes (e.g. to release admission)."""
        self._on_close.append(callback)

    def close(self) -> None:
        if self._on_close is None:
            return
        super().close()
        self.timing.close()
        callbacks, self._on_close = self._on_close, None
        for callback in callbacks:
            callback()

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
                self.timing.done(ev)
            self._q.put(ev)
            if isinstance(ev, events.TERMINAL):
                self.finished = True
                return

    def _fail(self, err: FerryError) -> None:
        if not self.finished:
            self.finished = True
            self._q.put(events.failed(err))

    def cancel(self) -> None:
        """Ask the worker to stop (or never start) this job."""
        try:
            self.relay.jobs.cancel(self.job_id, owner=ANY_OWNER)  # the request's own job
        except redis_lib.RedisError as e:
            log.warning("could not cancel %s: %s", self.job_id, e)


class Relay:
    def __init__(self, settings: Settings, redis: redis_lib.Redis, jobs: JobStore):
        self.settings, self.redis, self.jobs = settings, redis, jobs
        # Listeners by key (``_Listener.key``).
        self._subs: dict[str, list[_Listener]] = {}
        # Named on first use: after gunicorn forked this process from its master.
        self._channel: str | None = None
        # Set while Redis has confirmed the reply channel's subscription on this connection.
        self._ready = gevent.event.Event()
        self._pubsub = None
        self._reader = None
        self._watchdog = None
        # Subscriptions blocked in ``next`` with a timeout, and the greenlet that ticks them.
        self._waiting: set[Subscription] = set()
        self._ticker = None

    # -- public ---------------------------------------------------------------------------

    def live_workers(self, queue: str) -> list[str]:
        now_ms = int(time.time() * 1000)
        return [w.decode() for w in self.redis.zrangebyscore(workers_key(queue), now_ms, "+inf")]

    def subscribe(self, job_id: str, queue: str, model: str = "", *,
                  wait: bool = True) -> Subscription:
        """``wait=False`` returns as soon as the SUBSCRIBE is sent: the caller may do other
        round trips while Redis confirms it, and must ``wait_confirmed()`` before anything
        can publish on the channel (before it enqueues the job)."""
        return self._add(Subscription(self, job_id, queue, model), wait)

    def tap(self, job_id: str) -> Tap:
        channel = events_channel(job_id)
        return self._add(Tap(self, job_id, channel, channel))

    @property
    def channel(self) -> str:
        """This process's reply channel: the ``reply_to`` of the jobs it submits."""
        if self._channel is None:
            self._channel = reply_channel(uuid.uuid4().hex)
        return self._channel

    @property
    def open_streams(self) -> int:
        return sum(len(subs) for subs in self._subs.values())

    # -- internals ------------------------------------------------------------------------

    def _ensure_running(self) -> None:
        if self._pubsub is None:
            self._ready.clear()
            self._pubsub = self.redis.pubsub()
            self._pubsub.subscribe(self.channel)
            self._pubsub.connection.register_connect_callback(self._reconnected)
        if self._reader is None or self._reader.dead:
            self._reader = gevent.spawn(self._read_loop)
        if self._watchdog is None or self._watchdog.dead:
            self._watchdog = gevent.spawn(self._watch_loop)
        if self._ticker is None or self._ticker.dead:
            self._ticker = gevent.spawn(self._tick_loop)

    def _add(self, listener, wait: bool = True):
        subs = self._subs.setdefault(listener.key, [])
        subs.append(listener)
        try:
            self._ensure_running()
            if listener.channel == self.channel:
                if self._ready.is_set():
                    listener.confirmed.set()  # else the reader sets it, once Redis confirms
            elif len(subs) == 1:
                self._pubsub.subscribe(listener.channel)
            elif any(s.confirmed.is_set() for s in subs):
                listener.confirmed.set()  # the channel is subscribed already
        except redis_lib.RedisError as e:
            listener.close()
            raise ServiceUnavailable(f"Redis is unreachable: {e}") from None
        if wait:
            listener.wait_confirmed()
        return listener

    def _remove(self, listener: _Listener) -> None:
        subs = self._subs.get(listener.key)
        if subs is None or listener not in subs:
            return
        subs.remove(listener)
        if subs:
            return
        del self._subs[listener.key]
        if self._pubsub is not None and listener.channel != self.channel:
            try:
                self._pubsub.unsubscribe(listener.channel)
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
                if channel == self.channel:
                    if msg["type"] == "message":
                        self._dispatch_routed(msg["data"])
                    elif msg["type"] == "subscribe":
                        self._confirm_replies()
                    continue
                subs = self._subs.get(channel)
                if not subs:
                    continue
                if msg["type"] == "subscribe":
                    for sub in subs:
                        sub.confirmed.set()
                elif msg["type"] == "message":
                    self._dispatch(subs, msg["data"])
        except (redis_lib.RedisError, OSError) as e:
            log.warning("relay lost Redis (%s); failing %d open streams", e, len(self._subs))
            self._pubsub = None
            self._ready.clear()
            for sub in [s for subs in self._subs.values() for s in subs]:
                sub._fail(ServiceUnavailable("The connection to Redis was lost mid-response."))
            try:
                # Its connection goes back to the pool, for plain commands: not ours to watch.
                if pubsub.connection is not None:
                    pubsub.connection.deregister_connect_callback(self._reconnected)
                pubsub.close()
            except Exception:
                pass

    def _reconnected(self, _connection) -> None:
        """redis-py reconnects a pub/sub connection by itself when Redis comes back within its
        retries, and subscribes its channels again; whatever was published meanwhile (a
        job's last tokens, its Done, a janitor's Failed) is gone. Every listener confirmed
        before the drop therefore fails now, as when the relay loses Redis for good; one
        still waiting for its confirmation gets it on the new connection. Called on the
        reader's greenlet (or a subscriber's) inside redis-py: no Redis call here."""
        self._ready.clear()  # until Redis confirms the channel again on the new connection
        dropped = [s for subs in self._subs.values() for s in subs if s.confirmed.is_set()]
        if dropped:
            log.warning("relay reconnected to Redis; failing %d open streams", len(dropped))
        for sub in dropped:
            sub._fail(ServiceUnavailable("The connection to Redis was lost mid-response."))

    def _confirm_replies(self) -> None:
        self._ready.set()
        for subs in list(self._subs.values()):
            for sub in subs:
                if sub.channel == self.channel:
                    sub.confirmed.set()

    def _dispatch_routed(self, data: bytes) -> None:
        """A message on the reply channel: batches of several jobs, each to its listeners."""
        try:
            batches = events.decode_routed(data)
        except (ValueError, KeyError, TypeError):
            # Whose events were lost is unknown: every stream on the channel may miss some.
            for subs in list(self._subs.values()):
                for sub in list(subs):
                    if sub.channel == self.channel:
                        sub._fail(ServiceUnavailable("A worker sent an unreadable event."))
            return
        for job_id, first, evs in batches:
            for sub in tuple(self._subs.get(job_id, ())):
                sub._deliver(first, evs)

    @staticmethod
    def _dispatch(subs: list[_Listener], data: bytes) -> None:
        try:
            first, evs = events.decode(data)
        except (ValueError, KeyError, TypeError):
            for sub in list(subs):
                sub._fail(ServiceUnavailable("A worker sent an unreadable event."))
            return
        for sub in list(subs):
            sub._deliver(first, evs)

    def _tick_loop(self) -> None:
        while True:
            gevent.sleep(TICK)
            for sub in list(self._waiting):
                sub._tick()

    def _watch_loop(self) -> None:
        """Fail requests whose worker died, and queued requests no live worker can take."""
        interval = min(1.0, self.settings.worker_timeout / 2)
        while True:
            gevent.sleep(interval)
            if not self._subs:
                continue
            now = time.monotonic()
            by_queue: dict[str, list[Subscription]] = {}
            for sub in [s for subs in self._subs.values() for s in subs]:
                if sub.watched and not sub.finished:
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
        if sub.worker is None and sub.routed_to is not None and sub.routed_to not in live:
            # Its message may be lost with the worker (taken by a BRPOP the worker never
            # read); the janitor moves it if it is still there.
            log.warning("job %s: its worker %s lapsed before it started; sent to %s",
                        sub.job_id, sub.routed_to, sub.queue)
            resend, sub.routed_to = sub._resend, None
            try:
                resend()
            except Exception as e:
                log.warning("could not resend %s: %s", sub.job_id, e)
        if sub.worker is not None:
            if sub.worker not in live:
                sub._fail(WorkerLost(f"The worker running this request ({sub.worker}) stopped "
                                     "responding."))
        elif not live and waited > self.settings.worker_timeout:
            self._give_up(sub, ServiceUnavailable("No worker is serving this model any more."))
        elif waited > self.settings.queue_timeout:
            self._give_up(sub, ServiceUnavailable("The request waited too long in the queue."))

    def _give_up(self, sub: Subscription, err: FerryError) -> None:
        """Fail a request that never started, and expire its job: nobody waits for it now.
        Failed first: the expiry's own ``expired`` event, read by the reader greenlet while
        this one waits on Redis, would otherwise overtake the reason."""
        sub._fail(err)
        try:
            self.jobs.expire(sub.job_id)
        except redis_lib.RedisError:
            pass
