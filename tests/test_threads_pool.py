"""A worker whose backend asks for a threads pool (as the ExLlamaV2 backend does) runs several
jobs at once through one Runtime, keeping every per-job guarantee. Driven by the scripted
token source with ``threads = 4`` (tests/ferry.test.toml)."""

from __future__ import annotations

import json
import threading
import time

import pytest
import requests

from tests.services import Worker

MODEL = "synthetic-threads"


def script(**kw) -> list[dict]:
    return [{"role": "user", "content": json.dumps(kw)}]


@pytest.fixture(scope="module")
def threads_worker(redis_server, logs):
    # At debug, Celery prints its banner (concurrency and pool), which the first test reads.
    worker = Worker(MODEL, redis_server.url, logs, FERRY_LOG_LEVEL="debug").start()
    yield worker
    worker.stop()


def test_worker_runs_a_threads_pool(threads_worker):
    banner = threads_worker.log.read_text()
    assert "concurrency: 4 (thread_pool)" in banner  # tasks/thread_pool.py


def run_together(client, n: int) -> dict[int, tuple[float, float, bool]]:
    """n streams at once: per stream (first token time, last token time, text intact)."""
    spans: dict[int, tuple[float, float, bool]] = {}

    def one(i: int) -> None:
        tokens = [f"<{i}.{k}>" for k in range(20)]
        got, first, last = [], None, None
        for chunk in client.chat.completions.create(
                model=MODEL, stream=True, messages=script(tokens=tokens, delay=0.025)):
            piece = chunk.choices[0].delta.content if chunk.choices else None
            if piece:
                got.append(piece)
                last = time.monotonic()
                first = first or last
        spans[i] = (first, last, "".join(got) == "".join(tokens))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return spans


def overlapping(spans) -> bool:
    """Each stream had started before any of them ended: they ran together, not in turn."""
    return max(s[0] for s in spans.values()) < min(s[1] for s in spans.values())


def test_streams_are_served_concurrently_and_intact(client, threads_worker):
    spans = run_together(client, 4)
    assert len(spans) == 4 and all(ok for _, _, ok in spans.values())
    assert overlapping(spans)


def test_a_disconnect_cancels_only_its_own_job(web, client, threads_worker):
    body = {"model": MODEL, "stream": True, "messages": script(count=100000, delay=0.005)}
    with requests.post(web.url + "/v1/chat/completions", json=body, stream=True,
                       timeout=30) as keep:
        kept = keep.iter_lines()
        with requests.post(web.url + "/v1/chat/completions", json=body, stream=True,
                           timeout=30) as drop:
            dropped = drop.iter_lines()
            for _ in range(5):
                next(dropped)
                next(kept)
        # The other stream goes on after the drop.
        chunks = [line for line in (next(kept) for _ in range(200)) if line]
        assert all(line.startswith(b"data: {") for line in chunks)
    # Both 500-second jobs were cancelled: all four threads are free again at once.
    time.sleep(1.0)
    spans = run_together(client, 4)
    assert len(spans) == 4 and all(ok for _, _, ok in spans.values()) and overlapping(spans)


def test_a_freed_thread_takes_the_next_queued_job_at_once(client, threads_worker):
    """Without prefetch, the worker asks for a message only when a thread is free; a job's
    end must wake its event loop for that (tasks/thread_pool.py), or every freed thread
    idles up to a second: 24 requests of 0.1 s, 8 at a time, took 6 s that way, 0.8 s now."""
    import concurrent.futures

    messages = script(tokens=["a"] * 5, delay=0.02)

    def one(_):
        return client.chat.completions.create(model=MODEL, messages=messages)

    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(one, range(24)))
    elapsed = time.monotonic() - start
    assert [r.choices[0].message.content for r in replies] == ["aaaaa"] * 24
    assert elapsed < 3.0, f"24 requests took {elapsed:.2f} s"
