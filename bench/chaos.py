"""Faults under ``make run`` (issue #13): mixed traffic for a few minutes while a model worker
is SIGKILLed every ~30 s (as the OOM killer would) and Redis is SIGKILLed once; supervisord
restarts each. Reported, each with its goal:

- requests answered with a result or a clean error (an OpenAI error body, or a stream's
  error event), against those cut without one (goal 0) and those that hung (goal 0);
- submitted jobs still not terminal once the traffic stopped and the stack settled (goal 0);
- batch lines lost or written twice, over the output and error files (goal 0);
- the time each fault took to heal: from the kill until the process is back and a request
  to it succeeds.

    python -m bench.chaos [--minutes 3] [--every 30]

The stack is ``python -m tasks.launch`` (what ``make run`` runs after its install) with the default
registry, on free ports and a temporary data directory.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import redis
import requests

from bench.common import print_table, save
from tests.runstack import MakeRun

HUNG_AFTER = 60.0  # seconds without an answer after which a request counts as hung
TERMINAL = {"completed", "failed", "cancelled", "expired"}
CHAT = {"model": "smollm2", "max_tokens": 16,
        "messages": [{"role": "user", "content": "Name a colour."}]}


def error_code(body) -> str | None:
    """The code of an OpenAI error body; None for anything else."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and "message" in error:
        return str(error.get("code") or error.get("type"))
    return None


def answer(r: requests.Response, ok: int = 200) -> str:
    if r.status_code == ok:
        return "result"
    try:
        code = error_code(r.json())
    except ValueError:
        code = None
    return "cut" if code is None else f"error:{code}"


def classify(send) -> str:
    """One request's outcome: result, error:<code> (a clean error), cut (no answer and no
    error) or hung."""
    try:
        return send()
    except requests.Timeout:
        return "hung"
    except requests.RequestException:
        return "cut"


def stream_chat(url: str) -> str:
    with requests.post(url + "/v1/chat/completions", json={**CHAT, "stream": True},
                       stream=True, timeout=(5, HUNG_AFTER)) as r:
        if r.status_code != 200:
            return answer(r)
        last = None
        for line in r.iter_lines():
            if line:
                last = line
        if last == b"data: [DONE]":
            return "result"
        code = error_code(json.loads(last.removeprefix(b"data: "))) if last else None
        return "cut" if code is None else f"error:{code}"


def chat(url: str) -> str:
    return answer(requests.post(url + "/v1/chat/completions", json=CHAT,
                                timeout=(5, HUNG_AFTER)))


def embed(url: str) -> str:
    body = {"model": "all-minilm", "input": [f"ferry {i}" for i in range(8)]}
    return answer(requests.post(url + "/v1/embeddings", json=body, timeout=(5, HUNG_AFTER)))


class Traffic(threading.Thread):
    """One client in a loop, counting outcomes (and the jobs it submitted)."""

    def __init__(self, name: str, url: str, stop: threading.Event, pause: float = 0.0):
        super().__init__(daemon=True, name=name)
        self.url, self.stop, self.pause = url, stop, pause
        self.outcomes: Counter[str] = Counter()
        self.jobs: list[str] = []

    def run(self) -> None:
        send = {"stream": stream_chat, "chat": chat, "embed": embed, "job": self._job}[self.name]
        while not self.stop.is_set():
            outcome = classify(lambda: send(self.url))
            self.outcomes[outcome] += 1
            # A client told of an error waits a second before it tries again, as a polite
            # client does (an answer at once, 503 "no worker", would otherwise be counted
            # hundreds of times during a restart).
            time.sleep(self.pause if outcome == "result" else max(self.pause, 1.0))

    def _job(self, url: str) -> str:
        r = requests.post(url + "/v1/jobs", json={"endpoint": "/v1/chat/completions",
                                                  "body": CHAT}, timeout=(5, HUNG_AFTER))
        if r.status_code == 202:
            self.jobs.append(r.json()["id"])
        return answer(r, ok=202)


def worker_pid(client: redis.Redis, model: str) -> int | None:
    for member in client.zrangebyscore(f"ferry:workers:ferry.{model}", time.time() * 1000,
                                       "+inf"):
        return int(member.decode().removeprefix(f"{model}.").partition("@")[0])
    return None


def heal(check, timeout: float = 120.0) -> float | None:
    """Seconds until ``check()`` holds (None: it did not within ``timeout``)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            if check():
                return time.monotonic() - started
        except (redis.RedisError, requests.RequestException):
            pass
        time.sleep(0.2)
    return None


def kill_worker(run: MakeRun, client: redis.Redis, model: str) -> dict:
    heal(lambda: worker_pid(client, model) is not None)  # back from an earlier fault
    pid = worker_pid(client, model)
    os.kill(pid, signal.SIGKILL)
    back = heal(lambda: worker_pid(client, model) not in (None, pid))
    send = chat if model == "smollm2" else embed
    answered = heal(lambda: send(run.url) == "result")
    return {"fault": f"SIGKILL {model}", "back_s": back,
            "answered_s": None if None in (back, answered) else back + answered}


def kill_redis(run: MakeRun, client: redis.Redis) -> dict:
    os.kill(int(client.info("server")["process_id"]), signal.SIGKILL)
    time.sleep(0.5)
    back = heal(client.ping)
    answered = heal(lambda: chat(run.url) == "result")
    return {"fault": "SIGKILL redis", "back_s": None if back is None else back + 0.5,
            "answered_s": None if None in (back, answered) else back + answered + 0.5}


def start_batches(run: MakeRun, work: Path) -> list[tuple[str, list[str]]]:
    """One chat batch and one embeddings batch; returns (batch id, custom ids) of each."""
    made = []
    for endpoint, count, body in (
            ("/v1/chat/completions", 40, lambda i: {**CHAT, "seed": i}),
            ("/v1/embeddings", 400, lambda i: {"model": "all-minilm", "input": f"line {i}"})):
        ids = [f"{endpoint.rsplit('/', 1)[1]}-{i}" for i in range(count)]
        path = work / f"{ids[0]}.jsonl"
        path.write_text("".join(json.dumps({"custom_id": cid, "method": "POST", "url": endpoint,
                                            "body": body(i)}) + "\n"
                                for i, cid in enumerate(ids)))
        with path.open("rb") as f:
            file_id = requests.post(run.url + "/v1/files", data={"purpose": "batch"},
                                    files={"file": f}, timeout=30).json()["id"]
        batch = requests.post(run.url + "/v1/batches", timeout=30, json={
            "input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h"}).json()
        made.append((batch["id"], ids))
    return made


def check_batch(run: MakeRun, batch_id: str, ids: list[str], timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        batch = requests.get(f"{run.url}/v1/batches/{batch_id}", timeout=30).json()
        if batch["status"] in TERMINAL or time.monotonic() > deadline:
            break
        time.sleep(1)
    seen: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for key in ("output_file_id", "error_file_id"):
        if batch.get(key):
            text = requests.get(f"{run.url}/v1/files/{batch[key]}/content", timeout=30).text
            records = [json.loads(line) for line in text.splitlines() if line]
            seen.update(r["custom_id"] for r in records)
            errors.update(error_code((r.get("response") or {}).get("body"))
                          or error_code(r) or "?" for r in records if key == "error_file_id")
    return {"batch": batch_id, "status": batch["status"], "lines": len(ids),
            "errors": dict(errors),
            "lost": sum(1 for cid in ids if cid not in seen),
            "duplicated": sum(n - 1 for n in seen.values() if n > 1)}


def unfinished_jobs(run: MakeRun, ids: list[str], timeout: float) -> dict[str, str]:
    """The jobs still not terminal after ``timeout`` seconds, with their status."""
    deadline = time.monotonic() + timeout
    left = {j: "" for j in ids}
    while left and time.monotonic() < deadline:
        statuses = {j: requests.get(f"{run.url}/v1/jobs/{j}", timeout=30).json().get("status")
                    for j in left}
        left = {j: status for j, status in statuses.items() if status not in TERMINAL}
        time.sleep(1)
    return left


def faults(run: MakeRun, client: redis.Redis, minutes: float, every: float) -> list[dict]:
    """A worker kill every ``every`` seconds (alternating models), Redis once halfway."""
    done, started, models, redis_done = [], time.monotonic(), ["smollm2", "all-minilm"], False
    while time.monotonic() - started < minutes * 60:
        next_at = time.monotonic() + every
        if not redis_done and time.monotonic() - started >= minutes * 30:
            done.append(kill_redis(run, client))
            redis_done = True
        else:
            done.append(kill_worker(run, client, models[len(done) % 2]))
        print(f"  {done[-1]}", flush=True)
        time.sleep(max(0.0, next_at - time.monotonic()))
    return done


def run(minutes: float, every: float) -> dict:
    work = Path(tempfile.mkdtemp(prefix="ferry-chaos-"))
    stack = MakeRun(work / "data", FERRY_CONFIG="", FERRY_WORKER_TIMEOUT="5",
                    FERRY_HEARTBEAT_INTERVAL="1",
                    # A batch whose chunk message died with Redis is resumed within the
                    # run; the line timeout stays below it (checked at start) and well
                    # above a line's wait behind the interactive traffic on 2 cores.
                    FERRY_BATCH_VISIBILITY_TIMEOUT="360", FERRY_BATCH_LINE_TIMEOUT="300")
    try:
        stack.start().wait_ready()
        client = redis.Redis.from_url(stack.redis_url, socket_timeout=5)
        batches = start_batches(stack, work)
        stop = threading.Event()
        clients = [Traffic("stream", stack.url, stop), Traffic("chat", stack.url, stop),
                   Traffic("embed", stack.url, stop), Traffic("job", stack.url, stop, 3.0)]
        for c in clients:
            c.start()
        done = faults(stack, client, minutes, every)
        stop.set()
        for c in clients:
            c.join(HUNG_AFTER + 10)
        lines = [check_batch(stack, b, ids, timeout=600) for b, ids in batches]
        jobs = [j for c in clients for j in c.jobs]
        return {"minutes": minutes, "faults": done, "batches": lines,
                "requests": {c.name: dict(c.outcomes) for c in clients},
                "jobs": len(jobs), "jobs_not_terminal": unfinished_jobs(stack, jobs, 120),
                "logs": str(work / "data" / "logs")}
    finally:
        stack.interrupt()
        try:
            stack.wait(90)
        finally:
            stack.kill()


def report(result: dict) -> bool:
    codes = sorted({k for c in result["requests"].values() for k in c} - {"result", "cut", "hung"})
    kinds = ["result", *codes, "cut", "hung"]
    print_table("requests under faults (error:<code> = a clean OpenAI error)", ["client", *kinds],
                [[name, *(counts.get(k, 0) for k in kinds)]
                 for name, counts in result["requests"].items()])
    print_table("faults: seconds until the process was back / a request to it succeeded",
                ["fault", "back", "answered"],
                [[f["fault"], f["back_s"], f["answered_s"]] for f in result["faults"]])
    print_table("batches", ["batch", "status", "lines", "errors", "lost", "duplicated"],
                [[b["batch"], b["status"], b["lines"], b["errors"], b["lost"], b["duplicated"]]
                 for b in result["batches"]])
    left = result["jobs_not_terminal"]
    print(f"jobs submitted: {result['jobs']}, not terminal at the end: {len(left)} "
          f"{dict(Counter(left.values()))}; logs in {result['logs']}")
    bad = sum(c.get("cut", 0) + c.get("hung", 0) for c in result["requests"].values())
    return (bad == 0 and not left
            and all(f["answered_s"] is not None for f in result["faults"])
            and all(b["lost"] == 0 and b["duplicated"] == 0 for b in result["batches"]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--every", type=float, default=30.0, help="seconds between faults")
    a = p.parse_args()
    result = run(a.minutes, a.every)
    ok = report(result)
    save("chaos", {**result, "goals_met": ok})
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
