"""Faults with real processes: shutdowns, Redis restarts. Each test starts its own services."""

from __future__ import annotations

import json
import signal
import threading
import time

import openai
import pytest
import redis
import requests

from tests.services import RedisServer, Web, Worker, chat_once_recovered


def script(**kw) -> list[dict]:
    return [{"role": "user", "content": json.dumps(kw)}]


def sse_lines(resp) -> list[bytes]:
    return [line for line in resp.iter_lines() if line]


@pytest.fixture
def stack(tmp_path):
    """A private Redis, web and 'doomed' worker, for tests that kill or restart them."""
    redis_server = RedisServer(tmp_path).start()
    web = Web(redis_server.url, tmp_path).start()
    worker = Worker("doomed", redis_server.url, tmp_path).start()
    yield redis_server, web, worker
    for s in (worker, web, redis_server):
        s.kill()


def test_worker_sigterm_finishes_the_job_in_hand(stack):
    _, web, worker = stack
    body = {"model": "doomed", "stream": True, "messages": script(count=30, delay=0.05)}
    with requests.post(web.url + "/v1/chat/completions", json=body, stream=True, timeout=30) as r:
        lines = r.iter_lines()
        next(lines)
        worker.proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    assert rest[-1] == b"data: [DONE]"
    text = "".join(json.loads(x[6:])["choices"][0]["delta"].get("content") or ""
                   for x in rest[:-1] if x.startswith(b"data: {"))
    assert text == "".join(f"t{i} " for i in range(30))
    assert worker.proc.wait(10) == 0
    # With the only worker gone, a new request fails fast instead of waiting forever.
    time.sleep(0.2)
    r = requests.post(web.url + "/v1/chat/completions", timeout=30,
                      json={"model": "doomed", "messages": script(tokens=["x"])})
    assert r.status_code == 503


def test_web_sigterm_drains_open_streams(stack):
    _, web, _ = stack
    body = {"model": "doomed", "stream": True, "messages": script(count=20, delay=0.05)}
    with requests.post(web.url + "/v1/chat/completions", json=body, stream=True, timeout=30) as r:
        lines = r.iter_lines()
        next(lines)
        web.proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    assert rest[-1] == b"data: [DONE]"
    assert web.proc.wait(10) == 0


def test_redis_restart_fails_in_flight_then_recovers(stack, tmp_path, request):
    redis_server, web, worker = stack
    client = openai.OpenAI(base_url=web.url + "/v1", api_key="x", max_retries=0, timeout=30)
    errors: list[Exception] = []

    def stream():
        try:
            for _ in client.chat.completions.create(
                    model="doomed", stream=True, messages=script(count=200, delay=0.02)):
                pass
        except Exception as e:  # noqa: BLE001 - recorded and asserted below
            errors.append(e)

    t = threading.Thread(target=stream)
    t.start()
    time.sleep(0.5)
    redis_server.kill()
    t.join(15)
    assert not t.is_alive(), "the stream hung after Redis went away"
    assert errors and isinstance(errors[0], openai.APIError)
    restarted = RedisServer(tmp_path, port=redis_server.port).start()
    request.addfinalizer(restarted.kill)
    r = chat_once_recovered(client, "doomed", script(tokens=["ok"]))
    assert r.choices[0].message.content == "ok"


def test_queue_limit_is_429_with_retry_after(stack):
    redis_server, web, _ = stack
    body = {"model": "doomed", "stream": True, "messages": script(count=40, delay=0.05)}
    results: list[list[bytes]] = []

    def stream():
        with requests.post(web.url + "/v1/chat/completions", json=body, stream=True,
                           timeout=30) as r:
            results.append(sse_lines(r))

    threads = [threading.Thread(target=stream) for _ in range(2)]
    for t in threads:
        t.start()
    r = redis.Redis.from_url(redis_server.url)
    deadline = time.monotonic() + 5
    while r.zcard("ferry:pending:ferry.doomed") < 2:  # one running, one queued
        assert time.monotonic() < deadline
        time.sleep(0.02)
    third = requests.post(web.url + "/v1/chat/completions", timeout=30,
                          json={"model": "doomed", "messages": script(tokens=["x"])})
    assert third.status_code == 429
    assert int(third.headers["Retry-After"]) >= 1
    assert third.json()["error"]["code"] == "rate_limit_exceeded"
    for t in threads:
        t.join(30)
    assert [lines[-1] for lines in results] == [b"data: [DONE]"] * 2
    # Capacity is released when requests end.
    ok = requests.post(web.url + "/v1/chat/completions", timeout=30,
                       json={"model": "doomed", "messages": script(tokens=["x"])})
    assert ok.status_code == 200


def test_overload_is_refused_with_flat_memory(stack):
    """Far past the in-flight limit, requests are refused at once and the web process does
    not grow: nothing is queued in memory for them."""
    import concurrent.futures

    import psutil

    _, web, _ = stack
    body = {"model": "doomed", "stream": True, "messages": script(count=100000, delay=0.01)}
    release = threading.Event()

    def hold():  # keeps one of the model's two places until released, then disconnects
        with requests.post(web.url + "/v1/chat/completions", json=body, stream=True,
                           timeout=60):
            release.wait(60)

    holders = [threading.Thread(target=hold) for _ in range(2)]
    for t in holders:
        t.start()
    r = redis.Redis.from_url(stack[0].url)
    deadline = time.monotonic() + 10
    while r.zcard("ferry:pending:ferry.doomed") < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc = psutil.Process(web.proc.pid)
    rss = lambda: sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])  # noqa: E731

    def burst(n: int) -> list[int]:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            return list(pool.map(lambda _: requests.post(
                web.url + "/v1/chat/completions", timeout=30,
                json={"model": "doomed", "messages": script(tokens=["x"])}).status_code,
                range(n)))

    burst(200)  # warm up allocators
    before = rss()
    codes = burst(1500)
    after = rss()
    release.set()
    for t in holders:
        t.join(30)
    assert set(codes) == {429}
    assert after - before < 20 * 1024 * 1024, (before, after)


def test_killed_worker_holds_no_unstarted_jobs(stack, tmp_path):
    """A worker whose four threads are all busy takes no more messages: SIGKILLed, it loses
    only the jobs it was running (``worker_lost``), and the queued ones run on another
    worker, once each. Every request is answered within seconds of the kill."""
    redis_server, web, _ = stack
    model, r = "synthetic-threads", redis.Redis.from_url(redis_server.url)
    first = Worker(model, redis_server.url, tmp_path).start()
    answers: dict[str, tuple[int, dict, float]] = {}

    def ask(name: str, **kw) -> None:
        resp = requests.post(web.url + "/v1/chat/completions", timeout=60,
                             json={"model": model, "messages": script(**kw)})
        answers[name] = resp.status_code, resp.json(), time.monotonic()

    threads = [threading.Thread(target=ask, args=(f"hang{i}",), kwargs={"tokens": ["x"],
                                                                       "hang": True})
               for i in range(4)]
    threads += [threading.Thread(target=ask, args=(f"quick{i}",), kwargs={"tokens": [f"q{i}"]})
                for i in range(4)]
    second = None
    try:
        for t in threads[:4]:
            t.start()
        deadline = time.monotonic() + 10
        while r.zcard("ferry:jobs:running") < 4:
            assert time.monotonic() < deadline, "the four threads did not all start"
            time.sleep(0.02)
        for t in threads[4:]:
            t.start()
        deadline = time.monotonic() + 10
        while r.zcard("ferry:jobs:pending") < 4:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(1.0)  # time enough for a prefetching consumer to take them
        # What the busy worker holds: nothing beyond its four running jobs.
        assert r.llen(f"ferry.{model}") == 4
        second = Worker(model, redis_server.url, tmp_path).start()
        first.kill()
        killed = time.monotonic()
        for t in threads:
            t.join(30)
        assert set(answers) == {f"hang{i}" for i in range(4)} | {f"quick{i}" for i in range(4)}
        for i in range(4):
            status, body, at = answers[f"quick{i}"]
            assert status == 200, body
            assert body["choices"][0]["message"]["content"] == f"q{i}"
            assert at - killed < 10
            status, body, at = answers[f"hang{i}"]
            assert (status, body["error"]["code"]) == (503, "worker_lost")
            assert at - killed < 10
        assert r.llen(f"ferry.{model}") == 0
    finally:
        first.kill()
        if second is not None:
            second.kill()


def test_an_evicting_redis_is_refused_at_start(tmp_path):
    """A Redis that evicts keys when full would drop queued jobs silently: web and workers
    refuse to start on it, and say why, unless the operator accepts it."""
    evicting = RedisServer(tmp_path, extra=("--maxmemory", "64mb",
                                            "--maxmemory-policy", "allkeys-lru")).start()
    started = []
    try:
        for service in (Web(evicting.url, tmp_path), Worker("doomed", evicting.url, tmp_path)):
            with pytest.raises(RuntimeError, match="process exited"):
                started.append(service)
                service.start()
            assert "maxmemory-policy is 'allkeys-lru'" in service.log.read_text()
        accepted = Web(evicting.url, tmp_path / "accepted", FERRY_ALLOW_REDIS_EVICTION="1")
        (tmp_path / "accepted").mkdir()
        started.append(accepted)
        accepted.start()
        assert "Starting anyway" in accepted.log.read_text()
    finally:
        for service in (*started, evicting):
            service.kill()
