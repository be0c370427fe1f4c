"""What a model worker process holds: its backend, its heartbeat and its cancel listener.

One runtime per worker process, built once the worker starts (never before a fork). The
heartbeat and the cancel listener are threads; the backend releases the GIL while it
computes, so both keep running during generation.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import redis as redis_lib

from config.errors import FerryError, GenerationFailed
from config.settings import ModelEntry, Settings
from models import load_backend
from models.base import EmbeddingBackend
from models.batcher import MicroBatcher
from models.events import Embedded, Event, Failed, Started, failed
from models.job import EmbeddingJob, GenerationJob
from models.vectors import check_dimensions, shorten, to_base64
from tasks.protocol import CANCEL_CHANNEL, cancel_key, stats_key, workers_key
from tasks.publisher import Publisher

Job = GenerationJob | EmbeddingJob

log = logging.getLogger(__name__)


class Runtime:
    def __init__(self, settings: Settings, entry: ModelEntry, name: str):
        self.settings, self.entry, self.name = settings, entry, name
        self.redis = redis_lib.Redis.from_url(settings.redis_url, health_check_interval=10)
        self.backend = load_backend(entry)
        self.publisher = Publisher(self.redis)
        self.batcher = self._batcher() if isinstance(self.backend, EmbeddingBackend) else None
        # Runs the jobs of one ``embed_many`` message side by side, so they share passes.
        self._fanout = self.batcher and ThreadPoolExecutor(self.backend.worker_concurrency,
                                                           thread_name_prefix="ferry-embed")
        self._active: set[str] = set()
        self._cancelled: set[str] = set()
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
                    job_id = msg["data"].decode()
                    if job_id in self._active:
                        self._cancelled.add(job_id)
            except redis_lib.RedisError as e:
                log.warning("cancel listener lost Redis (%s); reconnecting", e)
                self._stop.wait(0.5)

    def run(self, job: GenerationJob) -> None:
        """Run one generation job to its end, publishing every event. Never raises."""
        self._execute(job, lambda: self.backend.generate(job, lambda: job.id in self._cancelled))

    def embed(self, job: EmbeddingJob) -> None:
        """Embed one request's inputs, in a pass shared with concurrent requests. Never raises."""
        self._execute(job, lambda: self._embed(job))

    def embed_many(self, jobs: list[EmbeddingJob]) -> None:
        """Several jobs that came in one message: each as if it had come alone."""
        list(self._fanout.map(self.embed, jobs))

    def _embed(self, job: EmbeddingJob) -> Iterator[Event]:
        tokens = self.backend.tokenize(job.input)
        check_dimensions(job.dimensions, self.backend.dimensions)
        n_tokens = sum(map(len, tokens))
        yield Started(worker="", prompt_tokens=n_tokens)
        vectors = shorten(self.batcher.embed(tokens, bulk=job.bulk), job.dimensions)
        yield Embedded(data=to_base64(vectors), count=len(vectors), dimensions=vectors.shape[1],
                       prompt_tokens=n_tokens)

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

    def _execute(self, job: Job, produce: Callable[[], Iterator[Event]]) -> None:
        # Joining ``_active`` before the check: a cancel that lands after it is heard by
        # the listener, one that landed before is found by the check.
        self._active.add(job.id)
        try:
            if self._skip(job):
                return
            for event in produce():
                if isinstance(event, Started):
                    event = dataclasses.replace(event, worker=self.name)
                self.publisher.put(job.id, event)
        except FerryError as e:
            self.publisher.put(job.id, failed(e))
        except Exception:
            log.exception("job %s failed", job.id)
            self.publisher.put(job.id, failed(GenerationFailed("The model failed on this request.")))
        finally:
            self._active.discard(job.id)
            self._cancelled.discard(job.id)
            self.publisher.flush()

    def _skip(self, job: Job) -> bool:
        """Jobs whose client has gone (cancelled, or past its deadline) never start."""
        try:
            cancelled = bool(self.redis.exists(cancel_key(job.id)))
        except redis_lib.RedisError:
            cancelled = False
        if cancelled or (job.deadline is not None and time.time() > job.deadline):
            log.info("job %s skipped: %s", job.id, "cancelled" if cancelled else "expired")
            self.publisher.put(job.id, Failed(status=408, error={
                "message": "The request was cancelled or expired before it started.",
                "type": "invalid_request_error", "param": None, "code": "expired"}))
            return True
        return False
