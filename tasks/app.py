"""The Celery app, configured from Ferry's settings (one place for every Celery option)."""

from __future__ import annotations

from celery import Celery, signals

from config.settings import Settings
from config.contract.protocol import BATCH_QUEUE, WEBHOOK_QUEUE

# Kombu keeps unacknowledged messages in one hash per key prefix and hands out again any
# older than its visibility timeout. Batch chunks want that (a dead worker's chunk is rerun,
# after ``batch_visibility_timeout``); model jobs must not (they are at-most-once), so the
# batch queue's keys live under their own prefix.
BATCH_KEY_PREFIX = "ferry:bq:"
# Webhook deliveries want it too (at least once), with a timeout of their own.
WEBHOOK_KEY_PREFIX = "ferry:wq:"


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


@signals.worker_init.connect
def _one_backend(sender, **_) -> None:
    """A worker's tasks share one result backend, made once, when it has imported every
    task module. Celery makes one per thread, and its gevent pool runs every task in a new
    greenlet (a thread to Celery): each task made its own (~6% of a job's CPU in the worker).
    Ferry's apps ignore results, so theirs is the disabled backend, which holds no state."""
    app = sender.app
    backend = app.backend
    for task in app.tasks.values():
        task.backend = backend


def make_celery(settings: Settings) -> Celery:
    app = Celery("ferry", broker=settings.redis_url,
                 include=["tasks.generation", "tasks.embedding"])
    app.conf.update(
        **_common(),
        # Generation is at-most-once: a stream cannot be resumed by another worker, and its
        # client has already been told of the failure. Ack on receipt, prefetch nothing.
        task_acks_late=False,
        # With acks on receipt a message a worker holds exists nowhere else. Celery's
        # prefetch count (multiplier x pool size) would let a threads pool whose threads are
        # all busy take that many more messages and hold them unstarted, lost with the
        # worker if it is killed, and out of reach of an idle worker meanwhile. Without
        # prefetch a worker takes a message only for a free thread, which starts it at once:
        # a job not yet started stays in the queue's list for any live worker
        # (tests/test_faults.py measures it). Celery >= 5.6, Redis broker.
        worker_disable_prefetch=True,
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


def make_webhook_celery(settings: Settings) -> Celery:
    """The webhook sender's Celery app: at least once, across worker crashes.

    A delivery is acknowledged when it ends, a retry being a new message with an ETA that
    the worker holds, unacknowledged, until it is due. Both stay in Redis meanwhile, so when
    the worker is killed another one takes them ``webhook_visibility_timeout`` after the dead
    one did (the settings make that longer than any backoff plus an attempt, or a pending
    retry would be handed out twice).
    """
    app = Celery("ferry-webhooks", broker=settings.redis_url, include=["tasks.webhooks"])
    app.conf.update(
        **_common(),
        task_acks_late=True,
        # Were the pool's process to die under a delivery, hand it out again, not drop it.
        task_reject_on_worker_lost=True,
        task_default_queue=WEBHOOK_QUEUE,
        broker_transport_options={
            "global_keyprefix": WEBHOOK_KEY_PREFIX,
            "visibility_timeout": settings.webhook_visibility_timeout,
            # Look for abandoned deliveries every 2 s (one ZRANGE), not every 100.
            "unacked_restore_interval": 2,
            "unacked_restore_throttle": 1,
        },
    )
    app.ferry_settings = settings
    return app
