"""What a model worker process holds: its backend, its heartbeat and its cancel listener.

One runtime per worker process, built once the worker starts (never before a fork). The
heartbeat and the cancel listener are threads; the backend releases the GIL while it
computes, so both keep running during generation. ``run`` may be called from several
Celery task threads at once (the threads pool of batching backends): the job sets are
guarded by one lock, and the publisher and the Redis client are thread-safe.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

import redis as redis_lib

from config.errors import FerryError, GenerationFailed, RequestExpired
from config.settings import ModelEntry, Settings
from models import load_backend
from models.events import Done, Started, failed
from models.job import GenerationJob
from tasks.protocol import CANCEL_CHANNEL, cancel_key, workers_key
from tasks.publisher import Publisher

log = logging.getLogger(__name__)


class Runtime:
    def __init__(self, settings: Settings, entry: ModelEntry, name: str):
        self.settings, self.entry, self.name = settings, entry, name
        self.redis = redis_lib.Redis.from_url(settings.redis_url, health_check_interval=10)
        self.backend = load_backend(entry)
        self.publisher = Publisher(self.redis)
        self._active: set[str] = set()
        self._cancelled: set[str] = set()
        # Guards both sets: a cancel must not be recorded for a job that has just ended
        # (it would stay in _cancelled for ever).
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
        except redis_lib.RedisError:
            pass

    def _heartbeat(self) -> None:
        key = workers_key(self.entry.queue)
        while not self._stop.is_set():
            now = time.time()
            try:
                pipe = self.redis.pipeline(transaction=False)
                pipe.zadd(key, {self.name: int((now + self.settings.worker_timeout) * 1000)})
                pipe.zremrangebyscore(key, 0, int(now * 1000))
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
            if job_id in self._active:
                self._cancelled.add(job_id)

    def run(self, job: GenerationJob) -> None:
        """Run one job to its end, publishing every event. Never raises."""
        if self._skip(job):
            return
        with self._jobs_lock:
            self._active.add(job.id)
        started, tokens, outcome = time.monotonic(), 0, "done"
        log.info("started job=%s model=%s", job.id, job.model)
        try:
            # A cancel may have landed between the check above and joining ``_active``.
            if self.redis.exists(cancel_key(job.id)):
                self._mark_cancelled(job.id)
            self.backend.check(job)
            for event in self.backend.generate(job, lambda: job.id in self._cancelled):
                if isinstance(event, Started):
                    event = dataclasses.replace(event, worker=self.name)
                elif isinstance(event, Done):
                    tokens = event.completion_tokens
                self.publisher.put(job.id, event)
        except FerryError as e:
            outcome = f"failed:{e.code}"
            self.publisher.put(job.id, failed(e))
        except Exception:
            outcome = "failed:exception"
            log.exception("job %s failed", job.id)
            self.publisher.put(job.id, failed(GenerationFailed("The model failed while generating.")))
        finally:
            log.info("finished job=%s outcome=%s cancelled=%s completion_tokens=%d seconds=%.3f",
                     job.id, outcome, job.id in self._cancelled, tokens,
                     time.monotonic() - started)
            with self._jobs_lock:
                self._active.discard(job.id)
                self._cancelled.discard(job.id)
            self.publisher.flush()

    def _skip(self, job: GenerationJob) -> bool:
        """Jobs whose client has gone (cancelled, or past its deadline) never start."""
        try:
            cancelled = bool(self.redis.exists(cancel_key(job.id)))
        except redis_lib.RedisError:
            cancelled = False
        if cancelled or (job.deadline is not None and time.time() > job.deadline):
            log.info("job %s skipped: %s", job.id, "cancelled" if cancelled else "expired")
            self.publisher.put(job.id, failed(RequestExpired(
                "The request was cancelled or expired before it started.")))
            return True
        return False
