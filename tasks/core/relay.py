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
from config.contract.protocol import events_channel, own_connection, reply_channel, workers_key
from tasks.core.timing import Timing

log = logging.getLogger(__name__)

# Seconds: a waiting ``Subscription.next(timeout)`` returns None within a tick after its
# timeout (the relay's one ticker wakes it), instead of arming a timer per wait.
TICK = 0.05


class _Line:
    """The relay's pub/sub connection to Redis, read without redis-py's per-message layers
    (its ``get_message`` cost ~40 µs a message, several times the parse): redis-py opens it
    (address, TLS, password, protocol), then the reader greenlet reads its socket and parses
    what pub/sub sends (``_Frames``); SUBSCRIBE and UNSUBSCRIBE go out on it as commands.
    No reconnection: when it breaks, the relay fails its streams and opens a new one."""

    def __init__(self, redis: redis_lib.Redis):
        self.conn = own_connection(redis)
        self.conn.connect()
        self.sock = self.conn._sock
        self.sock.settimeout(None)  # it waits for messages as long as none come
        self.frames = _Frames()

    def subscribe(self, channel: str) -> None:
        self._send("SUBSCRIBE", channel)

    def unsubscribe(self, channel: str) -> None:
        self._send("UNSUBSCRIBE", channel)

    def _send(self, *args: str) -> None:
        # No health check: it would read the PING's reply off this socket, which only the
        # reader reads (a URL may set ``health_check_interval``).
        self.conn.send_packed_command(self.conn.pack_command(*args), check_health=False)

    def read(self) -> list:
        """The next frames (waiting for at least one chunk of bytes)."""
        # 64 KiB: with 256 KiB (allocated whole for every read, then shrunk) a read of a
        # few KiB cost ~25 µs more here.
        data = self.sock.recv(1 << 16)
        if not data:
            raise ConnectionError("Redis closed the connection")
        return self.frames.feed(data)

    def close(self) -> None:
        try:
            self.conn.disconnect()
        except Exception:
            pass


class _Frames:
    """RESP frames out of a byte stream, as pub/sub sends them: arrays (RESP2) or pushes
    (RESP3) of bulk strings and integers; a simple string, an error or a null as one value."""

    def __init__(self):
        self._rest = b""

    def feed(self, data: bytes) -> list:
        buf = self._rest + data if self._rest else data
        out, pos, n = [], 0, len(buf)
        while pos < n:
            item, end = _frame(buf, pos)
            if end < 0:
                break
            out.append(item)
            pos = end
        self._rest = buf[pos:]
        return out


def _frame(buf: bytes, pos: int) -> tuple[object, int]:
    """The frame at ``pos`` and where it ends, or ``(None, -1)`` if it is not all there."""
    nl = buf.find(b"\r\n", pos)
    if nl < 0:
        return None, -1
    kind, head = buf[pos], buf[pos + 1:nl]
    if kind == 0x24:  # $ bulk string
        size = int(head)
        if size < 0:
            return None, nl + 2
        end = nl + 2 + size
        if end + 2 > len(buf):
            return None, -1
        return buf[nl + 2:end], end + 2
    if kind in (0x2A, 0x3E):  # * array, > push
        items, at = [], nl + 2
        for _ in range(int(head)):
            item, at = _frame(buf, at)
            if at < 0:
                return None, -1
            items.append(item)
        return items, at
    if kind == 0x3A:  # : integer
        return int(head), nl + 2
    if kind in (0x2B, 0x2D, 0x5F):  # + simple string, - error, _ null
        return head, nl + 2
    raise ValueError(f"unexpected RESP frame type {chr(kind)!r} from Redis")


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
        self._sink = None
        # The job's terminal event came from Redis: a script ended the job (the worker's
        # ``JobStore.finish``, or ``_END`` for a job its worker will not end), and freed its
        # in-flight places there. A failure this process makes up does not set it.
        self.ended = False

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

    def divert(self, sink) -> None:
        """Hand the events that arrive from now on to ``sink.take(evs)``, on the reader
        greenlet, instead of queueing them; ``None`` ends that. ``take`` returns how many of
        them it took, in order, and must not switch greenlets (it runs between two reads of
        the relay's one connection); a token's text as the channel carried it
        (``events.WireText``) goes to ``sink.take_text(text)`` first, which says whether it
        took it, else to ``take`` as a ``Delta``. Only while nothing is queued, so order holds: the first
        event it does not take, and everything after it, is queued as usual, and the diversion
        ends with ``sink.release()``; so does a failure (``Failed`` is queued) or ``close``.
        This is how a stream's tokens go from Redis to its client's socket without waking
        the request's greenlet (``web/generation.py``)."""
        if sink is not None and self._q.qsize():
            raise RuntimeError("divert() while events are queued")
        self._sink = sink

    def _undivert(self) -> None:
        sink, self._sink = self._sink, None
        if sink is not None:
            sink.release()

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
        self._undivert()
        super().close()
        self.timing.close()
        callbacks, self._on_close = self._on_close, None
        for callback in callbacks:
            callback()

    def _deliver(self, first_seq: int, evs: "list[events.Event] | events.WireText") -> None:
        if self.finished:
            return
        if type(evs) is events.WireText:
            # A token's text, as its stream's chunk holds it: written so when the stream is
            # diverted and its dialect takes it (no Delta is made), else decoded.
            if self._sink is not None and first_seq == self._next_seq:
                try:
                    taken = self._sink.take_text(evs)
                except Exception:
                    log.exception("job %s: a stream's sink failed", self.job_id)
                    taken = False
                if taken:
                    self._next_seq = first_seq + 1
                    self.timing.tokens()
                    return
            evs = evs.events()
        if first_seq < self._next_seq:
            # A drain its worker sent again (the reply to the first send was lost with its
            # connection): what was seen already is dropped.
            evs = evs[self._next_seq - first_seq:]
            if not evs:
                return
            first_seq = self._next_seq
        if first_seq != self._next_seq:
            self._fail(ServiceUnavailable(f"Lost {first_seq - self._next_seq} events of this "
                                          "response between worker and web."))
            return
        self._next_seq = first_seq + len(evs)
        if type(evs[-1]) in events.TERMINAL:
            self.ended = True
        for ev in evs:
            if type(ev) is events.Delta and ev.text:
                self.timing.tokens()
                break
        if self._sink is not None:
            try:
                taken = self._sink.take(evs)
            except Exception:  # the request's own greenlet shapes them again, and fails
                log.exception("job %s: a stream's sink failed", self.job_id)
                taken = 0
            if taken >= len(evs):
                return
            evs = evs[taken:]
            self._undivert()
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
            self._undivert()

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
        self._line: _Line | None = None
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
        if self._line is None:
            self._ready.clear()
            line = _Line(self.redis)  # connects: other requests' greenlets run meanwhile
            if self._line is not None:
                # One of them opened the line first: a second one, subscribed and never
                # read, would take every tap's SUBSCRIBE (never confirmed: 503) while the
                # reader reads the first.
                line.close()
            else:
                self._line = line
                line.subscribe(self.channel)
        if self._reader is None or self._reader.dead:
            self._reader = gevent.spawn(self._read_loop, self._line)
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
                self._line.subscribe(listener.channel)
            elif any(s.confirmed.is_set() for s in subs):
                listener.confirmed.set()  # the channel is subscribed already
        except (redis_lib.RedisError, OSError) as e:
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
        if self._line is not None and listener.channel != self.channel:
            try:
                self._line.unsubscribe(listener.channel)
            except (redis_lib.RedisError, OSError):
                pass

    def _read_loop(self, line: "_Line") -> None:
        reply = self.channel.encode()
        try:
            while True:
                for msg in line.read():
                    kind = msg[0]
                    if kind == b"message":
                        if msg[1] == reply:
                            self._dispatch_routed(msg[2])
                        else:
                            subs = self._subs.get(msg[1].decode())
                            if subs:
                                self._dispatch(subs, msg[2])
                    elif kind == b"subscribe":
                        if msg[1] == reply:
                            self._confirm_replies()
                        else:
                            for sub in self._subs.get(msg[1].decode(), ()):
                                sub.confirmed.set()
        except (redis_lib.RedisError, OSError, ValueError) as e:
            # A lost connection (Redis restarted, or gone): whatever was published meanwhile
            # (a job's last tokens, its Done, a janitor's Failed) is lost with it, so every
            # stream fails now; the next request opens a new connection.
            log.warning("relay lost Redis (%s); failing %d open streams", e, len(self._subs))
            if self._line is line:
                self._line = None
                self._ready.clear()
            line.close()
            for sub in [s for subs in self._subs.values() for s in subs]:
                sub._fail(ServiceUnavailable("The connection to Redis was lost mid-response."))
                sub.confirmed.set()  # a listener still waiting for it: its Failed is queued

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
        subs = self._subs
        for job_id, first, evs in batches:
            found = subs.get(job_id)
            if found is None:
                continue
            if len(found) == 1:
                found[0]._deliver(first, evs)
            else:
                for sub in tuple(found):
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
