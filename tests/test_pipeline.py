"""The queue/pub-sub/SSE pipeline, driven by the scripted token source (models/synthetic.py)."""

from __future__ import annotations

import json
import time

import openai
import pytest
import redis
import requests

from config.contract.protocol import cancel_key
from tests.services import Worker


def script(**kw) -> list[dict]:
    return [{"role": "user", "content": json.dumps(kw)}]


def test_tokens_arrive_in_order(scripted):
    tokens = [f"<{i}>" for i in range(200)]
    r = scripted.chat.completions.create(model="synthetic", messages=script(tokens=tokens))
    assert r.choices[0].message.content == "".join(tokens)
    assert r.usage.completion_tokens == 200
    streamed = [c.choices[0].delta.content for c in scripted.chat.completions.create(
        model="synthetic", messages=script(tokens=tokens), stream=True)]
    assert "".join(s or "" for s in streamed) == "".join(tokens)


def test_n_choices_are_indexed(scripted):
    r = scripted.chat.completions.create(model="synthetic", n=3,
                                         messages=script(tokens=["a", "b"]))
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.message.content == "ab" for c in r.choices)
    assert r.usage.completion_tokens == 6


def test_backend_error_becomes_openai_error(scripted):
    with pytest.raises(openai.InternalServerError) as e:
        scripted.chat.completions.create(model="synthetic", messages=script(tokens=["a"], fail="boom"))
    assert e.value.body["code"] == "generation_failed"
    # Streaming: the error arrives as an error event after the tokens already sent.
    stream = scripted.chat.completions.create(model="synthetic", stream=True,
                                              messages=script(tokens=["a", "b"], fail="boom"))
    got = []
    with pytest.raises(openai.APIError, match="boom"):
        for chunk in stream:
            got.append(chunk.choices[0].delta.content or "")
    assert "".join(got) == "ab"


def test_bad_script_is_400_before_streaming(scripted):
    with pytest.raises(openai.BadRequestError):
        scripted.chat.completions.create(model="synthetic", stream=True,
                                         messages=[{"role": "user", "content": "not json"}])


def test_disconnect_cancels_generation(web, synthetic_worker, redis_server):
    """The client leaves mid-stream: the worker stops and has served the next job within
    200 ms (tokens every 10 ms, as a ~100 tok/s model)."""
    body = {"model": "synthetic", "stream": True,
            "messages": script(count=100000, delay=0.01)}
    with requests.post(web.url + "/v1/chat/completions", json=body, stream=True, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for _ in range(5):
            next(lines)
        left = time.monotonic()
    # The worker is a solo pool: the next job can start only once the first one stopped.
    body = {"model": "synthetic", "messages": script(tokens=["next"])}
    reply = requests.post(web.url + "/v1/chat/completions", json=body, timeout=30).json()
    assert reply["choices"][0]["message"]["content"] == "next"
    assert time.monotonic() - left < 0.2


def test_disconnect_between_slow_tokens_is_noticed(web, synthetic_worker, redis_server):
    """The client leaves while its stream waits 5 s for its next token: with no event to
    wake it (the relay's tick does), the web sees the closed connection within a second,
    asks the worker to cancel the job and closes the request."""
    body = {"model": "synthetic", "stream": True,
            "messages": script(tokens=["a", "b", "c"], delay=5)}
    with requests.post(web.url + "/v1/chat/completions", json=body, stream=True, timeout=30) as r:
        assert r.status_code == 200
        assert b"data: " in next(r.iter_lines())
        job_id = r.headers["X-Request-Id"]
        left = time.monotonic()
    rdb = redis.Redis.from_url(redis_server.url)
    while not rdb.exists(cancel_key(job_id)) and time.monotonic() - left < 4:
        time.sleep(0.02)
    assert time.monotonic() - left < 1.0


def test_dead_worker_fails_fast(web, redis_server, logs):
    doomed = Worker("doomed", redis_server.url, logs).start()
    try:
        body = {"model": "doomed", "stream": True,
                "messages": script(tokens=["a", "b"], delay=0.05, crash=True)}
        started = time.monotonic()
        with requests.post(web.url + "/v1/chat/completions", json=body, stream=True,
                           timeout=30) as r:
            assert r.status_code == 200
            events = [line for line in r.iter_lines() if line]
        elapsed = time.monotonic() - started
        last = json.loads(events[-1].removeprefix(b"data: "))
        assert last["error"]["code"] == "worker_lost"
        assert elapsed < 10
        assert doomed.proc.wait(5) == -9
        # Non-streaming: no hang either, a 503 OpenAI error.
        doomed = Worker("doomed", redis_server.url, logs).start()
        body["stream"] = False
        r = requests.post(web.url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "worker_lost"
    finally:
        doomed.kill()


def test_no_worker_is_503_at_once(client):
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="unserved", messages=script(tokens=["a"]))
    assert e.value.status_code == 503
    assert "unserved" in e.value.body["message"]
    assert time.monotonic() - started < 1


def test_cancelled_before_start_never_runs(web, redis_server, synthetic_worker):
    """A queued job whose client left is skipped by the worker."""
    slow = {"model": "synthetic", "messages": script(count=60, delay=0.01)}
    r = redis.Redis.from_url(redis_server.url)
    # Occupy the worker, then queue a second request and drop it while it waits.
    import threading

    t = threading.Thread(target=requests.post, args=(web.url + "/v1/chat/completions",),
                         kwargs={"json": slow, "timeout": 30})
    t.start()
    time.sleep(0.1)
    body = {"model": "synthetic", "stream": True,
            "messages": script(tokens=["never"], prompt_tokens=7)}
    try:
        requests.post(web.url + "/v1/chat/completions", json=body, timeout=0.3)
    except requests.exceptions.Timeout:
        pass
    t.join()
    keys = r.keys("ferry:cancel:chatcmpl-*")
    assert keys, "the web should have cancelled the abandoned request"
    job_ids = [k.decode().removeprefix("ferry:cancel:") for k in keys]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        log = synthetic_worker.log.read_text()
        if any(f"job {j} skipped: cancelled" in log for j in job_ids):
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the worker ran (or never saw) the cancelled job")
