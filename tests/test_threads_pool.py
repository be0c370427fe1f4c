"""A worker whose backend asks for a threads pool (as the ExLlamaV2 backend does) runs several
jobs at once through one Runtime, keeping every per-job guarantee. Driven by the scripted
token source with ``threads = 4`` (tests/ferry.test.toml), its tokens made on each job's
task thread, and again with ``batching = true``: made by one loop thread for every job and
handed over as they are made, as the GPU backend's loop does (its task threads sleep until
their choices finish or are cancelled)."""

from __future__ import annotations

import json
import threading
import time

import pytest
import requests

from tests.services import Worker

MODELS = ("synthetic-threads", "synthetic-batching")


def script(**kw) -> list[dict]:
    return [{"role": "user", "content": json.dumps(kw)}]


@pytest.fixture(scope="module", params=MODELS)
def threads_worker(request, redis_server, logs):
    # At debug, Celery prints its banner (concurrency and pool), which the first test reads.
    worker = Worker(request.param, redis_server.url, logs, FERRY_LOG_LEVEL="debug").start()
    worker.model = request.param
    yield worker
    worker.stop()


def test_worker_runs_a_threads_pool(threads_worker):
    banner = threads_worker.log.read_text()
    assert "concurrency: 4 (thread_pool)" in banner  # tasks/thread_pool.py


def run_together(client, n: int, model: str) -> dict[int, tuple[float, float, bool]]:
    """n streams at once: per stream (first token time, last token time, text intact)."""
    spans: dict[int, tuple[float, float, bool]] = {}

    def one(i: int) -> None:
        tokens = [f"<{i}.{k}>" for k in range(20)]
        got, first, last = [], None, None
        for chunk in client.chat.completions.create(
                model=model, stream=True, messages=script(tokens=tokens, delay=0.025)):
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
    spans = run_together(client, 4, threads_worker.model)
    assert len(spans) == 4 and all(ok for _, _, ok in spans.values())
    assert overlapping(spans)


def test_a_disconnect_cancels_only_its_own_job(web, client, threads_worker):
    body = {"model": threads_worker.model, "stream": True,
            "messages": script(count=100000, delay=0.005)}
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
    spans = run_together(client, 4, threads_worker.model)
    assert len(spans) == 4 and all(ok for _, _, ok in spans.values()) and overlapping(spans)


def test_a_freed_thread_takes_the_next_queued_job_at_once(client, threads_worker):
    """Without prefetch, the worker asks for a message only when a thread is free; a job's
    end must wake its event loop for that (tasks/thread_pool.py), or every freed thread
    idles up to a second: 24 requests of 0.1 s, 8 at a time, took 6 s that way, 0.8 s now."""
    import concurrent.futures

    messages = script(tokens=["a"] * 5, delay=0.02)

    def one(_):
        return client.chat.completions.create(model=threads_worker.model, messages=messages)

    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(one, range(24)))
    elapsed = time.monotonic() - start
    assert [r.choices[0].message.content for r in replies] == ["aaaaa"] * 24
    assert elapsed < 3.0, f"24 requests took {elapsed:.2f} s"


def test_a_batching_source_makes_every_jobs_tokens_on_one_loop_and_hands_them_over():
    """In process, without Celery: two paced jobs at once, ``n=2`` and a stop string, a
    ``max_tokens`` cut, and a cancel, each with the events its own thread would have made
    (models/synthetic.py's ``batching`` option)."""
    from config.contract.events import Delta, Done, Finish, Started
    from config.contract.job import GenerationJob
    from config.settings import ModelEntry
    from models.base import CancelFlag
    from models.synthetic import SyntheticBackend

    backend = SyntheticBackend(ModelEntry(name="b", backend="synthetic", weights="",
                                          options={"threads": 4, "batching": True}))
    assert backend.supports_direct
    try:
        def run(**kw):
            handed, flag = [], CancelFlag()
            job = GenerationJob(id="j", model="b", messages=script(**kw.pop("script")), **kw)
            yielded = [ev for ev in backend.generate(
                job, flag, direct=lambda ev: handed.append((ev, threading.current_thread().name)))]
            return handed, yielded

        out: dict[str, tuple] = {}
        jobs = {"two": dict(script=dict(tokens=["a", "b", "c"], delay=0.02), n=2),
                "stop": dict(script=dict(tokens=["x", "y!", "z"], delay=0.02), stop=["!"]),
                "cut": dict(script=dict(count=50, rate=100), max_tokens=4),
                "empty": dict(script=dict(tokens=[], delay=0.02))}
        threads = [threading.Thread(target=lambda k=k, kw=kw: out.__setitem__(k, run(**kw)))
                   for k, kw in jobs.items()]
        start = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert time.monotonic() - start < 1.0  # together, not in turn (0.06 s each)
        for name, (handed, yielded) in out.items():
            assert {thread for _, thread in handed} <= {"synthetic-loop"}, name
            assert all(type(ev) is Delta for ev, _ in handed), name
            assert type(yielded[0]) is Started and type(yielded[-1]) is Done, name
        two_handed, two = out["two"]
        assert ["".join(ev.text for ev, _ in two_handed if ev.index == i) for i in (0, 1)] \
            == ["abc", "abc"]
        assert sorted((f.index, f.finish_reason, f.completion_tokens) for f in two
                      if type(f) is Finish) == [(0, "stop", 3), (1, "stop", 3)]
        assert two[-1].completion_tokens == 6
        stop_handed, stop = out["stop"]
        assert "".join(ev.text for ev, _ in stop_handed) == "xy"
        assert [(f.finish_reason, f.stop_sequence) for f in stop if type(f) is Finish] == [
            ("stop", "!")]
        assert out["two"][0] and out["stop"][0] and out["cut"][0]
        empty_handed, empty = out["empty"]
        assert not empty_handed and [(f.finish_reason, f.completion_tokens) for f in empty
                                     if type(f) is Finish] == [("stop", 0)]
        cut_handed, cut = out["cut"]
        assert "".join(ev.text for ev, _ in cut_handed) == "t0 t1 t2 t3 "
        assert [(f.finish_reason, f.completion_tokens) for f in cut if type(f) is Finish] \
            == [("length", 4)]

        # A cancel ends a running choice at once, with the tokens made so far.
        flag, handed = CancelFlag(), []
        job = GenerationJob(id="c", model="b", messages=script(count=100000, rate=200))
        threading.Timer(0.2, flag.set).start()
        start = time.monotonic()
        events = list(backend.generate(job, flag, direct=handed.append))
        assert time.monotonic() - start < 2.0
        [fin] = [ev for ev in events if type(ev) is Finish]
        assert fin.finish_reason == "cancelled" and fin.completion_tokens == len(handed) > 0
    finally:
        backend.close()
