"""Tenants: with API keys on, each key sees only what it made (files, batches, jobs, the
jobs of its synchronous requests), batches run as their owner, per-key and per-address limits.

The stack here has its own redis-server, workers and batch worker, all with keys on: a
batch worker of the session (keys off) must not pick up these batches.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import time

import pytest
import redis
import requests

from config.tenants import owner_of
from tests.conftest import BATCH_ENV
from tests.jobclient import CHAT, scripted
from tests.services import BatchWorker, RedisServer, Web, Worker

ALICE, BOB, CAROL = "alice-secret-key-1", "bob-secret-key-2", "carol-secret-key-4"
ADMIN = "admin-secret-key-3"
KEYS = json.dumps([ALICE, {"key": BOB, "name": "bob", "max_in_flight": 2, "rpm": 1000,
                           "max_file_bytes": 2000},
                   {"key": CAROL, "name": "carol", "rpm": 3}])
FINAL = ("completed", "failed", "cancelled", "expired")
# Wrong keys an address may send per minute here.
FAILURES = 3


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    logs = tmp_path_factory.mktemp("tenant-logs")
    files = tmp_path_factory.mktemp("tenant-files")
    env = dict(FERRY_API_KEYS=KEYS, FERRY_ADMIN_KEY=ADMIN, FERRY_FILES_DIR=str(files),
               FERRY_AUTH_FAILURES_PER_MINUTE=str(FAILURES), **BATCH_ENV)
    server = RedisServer(logs).start()
    started = []
    try:
        for service in (Worker("synthetic", server.url, logs),
                        Worker("all-minilm", server.url, logs),
                        Web(server.url, logs, **env), BatchWorker(server.url, logs, **env)):
            started.append(service.start())
        yield server, started[2]
    finally:
        for service in reversed(started):
            service.stop()
        server.stop()


@pytest.fixture(scope="module")
def web(stack):
    return stack[1]


def session(key: str) -> requests.Session:
    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {key}"
    return s


@pytest.fixture(scope="module")
def alice():
    return session(ALICE)


@pytest.fixture(scope="module")
def bob():
    return session(BOB)


def upload(who: requests.Session, web, lines: list[dict], purpose: str = "batch") -> dict:
    data = b"".join(json.dumps(x).encode() + b"\n" for x in lines)
    r = who.post(web.url + "/v1/files", files={"file": ("in.jsonl", io.BytesIO(data))},
                 data={"purpose": purpose}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def start_batch(who, web, lines: list[dict], endpoint: str) -> dict:
    f = upload(who, web, lines)
    r = who.post(web.url + "/v1/batches", json={"input_file_id": f["id"], "endpoint": endpoint,
                                                "completion_window": "24h"}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def wait_batch(who, web, batch_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        b = who.get(f"{web.url}/v1/batches/{batch_id}", timeout=10).json()
        if b["status"] in FINAL or time.monotonic() > deadline:
            return b
        time.sleep(0.1)


def content(who, web, file_id: str) -> list[dict]:
    r = who.get(f"{web.url}/v1/files/{file_id}/content", timeout=10)
    assert r.status_code == 200, r.text
    return [json.loads(x) for x in r.text.splitlines()]


def assert_not_found(r: requests.Response) -> None:
    assert r.status_code == 404, (r.status_code, r.text)
    assert r.json()["error"]["code"] == "not_found"


def chat_line(cid: str, **script) -> dict:
    return {"custom_id": cid, "method": "POST", "url": CHAT, "body": scripted(**script)}


def test_files_are_seen_only_by_their_owner(web, alice, bob):
    f = upload(alice, web, [chat_line("a", tokens=["x"])])

    def listed(who):
        return [x["id"] for x in who.get(web.url + "/v1/files", timeout=10).json()["data"]]

    assert f["id"] in listed(alice) and f["id"] not in listed(bob)
    for method, path in (("GET", ""), ("GET", "/content"), ("DELETE", "")):
        assert_not_found(bob.request(method, f"{web.url}/v1/files/{f['id']}{path}", timeout=10))
    assert alice.get(f"{web.url}/v1/files/{f['id']}/content", timeout=10).status_code == 200
    assert alice.delete(f"{web.url}/v1/files/{f['id']}", timeout=10).json()["deleted"] is True


def test_batches_are_seen_only_by_their_owner(web, alice, bob):
    batch = start_batch(alice, web, [chat_line("a", tokens=["x"])], CHAT)
    r = bob.post(web.url + "/v1/batches", json={"input_file_id": batch["input_file_id"],
                                                 "endpoint": CHAT, "completion_window": "24h"},
                 timeout=10)
    assert r.status_code in (400, 404) and r.json()["error"]["param"] == "input_file_id"

    def ids(who):
        return [b["id"] for b in who.get(web.url + "/v1/batches", timeout=10).json()["data"]]

    assert batch["id"] in ids(alice) and batch["id"] not in ids(bob)
    assert_not_found(bob.get(f"{web.url}/v1/batches/{batch['id']}", timeout=10))
    assert_not_found(bob.post(f"{web.url}/v1/batches/{batch['id']}/cancel", timeout=10))
    done = wait_batch(alice, web, batch["id"])
    assert done["status"] == "completed", done
    # Its output file is the owner's too.
    assert_not_found(bob.get(f"{web.url}/v1/files/{done['output_file_id']}", timeout=10))


def test_jobs_are_seen_only_by_their_owner(web, alice, bob):
    # Nobody serves "unserved": the job stays queued while bob tries it.
    r = alice.post(web.url + "/v1/jobs", json={"endpoint": CHAT, "body": scripted(
        "unserved", tokens=["x"])}, timeout=10)
    assert r.status_code == 202, r.text
    job = r.json()["id"]
    assert_not_found(bob.get(f"{web.url}/v1/jobs/{job}", timeout=10))
    assert_not_found(bob.get(f"{web.url}/v1/jobs/{job}/events", timeout=10))
    assert_not_found(bob.post(f"{web.url}/v1/jobs/{job}/cancel", timeout=10))
    assert alice.get(f"{web.url}/v1/jobs/{job}", timeout=10).json()["status"] == "queued"
    assert alice.post(f"{web.url}/v1/jobs/{job}/cancel", timeout=10).json()["status"] == "cancelled"


def test_the_job_of_a_synchronous_request_is_its_callers(web, alice, bob):
    r = alice.post(web.url + CHAT, json=scripted(tokens=["o", "k"]), timeout=30)
    assert r.status_code == 200, r.text
    job = r.headers["X-Request-Id"]
    assert alice.get(f"{web.url}/v1/jobs/{job}", timeout=10).json()["result"] == r.json()
    assert_not_found(bob.get(f"{web.url}/v1/jobs/{job}", timeout=10))


@pytest.mark.parametrize("endpoint, line, check", [
    (CHAT, chat_line("c1", tokens=["chat ", "line"]),
     lambda body: body["choices"][0]["message"]["content"] == "chat line"),
    ("/v1/completions", {"custom_id": "c1", "method": "POST", "url": "/v1/completions",
                         "body": {"model": "synthetic", "prompt": json.dumps(
                             {"tokens": ["text ", "line"]})}},
     lambda body: body["choices"][0]["text"] == "text line"),
    ("/v1/embeddings", {"custom_id": "c1", "method": "POST", "url": "/v1/embeddings",
                        "body": {"model": "all-minilm", "input": "the ferry"}},
     lambda body: len(body["data"][0]["embedding"]) == 384),
])
def test_batch_lines_run_as_the_batch_owner(web, alice, endpoint, line, check):
    """Lines run with no bearer key, as their batch's owner: none fails with a 401."""
    done = wait_batch(alice, web, start_batch(alice, web, [line], endpoint)["id"])
    assert done["status"] == "completed", done
    assert done["request_counts"] == {"total": 1, "completed": 1, "failed": 0}, \
        content(alice, web, done["error_file_id"]) if done["error_file_id"] else done
    [out] = content(alice, web, done["output_file_id"])
    assert out["custom_id"] == "c1" and out["response"]["status_code"] == 200
    assert check(out["response"]["body"])


def test_per_key_in_flight_limit(web, alice, bob):
    def job(who):
        return who.post(web.url + "/v1/jobs", json={"endpoint": CHAT, "body": scripted(
            "unserved", tokens=["x"])}, timeout=10)

    first = [job(bob) for _ in range(2)]
    assert [r.status_code for r in first] == [202, 202]
    refused = job(bob)
    assert refused.status_code == 429
    err = refused.json()["error"]
    assert err["code"] == "too_many_jobs_in_flight" and "'bob'" in err["message"]
    assert "max_in_flight" in err["message"]
    alice_job = job(alice)  # another key is not held up by bob's
    assert alice_job.status_code == 202
    for r in (*first, alice_job):
        who = bob if r is not alice_job else alice
        who.post(f"{web.url}/v1/jobs/{r.json()['id']}/cancel", timeout=10)
    assert job(bob).status_code == 202  # ended jobs free their places


def test_completed_jobs_free_their_in_flight_places(web, bob):
    """A job the worker runs to its end (nobody waiting on it: /v1/jobs) frees its place in
    its key's in-flight limit (2 for bob): more jobs are taken, one after the other, than
    the limit holds."""
    for _ in range(3):
        r = bob.post(web.url + "/v1/jobs", json={"endpoint": CHAT, "body": scripted(
            tokens=["x"])}, timeout=10)
        assert r.status_code == 202, r.text
        deadline = time.monotonic() + 20
        while bob.get(f"{web.url}/v1/jobs/{r.json()['id']}", timeout=10).json()[
                "status"] != "completed":
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_answered_and_abandoned_requests_free_their_places(web, bob):
    """Answered requests (a body, a whole stream) free their places in bob's in-flight limit
    (2) in the script that ends their job; a stream its client leaves frees its own when
    the web closes it. More requests pass, one after the other, than the limit holds."""
    url = web.url + "/v1/chat/completions"
    for stream in (False, True, False, True):
        r = bob.post(url, json={**scripted(tokens=["x"]), "stream": stream}, timeout=20)
        assert r.status_code == 200, r.text
        assert b"[DONE]" in r.content if stream else r.json()["choices"][0]["message"]
    for _ in range(4):
        deadline = time.monotonic() + 15
        while True:
            r = bob.post(url, json={**scripted(tokens=["x"] * 400, delay=0.05), "stream": True},
                         stream=True, timeout=20)
            if r.status_code != 429:
                break
            r.close()
            assert time.monotonic() < deadline, "an abandoned stream kept its place"
            time.sleep(0.1)
        assert r.status_code == 200, r.text
        assert next(r.iter_lines()).startswith(b"data: ")
        r.close()


def test_per_key_upload_limit(web, bob, alice):
    big = [chat_line(f"l{i}", tokens=["x" * 100]) for i in range(20)]  # > bob's 2,000 bytes
    data = b"".join(json.dumps(x).encode() + b"\n" for x in big)
    r = bob.post(web.url + "/v1/files", files={"file": ("in.jsonl", io.BytesIO(data))},
                 data={"purpose": "batch"}, timeout=10)
    assert r.status_code == 413 and "2000 bytes" in r.json()["error"]["message"]
    assert upload(alice, web, big)["bytes"] == len(data)


def test_per_key_request_rate(web, alice):
    within_one_minute()
    carol = session(CAROL)
    codes = [carol.get(web.url + "/v1/models", timeout=10) for _ in range(4)]
    assert [r.status_code for r in codes] == [200, 200, 200, 429]
    assert "3 requests per minute" in codes[3].json()["error"]["message"]
    assert alice.get(web.url + "/v1/models", timeout=10).status_code == 200


def raw_get(web, path: str, key: str | None, source: str) -> int:
    """GET from a loopback address of our choice: wrong keys are counted per address, and
    those sent here must not hold up the other tests (from 127.0.0.1)."""
    conn = http.client.HTTPConnection("127.0.0.1", web.port, timeout=10,
                                      source_address=(source, 0))
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {key}"} if key else {})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def within_one_minute() -> None:
    """The limits count fixed minutes: start well within one."""
    if time.time() % 60 > 55:
        time.sleep(60 - time.time() % 60)


def test_wrong_keys_are_limited_per_address(web):
    within_one_minute()
    source = "127.0.0.7"
    codes = [raw_get(web, "/v1/models", f"guess-{i}", source) for i in range(FAILURES + 2)]
    assert codes[:FAILURES] == [401] * FAILURES and codes[FAILURES:] == [429, 429]
    # Blocked, even with a valid key, so that a guess that works does not stand out...
    assert raw_get(web, "/v1/models", ALICE, source) == 429
    # ...but only that address.
    assert raw_get(web, "/v1/models", ALICE, "127.0.0.1") == 200


def test_metrics_and_ready_need_the_admin_key(web):
    source = "127.0.0.8"
    for path in ("/metrics", "/ready"):
        assert raw_get(web, path, None, source) == 401
        assert raw_get(web, path, ALICE, source) == 401
        assert raw_get(web, path, ADMIN, source) in (200, 503)  # 503: not every model served
    assert raw_get(web, "/v1/models", ADMIN, source) == 401  # not a tenant's key
    assert raw_get(web, "/health", None, source) == 200


def _values(r: redis.Redis, key: bytes) -> list[bytes]:
    kind = r.type(key)
    if kind == b"string":
        return [r.get(key) or b""]
    if kind == b"hash":
        return [x for kv in r.hgetall(key).items() for x in kv]
    if kind == b"list":
        return r.lrange(key, 0, -1)
    if kind == b"set":
        return list(r.smembers(key))
    if kind == b"zset":
        return r.zrange(key, 0, -1)
    if kind == b"stream":
        return [v for _, fields in r.xrange(key) for kv in fields.items() for v in kv]
    return []


def test_redis_holds_key_digests_never_keys(stack, web, alice):
    upload(alice, web, [chat_line("a", tokens=["x"])])
    r = redis.Redis.from_url(stack[0].url)
    everything = b"\n".join(key + b"\n" + b"\n".join(_values(r, key)) for key in r.scan_iter())
    for key in (ALICE, BOB, ADMIN):
        assert key.encode() not in everything
    assert owner_of(ALICE).encode() in everything  # what the stores record instead


# -- the key format (no services) ---------------------------------------------------------

def test_plain_and_described_keys_in_the_environment(monkeypatch):
    from config.settings import load_settings
    from web.auth import tenant_of

    monkeypatch.setenv("FERRY_API_KEYS", json.dumps(
        ["plain", {"key": "sk-a", "name": "team-a", "rpm": 600, "max_in_flight": 16,
                   "max_file_bytes": 1000000}]))
    settings = load_settings(rate_limit_rpm=100, key_max_in_flight=8)
    plain, team = (tenant_of(settings, k) for k in settings.api_keys)
    assert (plain.name, plain.rpm, plain.max_in_flight, plain.max_file_bytes) == ("", 100, 8, None)
    assert (team.name, team.rpm, team.max_in_flight, team.max_file_bytes) == \
        ("team-a", 600, 16, 1000000)
    assert plain.owner == owner_of("plain") and "plain" not in plain.owner


def test_keys_as_toml_tables(tmp_path, monkeypatch):
    from config.settings import load_settings

    path = tmp_path / "ferry.toml"
    path.write_text('[[api_keys]]\nkey = "sk-b"\nname = "team-b"\nmax_in_flight = 0\n')
    monkeypatch.setenv("FERRY_CONFIG", str(path))
    monkeypatch.delenv("FERRY_API_KEYS", raising=False)
    [key] = load_settings().api_keys
    assert (key.key, key.name, key.max_in_flight, key.rpm) == ("sk-b", "team-b", 0, None)


def test_a_key_listed_twice_is_refused(monkeypatch):
    from pydantic import ValidationError

    from config.settings import load_settings

    monkeypatch.setenv("FERRY_API_KEYS", json.dumps(["same", {"key": "same", "name": "x"}]))
    with pytest.raises(ValidationError, match="listed twice"):
        load_settings()


def test_objects_stored_before_owners_are_the_anonymous_owners(stack, tmp_path):
    """Records written before owners existed (no owner field) belong to the anonymous owner,
    the one owner of a Ferry without keys."""
    from config.errors import NotFound
    from config.tenants import ANONYMOUS
    from tasks.batchstore import BatchStore
    from tasks.filestore import FileStore

    r = redis.Redis.from_url(stack[0].url)
    legacy = {"id": "file-legacy", "object": "file", "bytes": 1, "created_at": 1,
              "filename": "x.jsonl", "purpose": "batch", "status": "processed"}
    r.set("ferry:file:file-legacy", json.dumps(legacy))
    r.zadd("ferry:files", {"file-legacy": 1})
    r.hset("ferry:batch:batch_legacy", mapping={"status": "completed", "static": json.dumps({
        "id": "batch_legacy", "endpoint": CHAT, "input_file_id": "file-legacy",
        "created_at": 1, "expires_at": 2, "metadata": None})})
    r.zadd("ferry:batches", {"batch_legacy": 1})
    files, batches = FileStore(r, tmp_path), BatchStore(r)
    assert files.get("file-legacy", owner=ANONYMOUS).id == "file-legacy"
    assert [f.id for f in files.list(ANONYMOUS, None, "desc", None, 10)[0]] == ["file-legacy"]
    assert batches.get("batch_legacy", owner=ANONYMOUS).status == "completed"
    assert "batch_legacy" in [b.id for b in batches.list(ANONYMOUS, None, 10)[0]]
    with pytest.raises(NotFound):
        files.get("file-legacy", owner=owner_of(ALICE))
    with pytest.raises(NotFound):
        batches.get("batch_legacy", owner=owner_of(ALICE))
    assert "file-legacy" not in [f.id for f in files.list(owner_of(ALICE), None, "desc", None,
                                                          100)[0]]


def test_the_cli_sends_its_key(web, tmp_path):
    import subprocess
    import sys

    request = tmp_path / "request.json"
    request.write_text(json.dumps(scripted(tokens=["cl", "i"])))
    cli = [sys.executable, "-m", "web.cli", "--url", web.url]
    run = subprocess.run([*cli, "--api-key", ALICE, "submit", str(request)], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["choices"][0]["message"]["content"] == "cli"
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps(chat_line("c", tokens=["batch"])) + "\n")
    run = subprocess.run([*cli, "batch", str(src), "--endpoint", CHAT, "-o", str(out),
                          "--poll", "0.2"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "FERRY_API_KEY": ALICE})
    assert run.returncode == 0, run.stderr
    [record] = [json.loads(x) for x in out.read_text().splitlines()]
    assert record["response"]["body"]["choices"][0]["message"]["content"] == "batch"


def test_job_list_shows_only_the_callers_jobs(web, alice, bob):
    """GET /v1/jobs with keys on: each key lists its own jobs (submitted and synchronous),
    never another's, and another key's job id as a cursor finds nothing."""
    made = {}
    for name, who in (("alice", alice), ("bob", bob)):
        r = who.post(web.url + "/v1/jobs", json={"endpoint": CHAT, "body": scripted(
            tokens=[name])}, timeout=10)
        assert r.status_code == 202, r.text
        sync = who.post(web.url + CHAT, json=scripted(tokens=["s"]), timeout=30)
        assert sync.status_code == 200, sync.text
        made[name] = {r.json()["id"], sync.headers["X-Request-Id"]}
    for name, who in (("alice", alice), ("bob", bob)):
        listed = who.get(web.url + "/v1/jobs", params={"limit": 100}, timeout=10).json()
        ids = {j["id"] for j in listed["data"]}
        other = made["bob" if name == "alice" else "alice"]
        assert made[name] <= ids and not ids & other, (name, ids)
    cursor = next(iter(made["alice"]))
    r = bob.get(web.url + "/v1/jobs", params={"after": cursor}, timeout=10)
    assert r.status_code == 200 and r.json()["data"] == []
    assert requests.get(web.url + "/v1/jobs", timeout=10).status_code == 401
