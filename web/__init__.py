"""The HTTP front door: a Flask app served by gunicorn's gevent worker.

Handlers validate, enqueue and stream; they never run a model.
"""

from __future__ import annotations

from flask import Flask

from config import Settings, load_settings
from tasks.core import services
from web import auth, errors, generation, janitor, logs, metrics


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or load_settings()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False
    # What the handlers share (``tasks.core.services.Ferry``).
    ferry = services.build(settings)
    app.extensions["ferry"] = ferry
    errors.register(app)
    auth.register(app)
    metrics.register(app)
    logs.register(app)
    from web import (batches, chat, completions, console, embeddings, files, health,
                     jobs as jobs_api, messages, models, openapi, responses, workers)

    for module in (chat, completions, embeddings, responses, messages, files, batches, jobs_api,
                   models, workers, health, metrics, openapi, console):
        app.register_blueprint(module.bp)
    # Streams write their tokens straight to the socket under gunicorn (web/generation.py).
    app.wsgi_app = generation.keep_start_response(app.wsgi_app)
    janitor.start(ferry)
    return app
