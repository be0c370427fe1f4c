"""GET /v1/workers: per model, its live workers and their load, queued and in-flight jobs,
and tokens per second over the last minute (``tasks/cluster.py``): what the console's
Workers page draws. Counts and names only, no tenant's data, so every key may read it."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify

from tasks import cluster

bp = Blueprint("workers", __name__)


@bp.get("/v1/workers")
def list_workers():
    ferry = current_app.extensions["ferry"]
    models = cluster.snapshot(ferry.redis, ferry.registry)
    return jsonify({"object": "list", "window_seconds": cluster.WINDOW,
                    "data": [m.public() for m in models]})
