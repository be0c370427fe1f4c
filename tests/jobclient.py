"""A few helpers to drive /v1/jobs over plain HTTP in tests, and a batch with the official
OpenAI client."""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass

import requests

CHAT = "/v1/chat/completions"


def script(**kw) -> list[dict]:
    """Chat messages for the synthetic backend (models/synthetic.py)."""
    return [{"role": "user", "content": json.dumps(kw)}]


def scripted(model: str = "synthetic", **kw) -> dict:
    return {"model": model, "messages": script(**kw)}


def submit(web, body: dict, endpoint: str = CHAT, **extra) -> requests.Response:
    return requests.post(web.url + "/v1/jobs", json={"endpoint": endpoint, "body": body, **extra},
                         timeout=10)


def submitted(web, body: dict, endpoint: str = CHAT, **extra) -> dict:
    r = submit(web, body, endpoint, **extra)
    assert r.status_code == 202, r.text
    return r.json()


def get(web, job_id: str) -> requests.Response:
    return requests.get(f"{web.url}/v1/jobs/{job_id}", timeout=10)


def cancel(web, job_id: str) -> requests.Response:
    return requests.post(f"{web.url}/v1/jobs/{job_id}/cancel", timeout=10)


def wait_status(web, job_id: str, *statuses: str, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = get(web, job_id).json()
        if job["status"] in statuses:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} is {job['status']}, not {statuses}")
        time.sleep(0.05)


@dataclass
class Event:
    id: int | None
    event: str
    data: dict


def events(web, job_id: str, last_event_id: int | None = None, limit: int | None = None,
           timeout: float = 30) -> list[Event]:
    """Read the job's SSE events until the stream ends, or drop the connection after
    ``limit`` events (as a client that goes away would)."""
    headers = {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}
    out: list[Event] = []
    with requests.get(f"{web.url}/v1/jobs/{job_id}/events", headers=headers, stream=True,
                      timeout=timeout) as r:
        assert r.status_code == 200, r.text
        assert r.headers["Content-Type"].startswith("text/event-stream")
        fields: dict[str, str] = {}
        for line in r.iter_lines(decode_unicode=True):
            if line:
                if not line.startswith(":"):
                    key, _, value = line.partition(": ")
                    fields[key] = value
                continue
            if not fields:
                continue
            out.append(Event(int(fields["id"]) if "id" in fields else None,
                             fields.get("event", "message"), json.loads(fields["data"])))
            fields = {}
            if limit is not None and len(out) >= limit:
                break
    return out


def text_of(evs: list[Event]) -> str:
    return "".join(e.data["text"] for e in evs if e.event == "delta")


def batch_responses(client, lines: list[dict], endpoint: str, timeout: float = 60) -> dict:
    """``lines`` run as one batch with the official OpenAI ``client``, which must complete;
    each line's ``response`` (from the output and error files) by its ``custom_id``."""
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    f = client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint=endpoint,
                                  completion_window="24h")
    deadline = time.monotonic() + timeout
    while batch.status not in ("completed", "failed", "cancelled", "expired") \
            and time.monotonic() < deadline:
        time.sleep(0.2)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed", batch
    out = {}
    for file_id in (batch.output_file_id, batch.error_file_id):
        if file_id:
            for raw in client.files.content(file_id).text.splitlines():
                rec = json.loads(raw)
                out[rec["custom_id"]] = rec["response"]
    return out
