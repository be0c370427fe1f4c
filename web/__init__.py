"""The HTTP front door: a Flask app served by gunicorn's gevent worker.

Handlers validate, enqueue and stream; they never run a model.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis as redis_lib
from celery import Celery
from flask import Flask

from config import Registry, Settings, load_settings
from tasks import webhooks
from tasks.app import make_batch_celery, make_celery
from tasks.protocol import connect
from tasks.redis_check import check_eviction_policy
from tasks.jobs.store import JobStore
from tasks.routing import Router
from web import auth, errors, janitor, logs, metrics
from web.relay import Relay


@dataclass
class Ferry:
    """What the request handlers share, kept in ``app.extensions["ferry"]``."""

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


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or load_settings()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False
    redis = connect(settings.redis_url, socket_timeout=10, socket_connect_timeout=5)
    check_eviction_policy(redis, settings.allow_redis_eviction)
    celery = make_celery(settings)
    jobs = JobStore(redis, settings, on_end=webhooks.notifier(settings))
    ferry = Ferry(settings, Registry(settings.models), celery, Relay(settings, redis, jobs), jobs,
                  make_batch_celery(settings),
                  Router(redis, enabled=settings.affinity, max_queued=settings.affinity_max_queued,
                         forget_after=2 * settings.worker_timeout))
    app.extensions["ferry"] = ferry
    errors.register(app)
    auth.register(app)
    metrics.register(app)
    logs.register(app)
    from web import (batches, chat, completions, embeddings, files, health, jobs as jobs_api,
                     models, openapi)

    for module in (chat, completions, embeddings, files, batches, jobs_api, models, health,
                   metrics, openapi):
        app.register_blueprint(module.bp)
    janitor.start(ferry)
    return app
