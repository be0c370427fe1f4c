"""The Celery app, configured from Ferry's settings (one place for every Celery option)."""

from __future__ import annotations

from celery import Celery

from config.settings import Settings
from tasks.protocol import BATCH_QUEUE

# Kombu keeps unacknowledged messages in one hash per key prefix and hands out again any
# older than its visibility timeout. Batch chunks want that (a dead worker's chunk is rerun,
# after ``batch_visibility_timeout``); model jobs must not (they are at-most-once), so the
# batch queue's keys live under their own prefix.
BATCH_KEY_PREFIX = "ferry:bq:"


def _common() -> dict:
    """What both of Ferry's Celery apps set alike."""
    return dict(
        task_serializer="json",
        accept_content=["json"],
        # Results travel over pub/sub as events (or into Redis stores); no result backend.
        task_ignore_result=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )


def worker_argv(settings: Settings, *options: str) -> list[str]:
    """``celery worker`` arguments at Ferry's log level. Celery's banner (its queues and every
    task's name, ~25 lines a worker) is printed only at ``debug``."""
    quiet = [] if settings.log_level == "debug" else ["--quiet"]
    return [*quiet, "worker", *options, "--loglevel", settings.log_level.upper()]


def log_format(settings: Settings) -> dict:
    """``logging.basicConfig`` arguments for a worker process."""
    return dict(level=settings.log_level.upper(),
                format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def make_celery(settings: Settings) -> Celery:
    app = Celery("ferry", broker=settings.redis_url,
                 include=["tasks.generation", "tasks.embedding", "tasks.webhooks"])
    app.conf.update(
        **_common(),
        # Generation is at-most-once: a stream cannot be resumed by another worker, and its
        # client has already been told of the failure. Ack on receipt, prefetch nothing.
        task_acks_late=False,
        # For the same reason, no unacknowledged copy is kept in Redis: a message is gone
        # once a worker takes it. That also spares a Redis round trip per job in the
        # worker's consumer, its ceiling on jobs per second.
        broker_transport_options={"ack_emulation": False},
        task_default_queue="ferry.default",
    )
    app.ferry_settings = settings
    return app


def make_batch_celery(settings: Settings) -> Celery:
    """The Batch API's Celery app: chunks are acknowledged only once their results are
    stored, so a chunk whose worker dies is run again (``tasks/batchstore.py`` makes that
    harmless)."""
    app = Celery("ferry-batch", broker=settings.redis_url, include=["tasks.batches"])
    app.conf.update(
        **_common(),
        task_acks_late=True,
        task_default_queue=BATCH_QUEUE,
        broker_transport_options={
            "global_keyprefix": BATCH_KEY_PREFIX,
            "visibility_timeout": settings.batch_visibility_timeout,
            # Look for abandoned chunks on every idle poll, not every tenth.
            "unacked_restore_throttle": 1,
        },
    )
    app.ferry_settings = settings
    return app
