"""The Celery app, configured from Ferry's settings (one place for every Celery option)."""

from __future__ import annotations

from celery import Celery

from config.settings import Settings


def make_celery(settings: Settings) -> Celery:
    app = Celery("ferry", broker=settings.redis_url, include=["tasks.generation", "tasks.embedding"])
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        # Results travel over pub/sub as events; the result backend is not used.
        task_ignore_result=True,
        # Generation is at-most-once: a stream cannot be resumed by another worker, and its
        # client has already been told of the failure. Ack on receipt, prefetch nothing.
        task_acks_late=False,
        worker_prefetch_multiplier=1,
        task_default_queue="ferry.default",
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    app.ferry_settings = settings
    return app
