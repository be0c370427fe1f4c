"""Prometheus metrics at GET /metrics.

Under gunicorn with several workers, metrics are aggregated across processes through
``PROMETHEUS_MULTIPROC_DIR`` (set by web/gunicorn.conf.py). Queue depth and live workers are
read from Redis when scraped, so every web process reports the same cluster-wide values.
Latencies are measured in the web process, as a client sees them (queueing included), by
the relay (``tasks/core/timing.py``).
"""

from __future__ import annotations

import os

import redis as redis_lib
from flask import Blueprint, Flask, Response, current_app, g, request
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter,
                               generate_latest, multiprocess)
from prometheus_client.core import GaugeMetricFamily

from tasks.core import limits

bp = Blueprint("metrics", __name__)

REQUESTS = Counter("ferry_requests", "HTTP requests answered", ["endpoint", "model", "status"])


class ClusterCollector:
    """Per-model queue depth and live workers, and Redis's memory, read at scrape time."""

    def __init__(self, app: Flask):
        self.app = app

    def collect(self):
        ferry = self.app.extensions["ferry"]
        depth = GaugeMetricFamily("ferry_requests_in_flight",
                                  "Requests queued or running, per model", labels=["model"])
        workers = GaugeMetricFamily("ferry_workers", "Live workers per model", labels=["model"])
        try:
            for entry in ferry.registry:
                depth.add_metric([entry.name], limits.pending(ferry.relay.redis, entry.queue))
                workers.add_metric([entry.name], len(ferry.relay.live_workers(entry.queue)))
        except redis_lib.RedisError:
            return
        yield depth
        yield workers
        try:
            memory = ferry.relay.redis.info("memory")
        except redis_lib.RedisError:
            return
        yield GaugeMetricFamily("ferry_redis_used_memory_bytes", "Memory Redis uses",
                                value=memory["used_memory"])
        # 0: no limit (Redis then grows until the host runs out).
        yield GaugeMetricFamily("ferry_redis_maxmemory_bytes", "Redis's maxmemory (0: none)",
                                value=memory.get("maxmemory", 0))


def register(app: Flask) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        process = CollectorRegistry()
        multiprocess.MultiProcessCollector(process)
    else:
        from prometheus_client import REGISTRY as process
    cluster = CollectorRegistry(auto_describe=True)
    cluster.register(ClusterCollector(app))
    app.extensions["ferry_metrics"] = (process, cluster)

    @app.after_request
    def _count(resp):
        rule = request.url_rule.rule if request.url_rule else "unmatched"
        if rule != "/metrics":
            REQUESTS.labels(rule, g.get("model", ""), str(resp.status_code)).inc()
        return resp


@bp.get("/metrics")
def metrics():
    body = b"".join(generate_latest(r) for r in current_app.extensions["ferry_metrics"])
    return Response(body, mimetype=CONTENT_TYPE_LATEST)
