"""Prometheus metrics at GET /metrics.

Under gunicorn with several workers, metrics are aggregated across processes through
``PROMETHEUS_MULTIPROC_DIR`` (set by web/gunicorn.conf.py). Queue depth and live workers are
read from Redis when scraped, so every web process reports the same cluster-wide values.
Latencies are measured in the web process, as a client sees them (queueing included).
"""

from __future__ import annotations

import os
import time

import redis as redis_lib
from flask import Blueprint, Flask, Response, current_app, g, request
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge,
                               Histogram, generate_latest, multiprocess)
from prometheus_client.core import GaugeMetricFamily

from models import events
from web import limits

bp = Blueprint("metrics", __name__)

REQUESTS = Counter("ferry_requests", "HTTP requests answered", ["endpoint", "model", "status"])
TTFT = Histogram("ferry_time_to_first_token_seconds", "From enqueue to the first token",
                 ["model"], buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
ITL = Histogram("ferry_inter_token_latency_seconds", "Between token deliveries to a request",
                ["model"], buckets=(.001, .0025, .005, .01, .02, .04, .08, .16, .32, .64, 1.5))
TOKENS = Counter("ferry_tokens_generated", "Completion tokens generated", ["model"])
# source="evaluated": prompt tokens the model evaluated (a prompt shared by n choices once);
# source="cached": prompt tokens read from its prefix cache instead (usage cached_tokens).
PROMPT_TOKENS = Counter("ferry_prompt_tokens", "Prompt tokens of generation requests, "
                        "evaluated or read from the prefix cache", ["model", "source"])
# route="worker": sent to the worker holding the prompt's prefix (reason "hit"); "shared":
# to the model's queue, with why (miss, dead, busy, single, off, unkeyed: tasks/routing.py).
ROUTED = Counter("ferry_routed", "Generation and embedding jobs by the queue they were sent "
                 "to", ["model", "route", "reason"])
ACTIVE = Gauge("ferry_active_requests", "Requests waiting for or receiving tokens",
               multiprocess_mode="livesum")


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


class Timing:
    """Observes one request's token timings as its events arrive (see web/relay.py)."""

    def __init__(self, model: str):
        self.model, self.start, self.last = model, time.monotonic(), None
        ACTIVE.inc()

    def tokens(self) -> None:
        now = time.monotonic()
        if self.last is None:
            TTFT.labels(self.model).observe(now - self.start)
        else:
            ITL.labels(self.model).observe(now - self.last)
        self.last = now

    def done(self, usage: events.Done) -> None:
        TOKENS.labels(self.model).inc(usage.completion_tokens)
        PROMPT_TOKENS.labels(self.model, "evaluated").inc(usage.prompt_evaluated)
        PROMPT_TOKENS.labels(self.model, "cached").inc(usage.cached_tokens)

    def close(self) -> None:
        ACTIVE.dec()


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
