"""The Batch API end to end with the official client: files.create, batches.create, poll,
files.content; malformed lines, validation failure, cancel, priority, a killed worker."""

from __future__ import annotations

import base64
import io
import json
import re
import signal
import time

import numpy as np
import openai
import pytest
import redis
import requests

from config.contract.protocol import RUNNING_JOBS
from tests.services import Worker

FINAL = ("completed", "failed", "cancelled", "expired")


def jsonl(lines: list) -> bytes:
    return b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines)


def submit(client, lines: list, endpoint: str, **kw):
    f = client.files.create(file=("input.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    return client.batches.create(input_file_id=f.id, endpoint=endpoint, completion_window="24h",
                                 **kw)


def wait(client, batch_id: str, until=lambda b: b.status in FINAL, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        b = client.batches.retrieve(batch_id)
        if until(b):
            return b
        time.sleep(0.1)
    raise AssertionError(f"batch {batch_id} still {b.status} ({b.request_counts})")


def records(client, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


def embed_line(cid: str, inp, **body) -> dict:
    return {"custom_id": cid, "method": "POST", "url": "/v1/embeddings",
            "body": {"model": "all-minilm", "input": inp, **body}}


def chat_line(cid: str, model: str = "synthetic", **script) -> dict:
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": json.dumps(script)}]}}


@pytest.mark.model
def test_embeddings_batch(embedder, batch_worker, embeddings_worker):
    texts = [f"Line {i}: the ferry crosses the bay." for i in range(9)]
    lines = [embed_line(f"req-{i}", t) for i, t in enumerate(texts)]
    lines.insert(3, b"{not json")
    lines.insert(5, embed_line("req-empty", ""))
    lines.insert(7, {**embed_line("req-url", "x"), "url": "/v1/completions"})
    lines.append(embed_line("req-0", "a duplicate custom_id"))
    lines.append(embed_line("req-short", texts[:2], dimensions=8, encoding_format="base64"))
    batch = submit(embedder, lines, "/v1/embeddings", metadata={"job": "nightly"})
    assert batch.object == "batch" and batch.status == "validating"
    assert batch.metadata == {"job": "nightly"} and batch.completion_window == "24h"
    done = wait(embedder, batch.id)
    assert done.status == "completed", done.errors
    assert (done.request_counts.total, done.request_counts.completed,
            done.request_counts.failed) == (14, 10, 4)
    assert done.in_progress_at and done.finalizing_at and done.completed_at
    out = records(embedder, done.output_file_id)
    assert [r["custom_id"] for r in out] == [f"req-{i}" for i in range(9)] + ["req-short"]
    assert all(r["response"]["status_code"] == 200 and r["error"] is None for r in out)
    direct = embedder.embeddings.create(model="all-minilm", input=texts, encoding_format="float")
    got = np.array([r["response"]["body"]["data"][0]["embedding"] for r in out[:9]])
    np.testing.assert_allclose(got, [d.embedding for d in direct.data], atol=1e-5)
    short = out[-1]["response"]["body"]["data"]
    assert len(short) == 2 and isinstance(short[0]["embedding"], str)
    errors = {r["custom_id"]: r for r in records(embedder, done.error_file_id)}
    assert errors[None]["error"]["code"] == "invalid_json_line"
    assert errors["req-empty"]["error"]["code"] == "invalid_body"
    assert errors["req-url"]["error"]["code"] == "invalid_url"
    assert errors["req-0"]["error"]["code"] == "duplicate_custom_id"
    assert embedder.files.retrieve(done.output_file_id).purpose == "batch_output"
    # Each chunk's lines reached the model worker as one job (one Celery message, one record):
    # 14 lines in chunks of 4 (tests/conftest.py) are 4 jobs, each one the worker ran.
    parts_jobs = set(re.findall(r"started job=(\S+)", embeddings_worker.log.read_text()))
    request_ids = {r["response"]["request_id"] for r in out}
    assert len(request_ids) == 4 and request_ids <= parts_jobs


@pytest.mark.model
def test_embedding_lines_answer_as_the_endpoint_does(embedder, web, batch_worker):
    """A chunk's lines run as one job, yet each line gets exactly the status and body that
    POST /v1/embeddings gives the same request, errors found by the worker included."""
    bodies = {
        "plain": {"model": "all-minilm", "input": "The ferry is late."},
        "floats-many": {"model": "all-minilm", "input": ["one", "two", "three"],
                        "encoding_format": "float", "dimensions": 16},
        "b64-tokens": {"model": "all-minilm", "input": [[101, 7592, 102]],
                       "encoding_format": "base64"},
        "too-long": {"model": "all-minilm", "input": ["short", "word " * 400]},
        "too-wide": {"model": "all-minilm", "input": "x", "dimensions": 1000},
        "too-long-and-wide": {"model": "all-minilm", "input": "word " * 400, "dimensions": 1000},
        "bad-token": {"model": "all-minilm", "input": [5, 10 ** 7]},
        "no-model": {"model": "no-such-model", "input": "x"},
        "chat-model": {"model": "smollm2", "input": "x"},
    }
    lines = [{"custom_id": cid, "method": "POST", "url": "/v1/embeddings", "body": body}
             for cid, body in bodies.items()]
    done = wait(embedder, submit(embedder, lines, "/v1/embeddings").id)
    assert done.status == "completed"
    got = {r["custom_id"]: r["response"] for r in records(embedder, done.output_file_id)
           + records(embedder, done.error_file_id)}
    assert set(got) == set(bodies)
    for cid, body in bodies.items():
        direct = requests.post(web.url + "/v1/embeddings", json=body, timeout=30)
        assert got[cid]["status_code"] == direct.status_code, cid
        expected = direct.json()
        if direct.status_code == 200:
            np.testing.assert_allclose(
                [vec(d["embedding"]) for d in got[cid]["body"]["data"]],
                [vec(d["embedding"]) for d in expected["data"]], atol=1e-5, err_msg=cid)
            for d in (got[cid]["body"], expected):
                for item in d["data"]:
                    item["embedding"] = type(item["embedding"]).__name__
        assert got[cid]["body"] == expected, cid
    assert (done.request_counts.completed, done.request_counts.failed) == (3, 6)


@pytest.mark.model
def test_a_chunk_with_many_inputs_is_split_into_jobs_of_at_most_2048(embedder, batch_worker):
    """A job is never larger than one request may be: 4 lines of 1,000 inputs in one chunk
    (tests/conftest.py: 4 lines a chunk) run as two jobs of 2,000."""
    lines = [embed_line(f"big-{i}", [f"word {i} {k}" for k in range(1000)],
                        encoding_format="base64", dimensions=4) for i in range(4)]
    done = wait(embedder, submit(embedder, lines, "/v1/embeddings").id)
    assert done.status == "completed" and done.request_counts.completed == 4
    out = records(embedder, done.output_file_id)
    assert [len(r["response"]["body"]["data"]) for r in out] == [1000] * 4
    jobs = [r["response"]["request_id"] for r in out]
    assert jobs[0] == jobs[1] and jobs[2] == jobs[3] and jobs[0] != jobs[2]


def vec(embedding) -> np.ndarray:
    if isinstance(embedding, str):
        return np.frombuffer(base64.b64decode(embedding), dtype="<f4")
    return np.array(embedding, dtype=np.float32)


def test_chat_batch_and_per_line_http_errors(scripted, batch_worker):
    lines = [chat_line(f"c{i}", tokens=[f"answer {i}"]) for i in range(5)]
    lines.append(chat_line("missing-model", model="gpt-4o", tokens=["x"]))
    lines.append(chat_line("bad-script", tokens=["x"], fail="boom"))
    done = wait(scripted, submit(scripted, lines, "/v1/chat/completions").id)
    assert done.status == "completed"
    assert (done.request_counts.completed, done.request_counts.failed) == (5, 2)
    out = records(scripted, done.output_file_id)
    assert [r["response"]["body"]["choices"][0]["message"]["content"] for r in out] == \
        [f"answer {i}" for i in range(5)]
    assert all(r["response"]["body"]["object"] == "chat.completion" for r in out)
    assert all(r["id"].startswith("batch_req_") and r["response"]["request_id"] for r in out)
    errors = {r["custom_id"]: r for r in records(scripted, done.error_file_id)}
    assert errors["missing-model"]["response"]["status_code"] == 404
    assert errors["missing-model"]["response"]["body"]["error"]["code"] == "model_not_found"
    assert errors["bad-script"]["response"]["status_code"] == 500


def test_no_valid_line_fails_validation(client, batch_worker):
    lines = [b"nonsense", {"custom_id": "a", "method": "GET", "url": "/v1/embeddings", "body": {}},
             embed_line("b", [])]
    done = wait(client, submit(client, lines, "/v1/embeddings").id)
    assert done.status == "failed" and done.failed_at
    assert [(e.line, e.code) for e in done.errors.data] == \
        [(1, "invalid_json_line"), (2, "invalid_method"), (3, "invalid_body")]
    assert done.output_file_id is None


def test_batch_requests_are_validated(client):
    f = client.files.create(file=("x.jsonl", io.BytesIO(jsonl([chat_line("a")]))), purpose="batch")
    with pytest.raises(openai.BadRequestError) as e:
        client.batches.create(input_file_id="file-nope", endpoint="/v1/embeddings",
                              completion_window="24h")
    assert e.value.body["param"] == "input_file_id"
    with pytest.raises(openai.BadRequestError) as e:
        client.batches.create(input_file_id=f.id, endpoint="/v1/images", completion_window="24h")
    assert e.value.body["param"] == "endpoint"
    with pytest.raises(openai.BadRequestError) as e:
        client.batches.create(input_file_id=f.id, endpoint="/v1/embeddings",
                              completion_window="1h")
    assert e.value.body["param"] == "completion_window"
    with pytest.raises(openai.BadRequestError) as e:
        client.batches.create(input_file_id=f.id, endpoint="/v1/embeddings",
                              completion_window="24h",
                              output_expires_after={"anchor": "created_at", "seconds": 3600})
    assert e.value.body["param"] == "output_expires_after"
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")


def test_list_and_cancel(scripted, batch_worker):
    lines = [chat_line(f"s{i}", tokens=["a", "b"], delay=0.1) for i in range(24)]
    batch = submit(scripted, lines, "/v1/chat/completions")
    wait(scripted, batch.id, lambda b: b.request_counts.completed >= 4)
    assert scripted.batches.list(limit=1).data[0].id == batch.id
    assert scripted.batches.cancel(batch.id).status == "cancelling"
    done = wait(scripted, batch.id)
    assert done.status == "cancelled" and done.cancelling_at and done.cancelled_at
    n = done.request_counts.completed
    assert 4 <= n < 24 and done.request_counts.failed == 0
    assert len(records(scripted, done.output_file_id)) == n
    finished = wait(scripted, submit(scripted, lines[:1], "/v1/chat/completions").id)
    with pytest.raises(openai.BadRequestError):
        scripted.batches.cancel(finished.id)


def test_cancel_recalls_lines_already_queued_or_running(scripted, batch_worker):
    """Lines waiting in the model's queue or running when their batch is cancelled are
    cancelled too: the batch ends in seconds, not when every line has run its course."""
    lines = [chat_line(f"h{i}", tokens=["never"], hang=True) for i in range(6)]
    batch = submit(scripted, lines, "/v1/chat/completions")
    wait(scripted, batch.id, lambda b: b.status == "in_progress")
    time.sleep(0.5)  # the first chunks' lines are queued, one of them running
    started = time.monotonic()
    scripted.batches.cancel(batch.id)
    done = wait(scripted, batch.id, timeout=30)
    assert done.status == "cancelled" and time.monotonic() - started < 10
    assert (done.request_counts.completed, done.request_counts.failed) == (0, 0)
    assert done.output_file_id is None and done.error_file_id is None
    # The worker is free: nothing of the batch holds it.
    reply = scripted.chat.completions.create(
        model="synthetic", messages=[{"role": "user", "content": json.dumps({"tokens": ["ok"]})}])
    assert reply.choices[0].message.content == "ok"


def test_lines_whose_model_worker_dies_are_run_again(client, batch_worker, redis_server, logs):
    """A model worker killed under a batch line is not the line's fault: the line runs again
    on a worker that lives (the batch worker's own death is covered below)."""
    first = Worker("doomed", redis_server.url, logs).start()
    second = None
    try:
        lines = [chat_line(f"d{i}", model="doomed", tokens=["a", "b", "c"], delay=0.3)
                 for i in range(5)]
        batch = submit(client, lines, "/v1/chat/completions")
        r = redis.Redis.from_url(redis_server.url)
        deadline = time.monotonic() + 30
        while not r.zcard(RUNNING_JOBS) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # mid-line
        first.kill()
        second = Worker("doomed", redis_server.url, logs).start()
        done = wait(client, batch.id, timeout=120)
        assert done.status == "completed"
        assert (done.request_counts.completed, done.request_counts.failed) == (5, 0)
        out = records(client, done.output_file_id)
        assert sorted(r["custom_id"] for r in out) == [f"d{i}" for i in range(5)]
        assert all(r["response"]["body"]["choices"][0]["message"]["content"] == "abc" for r in out)
        assert "found no worker or lost it; running them again" in batch_worker.log.read_text()
    finally:
        for worker in (first, second):
            if worker is not None:
                worker.kill()


def test_interactive_requests_overtake_batch_lines(scripted, batch_worker, redis_server,
                                                  synthetic_worker):
    """Batch lines wait behind interactive requests in the model's queue: an interactive
    request runs before the batch lines that were already queued when it arrived."""
    r = redis.Redis.from_url(redis_server.url)
    bulk_list = "ferry.synthetic\x06\x169"  # kombu's list for priority 9 on that queue
    lines = [chat_line(f"p{i}", tokens=["x"] * 3, delay=0.1) for i in range(24)]
    batch = submit(scripted, lines, "/v1/chat/completions")
    wait(scripted, batch.id, lambda b: r.llen(bulk_list) >= 3, timeout=60)
    queued = {json.loads(m)["headers"]["id"] for m in r.lrange(bulk_list, 0, -1)}
    reply = scripted.chat.completions.create(
        model="synthetic", messages=[{"role": "user", "content": json.dumps({"tokens": ["now"]})}])
    assert reply.choices[0].message.content == "now"
    done = wait(scripted, batch.id)
    assert done.request_counts.completed == 24
    ran = re.findall(r"finished job=(\S+)", synthetic_worker.log.read_text())
    assert len(queued) >= 3 and queued <= set(ran)
    assert all(ran.index(reply.id) < ran.index(q) for q in queued)


def generations_run(worker) -> int:
    return len(re.findall(r"finished job=\S+", worker.log.read_text()))


def test_killed_batch_worker_loses_and_duplicates_nothing(scripted, batch_worker,
                                                          synthetic_worker):
    lines = [chat_line(f"k{i}", tokens=[f"{i}"], delay=0.15) for i in range(32)]
    runs_before = generations_run(synthetic_worker)
    batch = submit(scripted, lines, "/v1/chat/completions")
    wait(scripted, batch.id, lambda b: b.request_counts.completed >= 8)
    batch_worker.stop(signal.SIGKILL)
    assert batch_worker.proc.returncode == -signal.SIGKILL
    mid = scripted.batches.retrieve(batch.id)
    assert mid.status == "in_progress" and mid.request_counts.completed < 32
    batch_worker.start()
    done = wait(scripted, batch.id, timeout=180)
    assert done.status == "completed"
    assert (done.request_counts.completed, done.request_counts.failed) == (32, 0)
    out = records(scripted, done.output_file_id)
    assert [r["custom_id"] for r in out] == [f"k{i}" for i in range(32)]
    assert [r["response"]["body"]["choices"][0]["message"]["content"] for r in out] == \
        [f"{i}" for i in range(32)]
    assert done.error_file_id is None
    # The kill interrupted chunks in flight: their lines ran again, yet appear once.
    assert generations_run(synthetic_worker) - runs_before > 32


def test_lines_not_started_by_the_deadline_expire(scripted, batch_worker, redis_server):
    lines = [chat_line(f"e{i}", tokens=["a"], delay=0.1) for i in range(24)]
    batch = submit(scripted, lines, "/v1/chat/completions")
    wait(scripted, batch.id, lambda b: b.request_counts.completed >= 4)
    # Move the 24 h window's end to now (white box: the batch's fixed fields, in Redis).
    r = redis.Redis.from_url(redis_server.url)
    static = json.loads(r.hget(f"ferry:batch:{batch.id}", "static"))
    r.hset(f"ferry:batch:{batch.id}", "static", json.dumps({**static, "expires_at": int(time.time())}))
    done = wait(scripted, batch.id)
    assert done.status == "expired" and done.expired_at
    counts = done.request_counts
    assert counts.completed >= 4 and counts.failed > 0 and counts.completed + counts.failed == 24
    expired = records(scripted, done.error_file_id)
    assert {r["error"]["code"] for r in expired} == {"batch_expired"}
    assert len(records(scripted, done.output_file_id)) == counts.completed


def test_cli_runs_a_batch_with_progress_and_downloads_the_output(web, scripted, batch_worker,
                                                                  tmp_path):
    import subprocess
    import sys

    lines = [chat_line(f"c{i}", tokens=[f"answer {i}"]) for i in range(5)]
    lines.append(chat_line("bad", model="gpt-4o", tokens=["x"]))
    src, out, err = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    src.write_bytes(jsonl(lines))
    run = subprocess.run([sys.executable, "-m", "web.cli", "--url", web.url, "batch", str(src),
                          "--endpoint", "/v1/chat/completions", "-o", str(out),
                          "--errors", str(err), "--poll", "0.2"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "6/6 (1 failed) completed" in run.stderr
    got = {r["custom_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert {f"c{i}" for i in range(5)} <= set(got)
    assert got["c2"]["response"]["body"]["choices"][0]["message"]["content"] == "answer 2"
    assert "bad" not in got
    errors = {r["custom_id"]: r for r in map(json.loads, err.read_text().splitlines())}
    assert errors["bad"]["response"]["status_code"] == 404


def test_batch_lines_are_not_refused_by_the_interactive_in_flight_limit(
        scripted, batch_worker, redis_server, logs):
    from tests.services import Worker

    worker = Worker("tight", redis_server.url, logs).start()
    try:
        lines = [chat_line(f"t{i}", model="tight", tokens=[f"x{i}"], delay=0.01)
                 for i in range(12)]
        b = wait(scripted, submit(scripted, lines, "/v1/chat/completions").id)
        assert b.status == "completed"
        assert (b.request_counts.completed, b.request_counts.failed) == (12, 0)
        assert {r["custom_id"] for r in records(scripted, b.output_file_id)} == \
            {f"t{i}" for i in range(12)}
    finally:
        worker.kill()


def test_a_chunk_message_lost_in_transit_is_queued_again(scripted, batch_worker, redis_server):
    """Kombu takes a message off the list before it records it as unacknowledged; a worker
    killed in between loses it for good. Removing a queued chunk's message stands for that
    loss: the batch stalls, and the batch worker's sweep queues the chunk again."""
    r = redis.Redis.from_url(redis_server.url)
    lines = [chat_line(f"l{i}", tokens=[f"{i}"], delay=0.05) for i in range(48)]
    batch = submit(scripted, lines, "/v1/chat/completions")
    lost = None
    deadline = time.monotonic() + 60
    while lost is None:
        assert time.monotonic() < deadline, "no chunk was ever waiting in the batch queue"
        if r.llen("ferry:bq:ferry.batch") >= 2:
            lost = r.rpop("ferry:bq:ferry.batch")
        time.sleep(0.01)
    assert json.loads(lost)["headers"]["task"] == "ferry.batch.chunk"
    done = wait(scripted, batch.id, timeout=120)
    assert done.status == "completed"
    assert (done.request_counts.completed, done.request_counts.failed) == (48, 0)
    assert [x["custom_id"] for x in records(scripted, done.output_file_id)] == \
        [f"l{i}" for i in range(48)]
    assert f"batch {batch.id} made no progress" in batch_worker.log.read_text()
    # Its output expires as OpenAI's does (FERRY_FILE_TTL), and so does its record.
    out = scripted.files.retrieve(done.output_file_id)
    assert out.expires_at == out.created_at + 30 * 86400
    assert 29 * 86400 < r.ttl(f"ferry:batch:{batch.id}") <= 30 * 86400


def test_deleting_the_input_file_mid_run_fails_the_batch(scripted, batch_worker):
    lines = [chat_line(f"f{i}", tokens=["x"], delay=0.1) for i in range(64)]
    batch = submit(scripted, lines, "/v1/chat/completions")
    wait(scripted, batch.id, lambda b: b.request_counts.completed >= 4)
    scripted.files.delete(batch.input_file_id)
    done = wait(scripted, batch.id, timeout=60)
    assert done.status == "failed"
    assert [e.code for e in done.errors.data] == ["invalid_file"]
    assert done.errors.data[0].param == "input_file_id"


def test_an_input_file_over_the_line_limit_fails_without_being_read_whole(client,
                                                                          batch_worker):
    """50,000 requests per batch, as OpenAI: validation stops at the next one."""
    f = client.files.create(file=("many.jsonl", io.BytesIO(b"{}\n" * 50_100)), purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    done = wait(client, batch.id, timeout=60)
    assert done.status == "failed"
    (err,) = done.errors.data
    assert err.code == "too_many_requests_in_file" and err.line == 50_001
    assert "FERRY_BATCH_MAX_LINES" in err.message


def test_a_chunk_that_fails_every_retry_ends_its_batch(scripted, batch_worker, redis_server):
    """Chunks retry failures (FERRY_BATCH_CHUNK_RETRIES, 2 here); one that fails them all
    must not leave its batch in_progress for ever. White box: deleting the batch's plan from
    Redis makes every chunk fail."""
    r = redis.Redis.from_url(redis_server.url)
    lines = [chat_line(f"r{i}", tokens=["x"], delay=0.2) for i in range(64)]
    batch = submit(scripted, lines, "/v1/chat/completions")
    wait(scripted, batch.id, lambda b: b.status == "in_progress", timeout=60)
    r.delete(f"ferry:batch:{batch.id}:plan")
    done = wait(scripted, batch.id, timeout=60)
    assert done.status == "failed"
    assert [e.code for e in done.errors.data] == ["batch_chunk_failed"]
    assert "giving up" in batch_worker.log.read_text()
