"""tasks/cluster.py against a real Redis: what GET /v1/workers reports (live workers and
their load, queue depth, in flight, tokens per second), and the worker's token meter."""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis

from config.contract.events import Delta, Done, ToolCallDelta
from config.contract.protocol import pending_key, queued_key, workers_key
from tasks.cluster import WINDOW, TokenMeter, snapshot, tokens_key
from tasks.routing import load_key


@dataclass
class Entry:
    name: str
    queue: str
    kind: str = "chat"


def test_snapshot_counts_only_live_workers_and_the_last_minutes_tokens(redis_server):
    r = redis.Redis.from_url(redis_server.url)
    q = f"ferry.cluster-test-{time.monotonic_ns()}"
    now = time.time()
    r.zadd(workers_key(q), {"w-live": int((now + 5) * 1000), "w-dead": int((now - 1) * 1000)})
    r.hset(load_key(q, "w-live"), mapping={"active": 2, "slots": 4})
    r.zadd(queued_key(q, False), {"j1": now, "j2": now})
    r.zadd(queued_key(q, True), {"j3": now})
    r.zadd(pending_key(q), {"j1": now, "j2": now, "j3": now, "j4": now, "j5": now})
    second = int(now)
    r.set(tokens_key(q, second - 1), 30)            # the newest whole second
    r.set(tokens_key(q, second - WINDOW), 90)       # the oldest one in the window
    r.set(tokens_key(q, second - WINDOW - 1), 999)  # too old
    r.set(tokens_key(q, second), 999)               # still running: not yet in
    [m] = snapshot(r, [Entry("m", q)], now=now)
    out = m.public()
    assert out["workers"] == [{"name": "w-live", "active": 2, "slots": 4}]
    assert (out["queued"], out["in_flight"], out["running"]) == (3, 5, 2)
    assert len(out["tokens"]) == WINDOW and out["tokens"][-1] == 30 and out["tokens"][0] == 90
    assert sum(out["tokens"]) == 120 and out["tokens_per_second"] == round(120 / WINDOW, 2)
    assert out["kind"] == "chat" and out["model"] == "m"


def test_token_meter_counts_generated_tokens_once_per_beat(redis_server):
    r = redis.Redis.from_url(redis_server.url)
    q = f"ferry.meter-test-{time.monotonic_ns()}"
    meter = TokenMeter(q)
    meter.add(Delta(index=0, text="echoed prompt", tokens=7, prompt=True))
    meter.add(Delta(index=0, text="a", tokens=1))
    meter.add(Delta(index=0, text="bc", tokens=2))
    meter.add(ToolCallDelta(index=0, call=0, arguments="{}", tokens=3))
    meter.add(Done(prompt_tokens=5, completion_tokens=6))
    now = time.time()
    pipe = r.pipeline()
    meter.beat(pipe, now)
    pipe.execute()
    key = tokens_key(q, int(now))
    assert int(r.get(key)) == 6, "generated tokens only: not the echoed prompt, not Done's"
    assert 0 < r.ttl(key) <= 2 * WINDOW
    pipe = r.pipeline()
    meter.beat(pipe, now)  # nothing since: nothing written
    assert len(pipe.command_stack) == 0
