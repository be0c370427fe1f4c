"""What the request core works with, built once per process from the settings: the model
registry, the Celery apps it sends to, the event relay and the job store. The web keeps it in
``app.extensions["ferry"]``; the batch worker builds its own (``tasks/batch_runner.py``)."""

from __future__ import annotations

from dataclasses import dataclass

import redis as redis_lib
from celery import Celery

from config import Registry, Settings
from config.contract.protocol import connect
from tasks import webhooks
from tasks.app import make_batch_celery, make_celery
from tasks.core.relay import Relay
from tasks.jobs.store import JobStore
from tasks.redis_check import check_eviction_policy
from tasks.routing import Router


@dataclass
class Ferry:
    settings: Settings
    registry: Registry
    celery: Celery
    relay: Relay
    jobs: JobStore
    # Sends to the Batch API's queue, whose Celery keys are kept apart (tasks/app.py).
    batch_celery: Celery
    # Which queue a job goes to: its model's, or a worker's own (tasks/routing.py).
    router: Router

    @property
    def redis(self) -> redis_lib.Redis:
        return self.relay.redis


def build(settings: Settings) -> Ferry:
    redis = connect(settings.redis_url, socket_timeout=10, socket_connect_timeout=5)
    check_eviction_policy(redis, settings.allow_redis_eviction)
    jobs = JobStore(redis, settings, on_end=webhooks.notifier(settings))
    return Ferry(settings, Registry(settings.models), make_celery(settings),
                 Relay(settings, redis, jobs), jobs, make_batch_celery(settings),
                 Router(redis, enabled=settings.affinity, max_queued=settings.affinity_max_queued,
                        forget_after=2 * settings.worker_timeout))
