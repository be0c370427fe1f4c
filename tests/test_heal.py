"""Nothing lost, nothing down (issue #13): the faults bench/chaos.py found, each reproduced
with real processes. A Redis that must come back with its data persists to an append-only
file fsynced on every write, in the test's own directory."""

from __future__ import annotations

import io
import json
import threading
import time

import openai
import pytest
import redis
import requests

from tests.services import RedisServer, Web, Worker, chat_once_recovered


def script(**kw) -> list[dict]:
    return [{"role": "user", "content": json.dumps(kw)}]


def persistent_redis(tmp_path, port: int | None = None) -> RedisServer:
    return RedisServer(tmp_path, port=port, extra=(
        "--appendonly", "yes", "--appendfsync", "always", "--dir", str(tmp_path))).start()


@pytest.fixture
def stack(tmp_path):
    """A private persistent Redis, web and 'doomed' worker; workers are presumed dead after
    10 s of silence, longer than the Redis outages these tests make."""
    env = {"FERRY_WORKER_TIMEOUT": "10"}
    servers = {"redis": persistent_redis(tmp_path)}
    servers["web"] = Web(servers["redis"].url, tmp_path, **env).start()
    servers["worker"] = Worker("doomed", servers["redis"].url, tmp_path, **env).start()
    yield servers
    for s in servers.values():
        s.kill()


def restart_redis(servers: dict, tmp_path, down: float = 0.0) -> None:
    old = servers["redis"]
    old.kill()
    time.sleep(down)
    servers["redis"] = persistent_redis(tmp_path, port=old.port)


def test_batch_lines_wait_for_a_restarted_worker(client, batch_worker, redis_server, logs):
    """Lines that meet their model with no live worker (killed, restarting) run once it is
    back, instead of failing with service_unavailable: every line is answered once."""
    r = redis.Redis.from_url(redis_server.url)
    worker = Worker("scratch", redis_server.url, logs).start()
    lines = [{"custom_id": f"l{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "scratch",
                       "messages": script(tokens=[f"t{i}", "."], delay=0.4)}}
             for i in range(8)]
    f = client.files.create(file=("in.jsonl", io.BytesIO(
        b"".join(json.dumps(x).encode() + b"\n" for x in lines))), purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    try:
        deadline = time.monotonic() + 30
        while not r.zcard("ferry:jobs:running"):  # a line is running on the worker
            assert time.monotonic() < deadline, "no line started"
            time.sleep(0.05)
        worker.kill()
        time.sleep(5)  # past FERRY_WORKER_TIMEOUT (3 s): the model has no live worker
        worker = Worker("scratch", redis_server.url, logs).start()
        deadline = time.monotonic() + 60
        while (batch := client.batches.retrieve(batch.id)).status not in (
                "completed", "failed", "cancelled", "expired"):
            assert time.monotonic() < deadline, batch.status
            time.sleep(0.5)
    finally:
        worker.kill()
    assert batch.status == "completed"
    assert batch.error_file_id is None, client.files.content(batch.error_file_id).text
    records = [json.loads(x) for x in client.files.content(batch.output_file_id).text.split("\n")
               if x]
    assert sorted(rec["custom_id"] for rec in records) == sorted(f"l{i}" for i in range(8))
    for rec in records:
        assert rec["response"]["status_code"] == 200
        i = rec["custom_id"][1:]
        assert rec["response"]["body"]["choices"][0]["message"]["content"] == f"t{i}."


def test_a_request_whose_message_is_lost_fails_fast(stack):
    """A queued request whose Celery message vanished (what Redis losing its last second of
    writes looks like) ends with job_lost within seconds, not after FERRY_QUEUE_TIMEOUT."""
    web, r = stack["web"], redis.Redis.from_url(stack["redis"].url)
    body = {"model": "doomed", "messages": script(count=100, delay=0.1)}  # holds the worker

    def hold():
        try:
            requests.post(web.url + "/v1/chat/completions", json=body, timeout=60)
        except requests.RequestException:
            pass  # cut when the stack stops

    busy = threading.Thread(target=hold, daemon=True)
    busy.start()
    deadline = time.monotonic() + 10
    while not r.zcard("ferry:jobs:running"):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    answer: dict = {}

    def queued():
        resp = requests.post(web.url + "/v1/chat/completions", timeout=60,
                             json={"model": "doomed", "messages": script(tokens=["x"])})
        answer.update(status=resp.status_code, body=resp.json(), at=time.monotonic())

    t = threading.Thread(target=queued)
    t.start()
    deadline = time.monotonic() + 10
    while r.llen("ferry.doomed") < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    [job_id] = [m.decode() for m in r.zrange("ferry:queued:ferry.doomed:interactive", 0, -1)]
    r.delete("ferry.doomed")
    lost_at = time.monotonic()
    t.join(30)
    assert answer, "the request whose message was lost got no answer in 30 s"
    assert (answer["status"], answer["body"]["error"]["code"]) == (503, "job_lost")
    assert answer["at"] - lost_at < 10
    assert r.hget(f"ferry:job:{job_id}", "status") == b"failed"
    assert json.loads(r.hget(f"ferry:job:{job_id}", "error"))["code"] == "job_lost"


def test_a_job_ended_while_redis_is_down_is_recorded_once_it_is_back(stack, tmp_path):
    """The worker retries writing the job's end (and its events) until Redis answers again,
    instead of logging the failure and leaving the job in_progress for good."""
    web = stack["web"]
    job = requests.post(web.url + "/v1/jobs", timeout=30, json={
        "endpoint": "/v1/chat/completions",
        "body": {"model": "doomed", "messages": script(count=10, delay=0.1)}}).json()
    deadline = time.monotonic() + 10
    while requests.get(f"{web.url}/v1/jobs/{job['id']}", timeout=5).json()["status"] != "in_progress":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    restart_redis(stack, tmp_path, down=3.0)  # the job ends (after ~1 s) while Redis is down
    deadline = time.monotonic() + 30
    while True:
        try:
            found = requests.get(f"{web.url}/v1/jobs/{job['id']}", timeout=5).json()
        except requests.RequestException:
            found = {}
        if found.get("status") in ("completed", "failed", "cancelled", "expired"):
            break
        assert time.monotonic() < deadline, found
        time.sleep(0.2)
    assert found["status"] == "completed", found
    assert found["result"]["choices"][0]["message"]["content"] == "".join(
        f"t{i} " for i in range(10))
    # Its replay buffer ends with its terminal event too.
    with requests.get(f"{web.url}/v1/jobs/{job['id']}/events", stream=True, timeout=10) as resp:
        kinds = [line for line in resp.iter_lines() if line.startswith(b"event: ")]
    assert kinds[-1] == b"event: done"


def test_a_stream_across_a_quick_redis_restart_ends(stack, tmp_path):
    """Redis killed and started again at once, as its supervisor does: the stream ends (its
    last events, published while Redis was down, are gone: an error event) instead of
    hanging, and Ferry serves again. Also what the relay does when redis-py reconnects its
    pub/sub connection by itself (``Relay._reconnected``)."""
    web = stack["web"]
    client = openai.OpenAI(base_url=web.url + "/v1", api_key="x", max_retries=0, timeout=20)
    outcome: list = []

    def stream():
        try:
            for chunk in client.chat.completions.create(
                    model="doomed", stream=True, messages=script(count=20, delay=0.05)):
                if not outcome:
                    outcome.append("first")
            outcome.append("done")
        except Exception as e:  # noqa: BLE001 - asserted below
            outcome.append(e)

    t = threading.Thread(target=stream)
    t.start()
    deadline = time.monotonic() + 10
    while not outcome:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    restart_redis(stack, tmp_path)
    t.join(25)
    assert not t.is_alive(), "the stream hung across the Redis restart"
    assert outcome[-1] == "done" or isinstance(outcome[-1], openai.APIError), outcome
    r = chat_once_recovered(client, "doomed", script(tokens=["ok"]))
    assert r.choices[0].message.content == "ok"


@pytest.mark.parametrize("bulk", [False, True])
def test_missing_finds_only_jobs_whose_message_is_gone(tmp_path, bulk):
    """``JobStore.missing`` reads the right Celery list for each lane (bulk lines are sent
    at the lowest priority, a list of their own)."""
    from config import load_settings
    from tasks.app import make_celery
    from tasks.jobs.shapes import ResponseSpec
    from tasks.jobs.store import JobStore

    server = RedisServer(tmp_path).start()
    try:
        settings = load_settings().model_copy(update={"redis_url": server.url})
        r = redis.Redis.from_url(server.url)
        jobs, celery = JobStore(r, settings), make_celery(settings)
        for job_id in ("kept", "lost"):
            jobs.create(job_id=job_id, endpoint="/v1/chat/completions", model="m",
                        queue="ferry.m", spec=ResponseSpec(endpoint="/v1/chat/completions"),
                        deadline=time.time() + 60, owner="", bulk=bulk)
            celery.send_task("ferry.generate", args=[{}], queue="ferry.m", task_id=job_id,
                             priority=9 if bulk else None)
        later = time.time() + 1
        assert jobs.missing("ferry.m", bulk, later) == []
        assert jobs.missing("ferry.m", not bulk, later) == []
        [lost] = [m for m in r.lrange(next(k for k in r.keys("ferry.m*")), 0, -1)
                  if b'"id": "lost"' in m]
        r.lrem(next(k for k in r.keys("ferry.m*")), 1, lost)
        assert jobs.missing("ferry.m", bulk, later) == ["lost"]
        assert jobs.missing("ferry.m", bulk, time.time() - 30) == []  # too recent to judge
        assert jobs.fail_lost_message("lost")
        assert jobs.get("lost", owner="").error["code"] == "job_lost"
        assert jobs.missing("ferry.m", bulk, later) == []
    finally:
        server.kill()


def test_a_start_and_an_end_sent_with_the_load_survive_forgotten_scripts(redis_server):
    """A worker sends a job's start and end with its load change (``also``), by the scripts'
    SHA1s. Redis restarted forgets its scripts: the script is sent again, and the load is
    moved once, not twice."""
    from config import load_settings
    from config.contract.protocol import pending_key
    from tasks.jobs.shapes import ResponseSpec
    from tasks.jobs.store import InFlight, JobStore

    r = redis.Redis.from_url(redis_server.url)
    jobs, load = JobStore(r, load_settings()), "test:forgotten:load"
    r.delete(load)
    jobs.create(job_id="forgotten", endpoint="/v1/chat/completions", model="m", queue="ferry.fm",
                spec=ResponseSpec(endpoint="/v1/chat/completions"), deadline=time.time() + 60,
                owner="", in_flight=InFlight(pending_key("ferry.fm"), 10, 0))
    for step in ("start", "finish"):
        r.script_flush()
        if step == "start":
            record, cancel_asked = jobs.start("forgotten", "w1",
                                              also=lambda p: p.hincrby(load, "active", 1))
            assert record.id == "forgotten" and not cancel_asked
            assert r.hget(load, "active") == b"1"
        else:
            assert jobs.finish("forgotten", "completed", result={"ok": 1},
                               also=lambda p: p.hincrby(load, "active", -1))
            assert r.hget(load, "active") == b"0"
    record = jobs.get("forgotten", owner="")
    assert record.status == "completed" and record.result == {"ok": 1}
    assert r.zscore(pending_key("ferry.fm"), "forgotten") is None  # its place freed


def test_a_job_whose_end_redis_lost_is_failed(stack):
    """Redis restarted from its append-only file may lose a job's last write, its end: the
    record says in_progress on a worker that is alive and no longer runs it. The janitor
    sees that in the worker's heartbeat (its running jobs) and fails the job."""
    web, r = stack["web"], redis.Redis.from_url(stack["redis"].url)
    job = requests.post(web.url + "/v1/jobs", timeout=30, json={
        "endpoint": "/v1/chat/completions",
        "body": {"model": "doomed", "messages": script(tokens=["x"])}}).json()
    deadline = time.monotonic() + 10
    while requests.get(f"{web.url}/v1/jobs/{job['id']}", timeout=5).json()["status"] != "completed":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # What the record looks like when the end was lost: as the worker's start left it.
    r.hset(f"ferry:job:{job['id']}", "status", "in_progress")
    r.hdel(f"ferry:job:{job['id']}", "finished", "result")
    r.zadd("ferry:jobs:running", {job["id"]: time.time() - 60})
    deadline = time.monotonic() + 10
    while (found := requests.get(f"{web.url}/v1/jobs/{job['id']}", timeout=5).json())[
            "status"] == "in_progress":
        assert time.monotonic() < deadline, "the job stayed in_progress"
        time.sleep(0.2)
    assert (found["status"], found["error"]["code"]) == ("failed", "worker_lost")
    # A job the worker does run is left alone.
    long = requests.post(web.url + "/v1/jobs", timeout=30, json={
        "endpoint": "/v1/chat/completions",
        "body": {"model": "doomed", "messages": script(count=40, delay=0.1)}}).json()
    while requests.get(f"{web.url}/v1/jobs/{long['id']}", timeout=5).json()["status"] == "queued":
        time.sleep(0.05)
    r.zadd("ferry:jobs:running", {long["id"]: time.time() - 60})
    deadline = time.monotonic() + 30
    while (found := requests.get(f"{web.url}/v1/jobs/{long['id']}", timeout=5).json())[
            "status"] == "in_progress":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert found["status"] == "completed", found
