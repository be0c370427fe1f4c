"""Continuous batching through the real stack: ONE smollm2 worker process (``parallel`` slots,
tests/ferry.test.toml) decodes concurrent requests together in one llama.cpp context.

Each request bans the end tokens (logit_bias -100), so it runs exactly to ``max_tokens``:
nothing here depends on where the model would have stopped by itself.
"""

from __future__ import annotations

import json
import threading
import time
import tomllib

import pytest
import redis
import requests

from tests.jobclient import wait_status
from tests.services import TEST_CONFIG

pytestmark = pytest.mark.model

MODEL = "smollm2"
SLOTS = next(m for m in tomllib.loads(TEST_CONFIG.read_text())["models"]
             if m["name"] == MODEL)["options"]["parallel"]
SUBJECTS = ["a lighthouse keeper", "a lost robot", "a baker in Paris", "two rival chess players",
            "a whale who sings"]
TOKENS = 40


# Prompt 3 is long (~500 tokens): its neighbours then attend over a longer stretch of cache
# in the same step, which must change none of their tokens.
NOTES = " ".join(f"Note {i}: the club meets on day {i} of the month." for i in range(30))


def body(k: int, max_tokens: int = TOKENS, **kw) -> dict:
    content = f"Write a long story about {SUBJECTS[k]}."
    if k == 3:
        content = f"{NOTES}\n\n{content}"
    return {"model": MODEL, "max_tokens": max_tokens, "temperature": 0, **kw,
            "messages": [{"role": "user", "content": content}]}


@pytest.fixture(scope="module")
def no_end(tokenize) -> dict:
    """logit_bias that bans SmolLM2's end-of-generation tokens."""
    ids = [t for name in ("<|im_end|>", "<|endoftext|>") for t in tokenize(name)]
    assert len(ids) == 2
    return {str(t): -100 for t in ids}


@pytest.fixture(scope="module")
def solo(web, smollm2_worker, redis_server, no_end) -> list[str]:
    """Each prompt's reply when it runs alone (one request at a time, not streamed)."""
    workers = redis.Redis.from_url(redis_server.url).zcard(f"ferry:workers:ferry.{MODEL}")
    assert workers == 1, "these tests need exactly one smollm2 worker process"
    out = []
    for k in range(len(SUBJECTS)):
        r = requests.post(web.url + "/v1/chat/completions", json=body(k, logit_bias=no_end),
                          timeout=60).json()
        assert r["usage"]["completion_tokens"] == TOKENS
        out.append(r["choices"][0]["message"]["content"])
    assert len(set(out)) == len(out)
    return out


class Stream(threading.Thread):
    """One streaming chat request, read in its own thread. ``leave()`` disconnects it (which
    cancels its job) at its next chunk."""

    def __init__(self, url: str, request: dict):
        super().__init__(daemon=True)
        self.url, self.request = url, {**request, "stream": True}
        self.text, self.first, self.end = "", None, None
        self.finish, self.done, self.job_id, self.error = None, False, None, None
        self._leave = threading.Event()

    def leave(self) -> None:
        self._leave.set()

    def run(self) -> None:
        try:
            with requests.post(self.url + "/v1/chat/completions", json=self.request,
                               stream=True, timeout=120) as r:
                self.job_id = r.headers.get("X-Request-Id")
                for line in r.iter_lines():
                    if self._leave.is_set():
                        return
                    if not line.startswith(b"data: "):
                        continue
                    if line == b"data: [DONE]":
                        self.done = True
                        return
                    self._chunk(json.loads(line[6:]))
        except Exception as e:  # noqa: BLE001 - reported by the test that reads it
            self.error = e
        finally:
            self.end = time.monotonic()

    def _chunk(self, chunk: dict) -> None:
        for choice in chunk.get("choices", ()):
            piece = choice["delta"].get("content")
            if piece:
                self.first = self.first or time.monotonic()
                self.text += piece
            self.finish = choice.get("finish_reason") or self.finish

    def wait_for_text(self, chars: int = 1, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while len(self.text) < chars and self.end is None:
            assert time.monotonic() < deadline, "no tokens in time"
            time.sleep(0.01)


def start(streams: list[Stream]) -> list[Stream]:
    for s in streams:
        s.start()
    return streams


def test_concurrent_streams_are_decoded_together(web, solo, no_end):
    streams = start([Stream(web.url, body(k, logit_bias=no_end)) for k in range(SLOTS)])
    for s in streams:
        s.join(120)
    assert all(s.done and s.error is None and s.finish == "length" for s in streams)
    # Every stream had its first token before any of them ended: they ran together. One
    # request at a time, the second would start only once the first had ended.
    assert max(s.first for s in streams) < min(s.end for s in streams)
    # Running with others changes no token of a temperature-0 reply.
    assert [s.text for s in streams] == solo[:SLOTS]


def test_cancelling_one_stream_leaves_the_others_intact(web, solo, no_end):
    streams = start([Stream(web.url, body(k, logit_bias=no_end)) for k in range(3)])
    victim = streams[1]
    victim.wait_for_text(8)
    victim.leave()
    for s in streams:
        s.join(120)
    assert not victim.done and len(victim.text) < len(solo[1])
    assert [s.text for s in (streams[0], streams[2])] == [solo[0], solo[2]]
    assert all(s.done and s.finish == "length" for s in (streams[0], streams[2]))
    job = wait_status(web, victim.job_id, "cancelled")
    assert job["result"]["usage"]["completion_tokens"] < TOKENS


def test_a_request_waiting_for_a_slot_starts_when_one_frees(web, solo, no_end):
    # Every slot taken by a stream far longer than this test.
    blockers = start([Stream(web.url, body(k % len(SUBJECTS), max_tokens=1500,
                                           logit_bias=no_end)) for k in range(SLOTS)])
    waiting = None
    try:
        for b in blockers:
            b.wait_for_text()
        waiting = start([Stream(web.url, body(4, logit_bias=no_end))])[0]
        time.sleep(1.5)
        assert waiting.first is None and all(b.end is None for b in blockers)
        freed = time.monotonic()
        blockers[0].leave()
        waiting.join(120)
        assert waiting.done and waiting.first > freed
        assert waiting.text == solo[4]
        # It ran while the other slots were still busy, not after them.
        assert all(b.end is None for b in blockers[1:])
    finally:
        for s in blockers + ([waiting] if waiting else []):
            s.leave()
        for s in blockers:
            s.join(60)
