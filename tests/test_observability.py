"""Health, readiness and Prometheus metrics."""

from __future__ import annotations

import json
import re
import time

import requests


def metric(text: str, name: str, **labels) -> float | None:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if m and m.group(1) == name and all(p in (m.group(2) or "") for p in want.split(",")):
            return float(m.group(3))
    return None


def test_metrics_count_requests_tokens_and_workers(web, scripted):
    before = requests.get(web.url + "/metrics", timeout=5).text
    n0 = metric(before, "ferry_requests_total", endpoint="/v1/chat/completions",
                model="synthetic", status="200") or 0
    t0 = metric(before, "ferry_tokens_generated_total", model="synthetic") or 0
    for stream in (False, True):
        r = scripted.chat.completions.create(
            model="synthetic", stream=stream,
            messages=[{"role": "user", "content": json.dumps({"tokens": ["a", "b", "c"]})}])
        if stream:
            list(r)
    text = requests.get(web.url + "/metrics", timeout=5).text
    assert metric(text, "ferry_requests_total", endpoint="/v1/chat/completions",
                  model="synthetic", status="200") == n0 + 2
    assert metric(text, "ferry_tokens_generated_total", model="synthetic") == t0 + 6
    assert metric(text, "ferry_time_to_first_token_seconds_count", model="synthetic") >= 2
    assert metric(text, "ferry_workers", model="synthetic") == 1
    assert metric(text, "ferry_workers", model="unserved") == 0
    assert metric(text, "ferry_requests_in_flight", model="synthetic") == 0


def test_health_and_ready(web, synthetic_worker):
    assert requests.get(web.url + "/health", timeout=5).json() == {"status": "ok"}
    r = requests.get(web.url + "/ready", timeout=5)
    body = r.json()
    assert body["workers"]["synthetic"] >= 1 and body["workers"]["unserved"] == 0
    assert r.status_code == 503 and body["status"] == "degraded"


def test_metrics_report_redis_memory(web):
    text = requests.get(web.url + "/metrics", timeout=5).text
    assert metric(text, "ferry_redis_used_memory_bytes") > 0
    assert metric(text, "ferry_redis_maxmemory_bytes") == 0  # the tests' Redis has no limit


def test_inter_token_latency_counts_each_gap_of_a_stream(web, scripted):
    """One observation per gap between a stream's token deliveries, with the gaps' sum (the
    relay adds them to the histogram in batches, at the latest when the request closes)."""
    itl = "ferry_inter_token_latency_seconds"
    before = requests.get(web.url + "/metrics", timeout=5).text
    c0 = metric(before, itl + "_count", model="synthetic") or 0
    s0 = metric(before, itl + "_sum", model="synthetic") or 0
    list(scripted.chat.completions.create(
        model="synthetic", stream=True, messages=[{"role": "user", "content": json.dumps(
            {"tokens": ["a", "b", "c", "d"], "delay": 0.1})}]))
    deadline = time.monotonic() + 5
    while True:  # the request closes just after its last chunk is sent
        text = requests.get(web.url + "/metrics", timeout=5).text
        if metric(text, itl + "_count", model="synthetic") == c0 + 3 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert metric(text, itl + "_count", model="synthetic") == c0 + 3
    assert 0.25 <= metric(text, itl + "_sum", model="synthetic") - s0 < 3
