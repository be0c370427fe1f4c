"""GET /health (the process answers) and GET /ready (Redis reachable, workers per model)."""

from __future__ import annotations

import redis as redis_lib
from flask import Blueprint, current_app, jsonify

bp = Blueprint("health", __name__)


@bp.get("/health")
def health():
    return jsonify({"status": "ok"})


@bp.get("/ready")
def ready():
    ferry = current_app.extensions["ferry"]
    try:
        ferry.relay.redis.ping()
        workers = {e.name: len(ferry.relay.live_workers(e.queue)) for e in ferry.registry}
    except redis_lib.RedisError as e:
        return jsonify({"status": "unavailable", "redis": str(e)}), 503
    ok = all(workers.values())
    return jsonify({"status": "ready" if ok else "degraded", "workers": workers}), 200 if ok else 503
