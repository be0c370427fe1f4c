"""Helpers of the prefix-affinity tests: chat turns against a web URL, and which worker ran
each (read from the job's record in Redis)."""

from __future__ import annotations

import json

import requests

MODEL = "paired"


def script(tag: str, **kw) -> str:
    """A synthetic model's script replying ``"<tag> "``."""
    return json.dumps({"tokens": [f"{tag} "], **kw})


def worker_of(r, job_id: str) -> str:
    return r.hget(f"ferry:job:{job_id}", "worker").decode()


def turn(r, url: str, messages: list[dict]) -> tuple[str, str]:
    """One chat turn: the reply and the worker that ran it."""
    resp = requests.post(url + "/v1/chat/completions", timeout=30,
                         json={"model": MODEL, "messages": messages})
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]["message"]["content"], worker_of(
        r, resp.headers["X-Request-Id"])


def converse(r, url: str, conversations: int, turns: int) -> dict[int, tuple[list[dict], set[str]]]:
    """``conversations`` chats of ``turns`` turns, one turn of each in turn: per
    conversation, its messages and the workers that served its warm turns."""
    chats = {c: ([{"role": "system", "content": f"You are guide {c}."}], set())
             for c in range(conversations)}
    for t in range(turns):
        for c, (messages, served) in chats.items():
            messages.append({"role": "user", "content": script(f"c{c}t{t}")})
            reply, worker = turn(r, url, messages)
            messages.append({"role": "assistant", "content": reply})
            if t > 0:
                served.add(worker)
    return chats
