"""The HTTP front door: a Flask app served by gunicorn's gevent worker.

Handlers validate, enqueue and stream; they never run a model.
"""

from __future__ import annotations

from dataclasses import dataclass

from celery import Celery
from flask import Flask

from config import Registry, Settings, load_settings
from tasks.app import make_batch_celery, make_celery
from web import errors
from web.relay import Relay


@dataclass
class Ferry:
    """What the request handlers share, kept in ``app.extensions["ferry"]``."""

    settings: Settings
    registry: Registry
    celery: Celery
    relay: Relay
    # Sends to the Batch API's queue, whose Celery keys are kept apart (tasks/app.py).
    batch_celery: Celery


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or load_settings()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False
    app.extensions["ferry"] = Ferry(settings, Registry(settings.models), make_celery(settings),
                                    Relay(settings), make_batch_celery(settings))
    errors.register(app)
    from web import batches, chat, completions, embeddings, files, health, models

    for module in (chat, completions, embeddings, files, batches, models, health):
        app.register_blueprint(module.bp)
    return app
