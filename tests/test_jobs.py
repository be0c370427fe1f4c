"""/v1/jobs end to end: submit, poll, replay, cancel, expiry. Real Redis, real workers, the
web under gunicorn's gevent worker; the scripted backend sets the timing."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import redis
import requests

from config.contract.protocol import events_log
from tests.jobclient import (CHAT, cancel, events, get, script, scripted, submit, submitted,
                             text_of, wait_status)
from tests.services import Web, Worker


def hang_until_cancelled(web, tokens=("x", "y")) -> dict:
    """A job that occupies the synthetic worker until it is cancelled."""
    job = submitted(web, scripted(tokens=list(tokens), hang=True))
    wait_status(web, job["id"], "in_progress")
    return job


def test_submit_poll_result(web, synthetic_worker):
    r = submit(web, scripted(tokens=["a", "b"], prompt_tokens=3))
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["id"].startswith("chatcmpl-") and job["object"] == "job"
    assert job["status"] == "queued" and job["endpoint"] == CHAT and job["model"] == "synthetic"
    assert abs(job["created_at"] - time.time()) < 5
    assert job["result"] is None and job["error"] is None
    assert r.headers["Location"] == f"/v1/jobs/{job['id']}"
    done = wait_status(web, job["id"], "completed")
    assert done["created_at"] <= done["started_at"] <= done["finished_at"]
    assert done["queue_position"] is None and done["error"] is None
    body = done["result"]
    assert body["id"] == job["id"] and body["object"] == "chat.completion"
    assert body["created"] == job["created_at"]
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "ab",
                                                        "refusal": None},
                                "logprobs": None, "finish_reason": "stop"}]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5,
                             "prompt_tokens_details": {"cached_tokens": 0}}


def test_synchronous_requests_are_jobs(web, synthetic_worker):
    r = requests.post(web.url + "/v1/chat/completions", json=scripted(tokens=["s", "y"]),
                      timeout=30)
    assert r.status_code == 200
    job = get(web, r.headers["X-Request-Id"]).json()
    assert job["status"] == "completed" and job["result"] == r.json()
    # A streamed request too: its job holds the body the non-streaming request would get.
    body = {**scripted(tokens=["p", "q"]), "stream": True}
    with requests.post(web.url + "/v1/chat/completions", json=body, stream=True,
                       timeout=30) as r:
        lines = [line for line in r.iter_lines() if line]
        job_id = r.headers["X-Request-Id"]
    assert lines[-1] == b"data: [DONE]"
    job = wait_status(web, job_id, "completed")
    assert job["result"]["choices"][0]["message"]["content"] == "pq"
    assert job["result"]["object"] == "chat.completion"


@pytest.mark.model
@pytest.mark.parametrize("endpoint,body", [
    (CHAT, {"model": "smollm2", "max_tokens": 24, "temperature": 0,
            "messages": [{"role": "user", "content": "Write one sentence about the sea."}]}),
    ("/v1/completions", {"model": "smollm2", "prompt": "The sky is", "max_tokens": 12,
                         "temperature": 0, "echo": True}),
])
def test_job_result_equals_the_synchronous_reply(web, smollm2_worker, endpoint, body):
    sync = requests.post(web.url + endpoint, json=body, timeout=60)
    assert sync.status_code == 200, sync.text
    job = submitted(web, body, endpoint)
    result = wait_status(web, job["id"], "completed", timeout=60)["result"]
    reply = sync.json()
    assert result["id"] == job["id"] != reply["id"]
    # The same body but for what the prefix cache held: the job ran second, on the same prompt.
    cached = [r["usage"].pop("prompt_tokens_details")["cached_tokens"] for r in (result, reply)]
    assert cached[0] >= cached[1]
    assert {k: v for k, v in result.items() if k not in ("id", "created")} == \
        {k: v for k, v in reply.items() if k not in ("id", "created")}
    assert result["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("envelope,status,param", [
    ({"endpoint": CHAT, "body": {"model": "synthetic"}}, 400, "body.messages"),
    ({"endpoint": CHAT, "body": {**scripted(tokens=["a"]), "temperature": 3}}, 400,
     "body.temperature"),
    ({"endpoint": CHAT, "body": {**scripted(tokens=["a"]), "stream": True}}, 400, "body.stream"),
    ({"endpoint": CHAT, "body": {**scripted(tokens=["a"]), "n": 0}}, 400, "body.n"),
    ({"endpoint": "/v1/completions", "body": {"model": "synthetic", "prompt": ["a", "b"]}}, 400,
     "body.prompt"),
    ({"endpoint": CHAT, "body": {"model": "gpt-4o", "messages": script()}}, 404, "body.model"),
    ({"endpoint": "/v1/images", "body": {}}, 400, "endpoint"),
    ({"body": scripted(tokens=["a"])}, 400, "endpoint"),
    ({"endpoint": CHAT, "body": "hello"}, 400, "body"),
    ({"endpoint": CHAT, "body": scripted(tokens=["a"]), "priority": 1}, 400, "priority"),
    ({"endpoint": CHAT, "body": scripted(tokens=["a"]), "webhook": "ftp://example.com/x"}, 400,
     "webhook"),
])
def test_invalid_submission_is_an_error_now(web, redis_server, envelope, status, param):
    r = redis.Redis.from_url(redis_server.url)
    before = r.zcard("ferry:jobs:pending")
    resp = requests.post(web.url + "/v1/jobs", json=envelope, timeout=10)
    assert resp.status_code == status, resp.text
    assert resp.json()["error"]["param"] == param
    assert r.zcard("ferry:jobs:pending") == before, "no job may be created"


def test_embeddings_job_result_equals_the_synchronous_reply(web, embedder):
    body = {"model": "all-minilm", "input": ["the ferry leaves at dawn", "and returns at dusk"],
            "encoding_format": "base64"}
    sync = requests.post(web.url + "/v1/embeddings", json=body, timeout=30)
    assert sync.status_code == 200
    # The synchronous request is a job too.
    assert get(web, sync.headers["X-Request-Id"]).json()["result"] == sync.json()
    job = submitted(web, body, endpoint="/v1/embeddings")
    assert job["id"].startswith("embd-") and job["endpoint"] == "/v1/embeddings"
    done = wait_status(web, job["id"], "completed")
    assert done["result"] == sync.json()
    assert done["result"]["usage"]["prompt_tokens"] > 0
    bad = submit(web, {"model": "synthetic", "input": "hi"}, endpoint="/v1/embeddings")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "body.model"


def test_malformed_submission(web):
    r = requests.post(web.url + "/v1/jobs", data="{nope", timeout=10,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_unknown_job_is_404(web):
    for r in (get(web, "chatcmpl-nope"), cancel(web, "chatcmpl-nope"),
              requests.get(web.url + "/v1/jobs/chatcmpl-nope/events", timeout=10)):
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_events_replay_and_resume(web, synthetic_worker):
    tokens = [f"<{i}>" for i in range(40)]
    job = submitted(web, scripted(tokens=tokens, delay=0.02, prompt_tokens=2))
    # A watcher that leaves after 10 events, then comes back with Last-Event-ID.
    first = events(web, job["id"], limit=10)
    assert [e.id for e in first] == list(range(10))
    assert first[0].event == "started" and first[0].data["prompt_tokens"] == 2
    rest = events(web, job["id"], last_event_id=first[-1].id)
    seen = first + rest
    assert [e.id for e in seen] == list(range(len(seen))), "no event lost, none twice"
    assert text_of(seen) == "".join(tokens)
    assert [e.event for e in seen[-2:]] == ["finish", "done"]
    # After the end, the whole job replays from the start, the same events again.
    again = events(web, job["id"])
    assert [(e.id, e.event, e.data) for e in again] == [(e.id, e.event, e.data) for e in seen]
    assert events(web, job["id"], last_event_id=seen[-2].id)[0].event == "done"
    assert wait_status(web, job["id"], "completed")["result"]["choices"][0]["message"][
        "content"] == "".join(tokens)


def test_watching_a_queued_job_then_following_it_live(web, synthetic_worker):
    blocker = hang_until_cancelled(web)
    job = submitted(web, scripted(tokens=["q", "r"]))
    import threading

    got = {}
    watcher = threading.Thread(target=lambda: got.update(evs=events(web, job["id"])))
    watcher.start()
    time.sleep(0.5)
    assert get(web, job["id"]).json()["status"] == "queued"
    assert cancel(web, blocker["id"]).json()["status"] == "cancelled"
    watcher.join(20)
    assert [e.id for e in got["evs"]] == list(range(len(got["evs"])))
    assert text_of(got["evs"]) == "qr" and got["evs"][-1].event == "done"


def test_cancel_queued_job_never_runs(web, synthetic_worker):
    blocker = hang_until_cancelled(web, tokens=["x", "y"])
    queued = [submitted(web, scripted(tokens=["never"]))["id"] for _ in range(2)]
    cancelled = cancel(web, queued[-1]).json()
    assert cancelled["status"] == "cancelled" and cancelled["started_at"] is None
    assert cancelled["finished_at"] is not None and cancelled["result"] is None
    evs = events(web, queued[-1])
    assert [(e.id, e.event, e.data["error"]["code"]) for e in evs] == [(0, "failed", "cancelled")]
    # The running job stops, keeping what it had produced; the next queued one runs.
    stopped = cancel(web, blocker["id"]).json()
    assert stopped["status"] == "cancelled"
    assert stopped["result"]["choices"][0]["message"]["content"] == "xy"
    assert stopped["result"]["usage"]["completion_tokens"] == 2
    assert wait_status(web, queued[0], "completed")["result"]["choices"][0]["message"][
        "content"] == "never"
    deadline = time.monotonic() + 5
    while f"job {queued[-1]} skipped: cancelled" not in synthetic_worker.log.read_text():
        assert time.monotonic() < deadline, "the worker ran (or never saw) the cancelled job"
        time.sleep(0.1)
    assert get(web, queued[-1]).json()["started_at"] is None
    # Cancelling a job that ended changes nothing.
    assert cancel(web, queued[0]).json()["status"] == "completed"


def test_cancel_running_job_stops_it_at_once(web, synthetic_worker):
    job = submitted(web, scripted(count=100000, delay=0.005))
    seen = events(web, job["id"], limit=6)
    assert [e.event for e in seen[1:]] == ["delta"] * 5
    started = time.monotonic()
    stopped = cancel(web, job["id"]).json()
    assert stopped["status"] == "cancelled", stopped
    assert time.monotonic() - started < 2
    text = stopped["result"]["choices"][0]["message"]["content"]
    full = "".join(f"t{i} " for i in range(100000))
    n = stopped["result"]["usage"]["completion_tokens"]
    assert 5 <= n < 100000 and text == full[: len(text)] and text.count(" ") == n
    # The replay holds exactly the kept output, and ends cleanly.
    evs = events(web, job["id"])
    assert text_of(evs) == text and evs[-1].event == "done"
    # The worker is free again.
    quick = submitted(web, scripted(tokens=["ok"]))
    assert wait_status(web, quick["id"], "completed", timeout=3)


def test_queue_position(web, synthetic_worker):
    blocker = hang_until_cancelled(web)
    ids = [submitted(web, scripted(tokens=[str(i)]))["id"] for i in range(4)]
    positions = [get(web, i).json()["queue_position"] for i in ids]
    try:
        # The busy worker (a solo pool) takes nothing more until it is done: all four wait
        # in the queue's list, in order.
        assert positions == [0, 1, 2, 3]
    finally:
        cancel(web, blocker["id"])
    for i in ids:
        assert wait_status(web, i, "completed")["queue_position"] is None


def test_queue_position_of_a_long_queue_of_large_jobs_is_cheap(web, redis_server,
                                                               synthetic_worker):
    """Polling positions in a queue holding megabytes costs Redis no scan: no command
    reaches the slow log (5 ms), and the positions are still right."""
    r = redis.Redis.from_url(redis_server.url)
    blocker = hang_until_cancelled(web)
    pad = "p" * 256 * 1024
    ids = [submitted(web, scripted(tokens=[str(i)], pad=pad))["id"] for i in range(48)]
    slower_than = r.config_get("slowlog-log-slower-than")["slowlog-log-slower-than"]
    r.config_set("slowlog-log-slower-than", 5000)
    r.slowlog_reset()
    try:
        assert r.llen("ferry.synthetic") == 48
        for _ in range(3):
            positions = [get(web, i).json()["queue_position"] for i in ids]
            assert positions == list(range(48))
        slow = [e for e in r.slowlog_get(128)
                if e["command"].split()[0].upper() in (b"EVALSHA", b"EVAL", b"LRANGE")]
        assert slow == []
    finally:
        r.config_set("slowlog-log-slower-than", slower_than)
        cancel(web, blocker["id"])
        for i in ids:
            cancel(web, i)


def test_dead_worker_fails_its_job(web, redis_server, logs):
    doomed = Worker("doomed", redis_server.url, logs).start()
    try:
        job = submitted(web, scripted(model="doomed", tokens=["a", "b"], delay=0.05, crash=True))
        failed = wait_status(web, job["id"], "failed", timeout=20)
        assert failed["error"]["code"] == "worker_lost"
        evs = events(web, job["id"])
        assert [e.id for e in evs] == list(range(len(evs)))
        assert evs[-1].event == "failed" and evs[-1].data["error"]["code"] == "worker_lost"
        # The worker is killed right after its last token, maybe before publishing it.
        assert text_of(evs) in ("a", "ab")
    finally:
        doomed.kill()


@pytest.fixture(scope="module")
def strict(redis_server, tmp_path_factory):
    """A web process and a ``scratch`` worker with short limits: jobs expire unless started
    within 1.5 s, are kept 6 s, replay at most about a hundred messages, and keep results of
    16 KB at most."""
    logs = tmp_path_factory.mktemp("strict")
    env = dict(FERRY_JOB_DEADLINE="1.5", FERRY_JOB_TTL="6", FERRY_JOB_EVENTS_MAX="16",
               FERRY_JOB_RESULT_MAX_BYTES="16384")
    web = Web(redis_server.url, logs, **env).start()
    worker = Worker("scratch", redis_server.url, logs, **env).start()
    yield web, worker
    worker.stop()
    web.stop()


def test_expiry(strict):
    """Jobs not started by their deadline expire; every job is gone after its TTL."""
    web, worker = strict
    blocker = submitted(web, scripted(model="scratch", tokens=["x"], hang=True))
    wait_status(web, blocker["id"], "in_progress")
    late = submitted(web, scripted(model="scratch", tokens=["late"]))
    nobody = submitted(web, scripted(model="unserved", tokens=["late"]))
    for job in (late, nobody):
        expired = wait_status(web, job["id"], "expired", timeout=5)
        assert expired["error"]["code"] == "expired" and expired["started_at"] is None
        evs = events(web, job["id"])
        assert [(e.id, e.event) for e in evs] == [(0, "failed")]
        assert evs[0].data["error"]["code"] == "expired"
    assert cancel(web, blocker["id"]).json()["status"] == "cancelled"
    # The worker drops the message: Celery discards it as expired, or the runtime skips it.
    dropped = (f"job {late['id']} skipped: expired",
               f"Discarding revoked task: ferry.generate[{late['id']}]")
    deadline = time.monotonic() + 5
    while not any(line in worker.log.read_text() for line in dropped):
        assert time.monotonic() < deadline, "the worker ran (or never saw) the expired job"
        time.sleep(0.1)
    assert get(web, late["id"]).json()["status"] == "expired"
    # Once its ``retained_until`` (the published second) has passed, every trace of a job is
    # gone: no margin, no luck (the record expires at that time exactly, or before).
    last = max(job["retained_until"] for job in (blocker, late, nobody))
    time.sleep(max(0.0, last - time.time()) + 0.05)
    for job in (blocker, late, nobody):
        assert get(web, job["id"]).status_code == 404
        assert cancel(web, job["id"]).status_code == 404
        assert requests.get(f"{web.url}/v1/jobs/{job['id']}/events",
                            timeout=5).status_code == 404


def test_replay_buffer_is_capped_and_says_so(strict, redis_server):
    web, _ = strict
    job = submitted(web, scripted(model="scratch", count=1500, delay=0.001))
    done = wait_status(web, job["id"], "completed")
    assert done["result"]["usage"]["completion_tokens"] == 1500, "the result is whole"
    # The earliest events were trimmed: replaying from the start reports it, skips nothing.
    evs = events(web, job["id"])
    assert [(e.id, e.event) for e in evs] == [(None, "error")]
    assert evs[0].data["error"]["code"] == "events_lost"
    # The latest ones are still there, up to finish and done: numbered on from the buffer's
    # last message (the worker coalesces tokens, so a delta may hold several).
    last = redis.Redis.from_url(redis_server.url).lindex(events_log(job["id"]), -1)
    last = json.loads(last)
    end = last["s"] + len(last["e"]) - 1
    tail = events(web, job["id"], last_event_id=end - 5)
    assert [e.id for e in tail] == list(range(end - 4, end + 1))
    assert tail[-1].event == "done" and tail[-2].event == "finish"


def test_a_result_over_the_cap_is_answered_but_not_kept(strict):
    web, _ = strict
    body = scripted(model="scratch", count=4000, delay=0)
    reply = requests.post(web.url + CHAT, json=body, timeout=60)
    assert reply.status_code == 200
    assert reply.json()["usage"]["completion_tokens"] == 4000, "the client's answer is whole"
    assert len(reply.content) > 16384
    job = get(web, reply.headers["X-Request-Id"]).json()
    assert job["status"] == "completed" and job["result"] is None
    assert "FERRY_JOB_RESULT_MAX_BYTES" in job["result_omitted"]
    small = requests.post(web.url + CHAT, json=scripted(model="scratch", tokens=["ok"]), timeout=60)
    kept = get(web, small.headers["X-Request-Id"]).json()
    assert kept["result"] == small.json() and kept["result_omitted"] is None


def test_cli_submits_follows_and_prints_the_result(web, synthetic_worker, tmp_path):
    request = tmp_path / "request.json"
    request.write_text(json.dumps(scripted(tokens=["he", "llo"], delay=0.01)))
    cli = [sys.executable, "-m", "web.cli", "--url", web.url]
    out = subprocess.run([*cli, "submit", str(request)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["choices"][0]["message"]["content"] == "hello"
    assert "hello" in out.stderr  # the tokens, as they came
    # Leave a job, come back to it, cancel another.
    request.write_text(json.dumps({"endpoint": CHAT, "body": scripted(tokens=["x"], hang=True)}))
    out = subprocess.run([*cli, "submit", "--detach", str(request)], capture_output=True,
                         text=True, timeout=60)
    job = json.loads(out.stdout)
    assert out.returncode == 0 and job["status"] == "queued"
    out = subprocess.run([*cli, "cancel", job["id"]], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and json.loads(out.stdout)["status"] == "cancelled"
    out = subprocess.run([*cli, "status", "chatcmpl-nope"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "404" in out.stderr


def test_list_jobs_newest_first_by_cursor(web, redis_server, synthetic_worker):
    """GET /v1/jobs: the caller's jobs newest first, in pages that follow ``after``, each the
    job object of GET /v1/jobs/{id} (queue wait and run time apart); the owner's index
    expires with its newest job."""
    mine = [submitted(web, scripted(tokens=[f"t{i}"]))["id"] for i in range(5)]
    for job_id in mine:
        wait_status(web, job_id, "completed")
    seen, after = [], None
    for limit in (2, 2, 1):
        params = {"limit": limit, **({"after": after} if after else {})}
        r = requests.get(web.url + "/v1/jobs", params=params, timeout=10)
        assert r.status_code == 200, r.text
        page = r.json()
        assert page["object"] == "list" and len(page["data"]) == limit
        assert (page["first_id"], page["last_id"]) == (page["data"][0]["id"], page["data"][-1]["id"])
        if len(seen) < 4:
            assert page["has_more"] is True
        seen += page["data"]
        after = page["last_id"]
    # Newest first: this test's five jobs, in reverse order of submission.
    assert [j["id"] for j in seen] == mine[::-1]
    newest = seen[0]
    assert newest == get(web, newest["id"]).json()
    assert newest["status"] == "completed" and newest["model"] == "synthetic"
    assert newest["queue_wait_ms"] >= 0 and newest["run_time_ms"] >= 0
    assert newest["result"]["usage"]["completion_tokens"] == 1
    # A cursor no longer listed (or never) is an empty page, not an error.
    r = requests.get(web.url + "/v1/jobs", params={"after": "chatcmpl-gone"}, timeout=10)
    assert r.json()["data"] == [] and r.json()["has_more"] is False
    for bad in ("0", "101", "x"):
        r = requests.get(web.url + "/v1/jobs", params={"limit": bad}, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["param"] == "limit", r.text
    r_ = redis.Redis.from_url(redis_server.url)
    ttl = r_.pttl("ferry:jobs:owner:") / 1000
    assert 0 < newest["retained_until"] - time.time() - ttl < 2, (ttl, newest["retained_until"])


def test_list_jobs_index_is_pruned_with_the_jobs(strict, redis_server):
    """Entries of jobs past their TTL leave the owner's index when a new job is recorded, so
    the index is as bounded as the records themselves."""
    web, _ = strict
    index = redis.Redis.from_url(redis_server.url)
    old = submitted(web, scripted(model="unserved", tokens=["x"]))
    cancel(web, old["id"])
    assert index.zscore("ferry:jobs:owner:", old["id"]) is not None
    time.sleep(max(0.0, old["retained_until"] - time.time()) + 0.05)
    new = submitted(web, scripted(model="unserved", tokens=["x"]))
    cancel(web, new["id"])
    assert index.zscore("ferry:jobs:owner:", old["id"]) is None
    listed = requests.get(web.url + "/v1/jobs", params={"limit": 100}, timeout=10).json()
    assert listed["data"][0]["id"] == new["id"]
    assert old["id"] not in [j["id"] for j in listed["data"]]


def test_a_new_web_process_serving_two_first_streams_at_once_still_watches_jobs(
        redis_server, tmp_path, synthetic_worker):
    """A web process opens its pub/sub line on its first request. Two first requests at once
    each opened one; the second replaced the first as the line taps subscribe on, while the
    reader read the first: every later ``/v1/jobs/{id}/events`` waited for a confirmation
    nobody read, and failed with 503 after 5 s."""
    import threading

    web = Web(redis_server.url, tmp_path).start()
    try:
        body = {"model": "synthetic", "stream": True,
                "messages": script(tokens=["a"] * 10, delay=0.02)}
        bodies: list[bytes] = []

        def stream() -> None:
            with requests.post(web.url + "/v1/chat/completions", json=body, stream=True,
                               timeout=30) as r:
                bodies.append(r.content)

        threads = [threading.Thread(target=stream) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(bodies) == 2 and all(b"[DONE]" in b for b in bodies)
        job = submitted(web, scripted(tokens=["x", "y"], delay=0.02))
        seen = events(web, job["id"], timeout=10)
        assert text_of(seen) == "xy" and seen[-1].event == "done"
    finally:
        web.stop()
