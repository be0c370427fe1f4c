"""What a model worker process holds: its backend, its heartbeat and its cancel listener.

One runtime per worker process, built once the worker starts (never before a fork). The
heartbeat and the cancel listener are threads; the backend releases the GIL while it
computes, so both keep running during generation. ``run`` may be called from several
Celery task threads at once (the threads pool of batching backends): the job sets are
guarded by one lock, and the publisher and the Redis client are thread-safe.

A batching backend's loop thread hands each job's deltas over as it makes them (``_Flow``,
``models.output.Outbox``): a job's task thread wakes for its start, its choices' finishes and
its end, not for every token.

Every event of a job passes through ``run``, so the runtime is the source of truth for its
record (``jobs.store``): it marks the job started, and at the end writes the final body (the
one the synchronous endpoint returns) or the error *before* publishing the terminal event,
so a watcher that saw ``done`` finds the job completed. No web process needs to be listening.
Those writes are retried while Redis is unreachable or reloading after a restart (up to
``redis_retry_seconds``): a job that ran is recorded as ended, not left ``in_progress``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Iterator

import redis as redis_lib
from celery import Celery

from config.errors import FerryError, GenerationFailed
from config.settings import ModelEntry, Settings
from config.tenants import ANY_OWNER
from tasks.jobs.record import JobStatus
from tasks.jobs.shapes import Outcome
from tasks.jobs.store import JobStore
from models import load_backend
from models.base import CancelFlag, EmbeddingBackend
from models.batcher import MicroBatcher
from config.contract.events import (RESULTS, Delta, Done, EmbeddedParts, Embedded, Event,
                                     Started, ToolCallDelta, coalesce, failed)
from config.contract.job import EmbeddingJob, EmbeddingPartsJob, GenerationJob
from models.vectors import check_dimensions, shorten, to_base64
from tasks import webhooks
from tasks.cluster import TokenMeter
from config.contract.protocol import (CANCEL_CHANNEL, connect, owner_pending_key,
                                      pending_key, stats_key, worker_jobs_key, workers_key)
from tasks.publisher import Publisher
from tasks.routing import Served

log = logging.getLogger(__name__)


class Runtime:
    def __init__(self, settings: Settings, entry: ModelEntry, name: str, celery: Celery):
        self.settings, self.entry, self.name = settings, entry, name
        self.redis = connect(settings.redis_url, health_check_interval=10)
        self.backend = load_backend(entry)
        self.jobs = JobStore(self.redis, settings, on_end=webhooks.notifier(settings))
        self.publisher = Publisher(self.redis, log_max=settings.job_events_max,
                                   log_ttl_ms=self.jobs.events_ttl_ms,
                                   retry_s=settings.redis_retry_seconds,
                                   window_s=settings.stream_coalesce_ms / 1000,
                                   window_tokens=settings.stream_coalesce_tokens)
        self.batcher = self._batcher() if isinstance(self.backend, EmbeddingBackend) else None
        slots = type(self.backend).worker_pool(entry)[1]
        self.served = Served(self.redis, entry.queue, name, slots, ttl=settings.affinity_ttl,
                             alive_for=settings.worker_timeout)
        # Tokens generated, for the console's tokens per second (tasks/cluster.py).
        self.meter = TokenMeter(entry.queue)
        # The running jobs, each with its cancel. Under the lock: a cancel must find the job
        # it cancels, and the heartbeat's load must not count a job that has ended.
        self._active: dict[str, CancelFlag] = {}
        self._jobs_lock = threading.Lock()
        self._stop = threading.Event()

    def start(self) -> None:
        """Announce the worker (after the model is loaded) and listen for cancels."""
        for target in (self._heartbeat, self._listen_cancels):
            threading.Thread(target=target, name=target.__name__, daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        try:
            self.redis.zrem(workers_key(self.entry.queue), self.name)
            self.served.forget()
        except redis_lib.RedisError:
            pass

    def _heartbeat(self) -> None:
        key = workers_key(self.entry.queue)
        while not self._stop.is_set():
            now = time.time()
            # Under the lock: a job's end (``_end``) takes it off the published load in
            # the same lock, so a beat cannot write back a count read before that end.
            with self._jobs_lock:
                try:
                    pipe = self.redis.pipeline(transaction=False)
                    pipe.zadd(key, {self.name: int((now + self.settings.worker_timeout) * 1000)})
                    pipe.zremrangebyscore(key, 0, int(now * 1000))
                    pipe.set(worker_jobs_key(self.name), " ".join(sorted(self._active)),
                             px=int(self.settings.worker_timeout * 1000))
                    self.served.beat(pipe, len(self._active))
                    self.meter.beat(pipe, now)
                    pipe.execute()
                except redis_lib.RedisError as e:
                    log.warning("heartbeat failed: %s", e)
            self._stop.wait(self.settings.heartbeat_interval)

    def _listen_cancels(self) -> None:
        while not self._stop.is_set():
            try:
                pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(CANCEL_CHANNEL)
                for msg in pubsub.listen():
                    self._mark_cancelled(msg["data"].decode())
            except redis_lib.RedisError as e:
                log.warning("cancel listener lost Redis (%s); reconnecting", e)
                self._stop.wait(0.5)

    def _mark_cancelled(self, job_id: str) -> None:
        with self._jobs_lock:
            flag = self._active.get(job_id)
        if flag is not None:
            flag.set()

    def run(self, job: GenerationJob) -> None:
        """Run one generation job to its end, publishing every event. Never raises."""
        def produce(direct, cancelled: CancelFlag) -> Iterator[Event]:
            self.backend.check(job)
            if job.count_only:
                return self._count(job)
            if direct is not None:
                return self.backend.generate(job, cancelled, direct=direct)
            return self.backend.generate(job, cancelled)

        self._run(job, produce, direct=self.backend.supports_direct)

    def embed(self, job: EmbeddingJob) -> None:
        """Embed one request's inputs, in a pass shared with concurrent requests. Never raises."""
        self._run(job, lambda *_: self._embed(job))

    def embed_parts(self, job: EmbeddingPartsJob) -> None:
        """Embed several requests' inputs in shared passes; a part that is bad input fails
        alone, in the job's result. Never raises."""
        self._run(job, lambda *_: self._embed_parts(job))

    def _run(self, job: GenerationJob | EmbeddingJob | EmbeddingPartsJob, produce,
             direct: bool = False) -> None:
        """``produce(direct, cancelled)`` returns the job's events; ``direct``: the backend
        hands its deltas over (``supports_direct``), and ``produce`` is given where to
        (``_Flow.direct``), else None; ``cancelled``: the job's ``CancelFlag``."""
        # Active before the job starts: a cancel published from here on is caught by the
        # listener; one asked for earlier is reported by ``start`` itself.
        cancel = CancelFlag()
        with self._jobs_lock:
            self._active[job.id] = cancel
        # The job counts on this worker's load from its start, sent with it. (A start sent
        # again after a lost reply may count it twice: the next heartbeat sets the count.)
        try:
            started_job = self._retrying(f"start job {job.id}", lambda: self.jobs.start(
                job.id, self.name, also=lambda pipe: self.served.busy(+1, pipe)))
            counted = True
        except redis_lib.RedisError as e:
            log.error("job %s dropped: Redis is unreachable (%s)", job.id, e)
            started_job, counted = None, False
        if started_job is None:
            with self._jobs_lock:
                self._active.pop(job.id, None)
            if counted:
                self._load(-1)
            found = self._safe_get(job.id)
            log.info("job %s skipped: %s", job.id, found.status if found else "unknown")
            self._release(job.id)
            return
        record, cancel_asked = started_job
        if cancel_asked:
            cancel.set()
        loaded = True
        released = False  # by the script that recorded the job's end (``JobStore.finish``)
        outcome = Outcome()
        started = time.monotonic()
        log.info("started job=%s model=%s", job.id, job.model)
        flow = _Flow(self, job, outcome,
                     None if getattr(job, "streamed", True) else self._holding(), cancel,
                     shared=direct)
        try:
            shape = record.spec.shape(job.id, record.model, int(record.created))
            take = flow.take
            for event in produce(flow.direct if direct else None, cancel):
                kind = type(event)
                if kind is Started:
                    event = dataclasses.replace(event, worker=self.name)
                if kind not in RESULTS:
                    take(event, kind)
                    continue
                flow.close(event)
                # Recorded before the terminal event is published: a watcher that saw it
                # finds the job ended, and the client's next turn, sent once it has the
                # reply, is routed here and finds this worker free again.
                released = self._end(job, outcome, shape)
                loaded = False
                self.publisher.put(job.id, event, job.reply_to)
        except FerryError as e:
            flow.close()
            released = self._fail(job, e) or released
        except Exception:
            log.exception("job %s failed", job.id)
            flow.close()
            released = self._fail(job, GenerationFailed("The model failed on this request.")) \
                or released
        finally:
            log.info("finished job=%s cancelled=%s usage=%s seconds=%.3f", job.id,
                     outcome.cancelled, outcome.usage, time.monotonic() - started)
            with self._jobs_lock:
                self._active.pop(job.id, None)
            if loaded:
                self._load(-1)
            if not released:
                self._release(job.id, record.owner)
            self.publisher.flush()

    def _holding(self) -> "_Holding":
        return _Holding(self.settings.unstreamed_hold_tokens,
                        self.settings.unstreamed_hold_ms / 1000)

    def _count(self, job: GenerationJob) -> Iterator[Event]:
        n = self.backend.count_prompt(job)
        yield Started(worker="", prompt_tokens=n)
        yield Done(prompt_tokens=n, completion_tokens=0)

    def _embed(self, job: EmbeddingJob) -> Iterator[Event]:
        tokens = self._read(job.input, job.dimensions)
        yield Started(worker="", prompt_tokens=sum(map(len, tokens)))
        yield self._embedded(self.batcher.embed(tokens, bulk=job.bulk), tokens, job.dimensions)

    def _embed_parts(self, job: EmbeddingPartsJob) -> Iterator[Event]:
        tokens: list[list[list[int]] | FerryError] = []
        for part in job.parts:
            try:
                tokens.append(self._read(part.input, part.dimensions))
            except FerryError as e:
                tokens.append(e)
        ok = [t for t in tokens if not isinstance(t, FerryError)]
        n_tokens = sum(len(ids) for t in ok for ids in t)
        yield Started(worker="", prompt_tokens=n_tokens)
        rows = self.batcher.embed([ids for t in ok for ids in t], bulk=job.bulk) if ok else None
        parts, start = [], 0
        for part, t in zip(job.parts, tokens):
            if isinstance(t, FerryError):
                parts.append({"status": t.status, "error": t.to_dict()})
                continue
            parts.append(dataclasses.asdict(
                self._embedded(rows[start:start + len(t)], t, part.dimensions)))
            start += len(t)
        yield EmbeddedParts(parts=parts, prompt_tokens=n_tokens)

    def _read(self, inputs: list[str | list[int]], dimensions: int | None) -> list[list[int]]:
        """One request's inputs as token ids, after the checks that make it a 400, in the
        order ``POST /v1/embeddings`` reports them (also for a part of a parts job)."""
        tokens = self.backend.tokenize(inputs)
        check_dimensions(dimensions, self.backend.dimensions)
        return tokens

    @staticmethod
    def _embedded(rows, tokens: list[list[int]], dimensions: int | None) -> Embedded:
        vectors = shorten(rows, dimensions)
        return Embedded(data=to_base64(vectors), count=len(vectors), dimensions=vectors.shape[1],
                        prompt_tokens=sum(map(len, tokens)))

    def _batcher(self) -> MicroBatcher:
        key = stats_key(self.entry.queue)

        def record(requests: int, inputs: int) -> None:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hincrby(key, "batches", 1)
            pipe.hincrby(key, "requests", requests)
            pipe.hincrby(key, "inputs", inputs)
            pipe.execute()

        return MicroBatcher(self.backend.embed, max_inputs=self.backend.batch_size,
                            max_bulk_inputs=self.backend.max_bulk_inputs,
                            max_wait=self.backend.max_wait, on_batch=record)

    def _safe_get(self, job_id: str):
        try:
            return self.jobs.get(job_id, owner=ANY_OWNER)
        except redis_lib.RedisError:
            return None

    def _load(self, delta: int) -> None:
        try:
            self.served.busy(delta)
        except redis_lib.RedisError:
            pass  # it expires with the heartbeat; routers then see the worker as gone

    def _end(self, job, outcome: Outcome, shape) -> bool:
        """Record the job's end (the body the synchronous endpoint returns), and in the same
        round trip take it off this worker's load and point a chat job's prefixes here
        (``Served.ended``). True if that ended the job, and so freed its in-flight places."""
        status: JobStatus = "cancelled" if outcome.cancelled else "completed"
        result = outcome.body(shape)
        # A count kept no KV cache here: its prefix must not point here.
        chat = isinstance(job, GenerationJob) and not outcome.cancelled and not job.count_only
        replies = [(c.text, c.tool_calls) for _, c in sorted(outcome.choices.items())]
        with self._jobs_lock:
            # Nothing left to cancel, and no longer counted by the heartbeat's load (held
            # across the write, see ``_heartbeat``).
            self._active.pop(job.id, None)
            try:
                return self.jobs.finish(job.id, status, result=result, also=lambda pipe:
                                        self.served.ended(job if chat else None, replies, pipe))
            except redis_lib.RedisError as e:
                log.warning("could not record the end of job %s (%s); retrying", job.id, e)
        # The record alone, retried while Redis is down or reloading: the heartbeat sets the
        # load right, and the next turn is routed to any worker.
        return self._finish(job.id, status, result=result)

    def _release(self, job_id: str, owner: str | None = None) -> None:
        """The job no longer counts against its model's (and its owner's) in-flight limit:
        for a job whose end no script of ours recorded (the record gone, Redis down)."""
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.zrem(pending_key(self.entry.queue), job_id)
            if owner is not None:
                pipe.zrem(owner_pending_key(owner), job_id)
            pipe.execute()
        except redis_lib.RedisError:
            pass  # the web sweeps stale entries

    def _fail(self, job, err: FerryError) -> bool:
        """Record the job failed and publish its failure; True if that ended it."""
        released = self._finish(job.id, "failed", error=err.to_dict())
        self.publisher.put(job.id, failed(err), job.reply_to)
        return released

    def _retrying(self, what: str, write):
        """``write()``, again with back-off while Redis is down or loading its data, for up to
        ``redis_retry_seconds``; then its error is raised."""
        give_up, pause = time.monotonic() + self.settings.redis_retry_seconds, 0.2
        while True:
            try:
                return write()
            except redis_lib.ConnectionError as e:  # BusyLoadingError is one
                if time.monotonic() + pause > give_up:
                    raise
                log.warning("could not %s (%s); retrying", what, e)
                time.sleep(pause)
                pause = min(pause * 2, 2.0)

    def _finish(self, job_id: str, status: JobStatus, **outcome) -> bool:
        """True if this ended the job (``JobStore.finish``)."""
        try:
            return self._retrying(f"record the end of job {job_id}",
                                  lambda: self.jobs.finish(job_id, status, **outcome))
        except redis_lib.RedisError as e:
            # The job's watchers still get its events, if Redis comes back for the publisher.
            log.error("could not record the end of job %s: %s", job_id, e)
            return False


class _Flow:
    """One job's events on their way to the publisher, from its task thread and, for a
    backend that ``supports_direct``, from the backend's loop thread too: each delta as it
    is made (``direct``), so the task thread is not woken for every token. One lock keeps a
    job's events in one order (its choices' finishes come through the task thread while
    other choices' deltas still come directly); once the job's end is on its way
    (``close``) nothing more of it is published."""

    def __init__(self, runtime: Runtime, job, outcome: Outcome, holding: "_Holding | None",
                 cancelled: CancelFlag, shared: bool = True):
        """``shared``: the backend hands deltas over (else only the task thread puts, and
        ``take`` takes no lock: under gevent a lock is a greenlet semaphore, ~1 µs a token)."""
        self.job_id, self.reply_to, self.holding = job.id, job.reply_to, holding
        self._cancel = cancelled
        # Once per token: bound once, and types compared rather than isinstance chains
        # (events are final dataclasses).
        self._add, self._count, self._put = outcome.add, runtime.meter.add, runtime.publisher.put
        self._lock = threading.Lock()
        self._closed = False
        if not shared:
            self.take = self._take

    def direct(self, event: Event) -> None:
        """A delta, on the backend's loop thread. Dropped once the job is cancelled (nothing
        more reaches a client that has gone, as ``models.output.follow_choices`` does) or
        has ended. Never raises into the loop, and never waits but for this job's lock."""
        if self._cancel.cancelled:
            return
        with self._lock:
            if self._closed:
                return
            try:
                self._take(event, type(event))
            except Exception:
                log.exception("job %s: a delta could not be published", self.job_id)

    def take(self, event: Event, kind: type) -> None:
        """An event the job's generator yielded, but its result."""
        with self._lock:
            if not self._closed:
                self._take(event, kind)

    def close(self, result: Event | None = None) -> None:
        """No more events but the job's end: ``result`` counted (not published: the caller
        does, once the job's end is recorded), and the deltas held published first."""
        with self._lock:
            self._closed = True
            if result is not None:
                self._add(result)
                self._count(result)
            for ev in self.holding.take() if self.holding is not None else ():
                self._put(self.job_id, ev, self.reply_to)

    def _take(self, event: Event, kind: type) -> None:
        self._add(event)
        self._count(event)
        holding = self.holding
        if holding is not None:
            if kind is Delta or kind is ToolCallDelta:
                for ev in holding.add(event):
                    self._put(self.job_id, ev, self.reply_to)
                return
            for ev in holding.take():  # before any other event: order holds
                self._put(self.job_id, ev, self.reply_to)
        self._put(self.job_id, event, self.reply_to)


class _Holding:
    """The deltas of a job nobody streams (``GenerationJob.streamed`` false), held and
    merged until its next other event, ``tokens`` tokens or ``seconds``, then put as one
    delta per choice (and tool call): its reader needs only the whole answer. Its first
    delta goes at once: the time to its first token is still measured where it is read,
    and its watchers see it start."""

    def __init__(self, tokens: int, seconds: float):
        self.tokens, self.seconds = tokens, seconds
        self.held: list[Event] = []
        self.count, self.since, self.first = 0, 0.0, True

    def add(self, ev: Event) -> list[Event]:
        """What to put now."""
        if self.first:
            self.first = False
            return [ev]
        if not self.held:
            self.since = time.monotonic()
        self.held.append(ev)
        self.count += ev.tokens
        if self.count >= self.tokens or time.monotonic() - self.since >= self.seconds:
            return self.take()
        return []

    def take(self) -> list[Event]:
        """The held deltas, merged: sorted by choice (a stable sort: each choice's own order
        is kept), consecutive ones of a choice as one (``events.coalesce``)."""
        if not self.held:
            return []
        held = sorted(self.held, key=lambda ev: ev.index)
        self.held, self.count = [], 0
        return coalesce(held)

