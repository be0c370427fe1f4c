"""Benchmark 4, relay capacity: how many concurrent SSE streams one web process carries.

One gunicorn (gevent) web process; the tokens come from the synthetic token source
(models/synthetic.py, a benchmark instrument, never a served model) in ``--workers`` worker
processes running Celery's gevent pool (hundreds of concurrent jobs each: the default solo
pool runs one job per process, and a thread pool spent more CPU on the GIL than the web
process spent relaying). Every stream asks for ``count`` tokens at ``rate`` per second;
streams open at ``open_rate`` per second.

Reported per level: the gaps between the chunks the clients see, over all streams from first
token to last, and their p99 in excess of the nominal time of the tokens a chunk carries
(k/rate for k tokens: a worker may coalesce a job's tokens into one chunk; the "added" delay,
an upper bound on what the relay adds, as it also holds the token source's and the client's
own scheduling), the same while all streams are open at once ("steady"), streams that failed
or came back incomplete (every stream must carry exactly the scripted text), chunks per token,
and the web processes' peak RSS and CPU. CPU is also given per token, in µs of CPU time of the
web processes, the workers (the synthetic source's own pacing included) and Redis, with the
client's (asyncio + aiohttp, this process, which also measures its own event-loop lag) beside:
a client that cannot keep up shows as such. Goal at 500 streams: p99 added <= 50 ms, no
errors, RSS <= 400 MB. The last line gives the most streams per web process that met p99
added <= 50 ms with no errors. Before the levels, ``--requests`` one-token streams (10 at
once) give the CPU a request costs besides its tokens, in ms per request.

    python -m bench.relay [--levels 100,500,1000] [--count 300] [--rate 20] [--open-rate 100]
                          [--web-workers 1] [--coalesce-ms MS] [--lockstep] [--engine]
                          [--requests 800]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import threading
import time
from pathlib import Path

import aiohttp
import numpy as np

from bench.client import StreamResult, connector, stream
from bench.common import CheckFailed, ms, pct, print_table, save
from bench.stack import Stack

GOAL_STREAMS, GOAL_ADDED_MS, GOAL_RSS_MB = 500, 50.0, 400.0
TICK = 0.01  # the client's lag probe interval (s)


class ProcWatch:
    """Peak RSS of some processes, sampled from /proc; CPU time of the first ``web`` of them
    and of each group in ``cpu`` (label: pids), as shares of one core."""

    def __init__(self, pids: list[int], interval: float = 0.2,
                 cpu: dict[str, list[int]] | None = None, web: int = 1):
        self.pids, self.interval = pids, interval
        self.cpu_groups = {"web": pids[:web], **(cpu or {}),
                           **({f"web{i}": [p] for i, p in enumerate(pids[:web])} if web > 1 else {})}
        self.peak_rss = {p: 0 for p in pids}
        self.peak_total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.series: list[tuple[float, dict[str, float]]] = []
        self.steady_window: tuple[float, float] | None = None
        self._cpu0 = self._cpu_now()
        self._t0 = time.monotonic()

    @staticmethod
    def rss_mb(pid: int) -> float:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    @staticmethod
    def cpu_seconds(pid: int) -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def _run(self) -> None:
        while not self._stop.is_set():
            sample = {p: self.rss_mb(p) for p in self.pids}
            for p, v in sample.items():
                self.peak_rss[p] = max(self.peak_rss[p], v)
            self.peak_total = max(self.peak_total, sum(sample.values()))
            self.series.append((time.monotonic(), self._cpu_now()))
            self._stop.wait(self.interval)

    def _cpu_now(self) -> dict[str, float]:
        return {k: sum(map(self.cpu_seconds, v)) for k, v in self.cpu_groups.items()}

    def cpu_between(self, lo: float, hi: float) -> dict[str, float] | None:
        """CPU seconds each group spent from ``lo`` to ``hi`` (monotonic), from the samples
        nearest inside that window; None if it holds fewer than two."""
        inside = [(t, c) for t, c in self.series if lo <= t <= hi]
        if len(inside) < 2:
            return None
        (t0, c0), (t1, c1) = inside[0], inside[-1]
        self.steady_window = (t0, t1)
        return {k: c1[k] - c0[k] for k in c0}

    def __enter__(self) -> "ProcWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        wall = time.monotonic() - self._t0
        self.cpu_used = {k: v - self._cpu0[k] for k, v in self._cpu_now().items()}
        self.cpu_shares = {k: v / wall for k, v in self.cpu_used.items()}
        self.cpu_share = self.cpu_shares["web"]


def expected_text(count: int) -> str:
    return "".join(f"t{i} " for i in range(count))  # what models/synthetic.py emits


def tokens_in(text: str) -> int:
    return text.count(" ")  # each synthetic token ends with one


def web_worker_pids(web, n: int) -> list[int]:
    """The pids of the ``n`` gunicorn workers under the web master (the processes serving)."""
    deadline = time.monotonic() + 20
    path = Path(f"/proc/{web.proc.pid}/task/{web.proc.pid}/children")
    while time.monotonic() < deadline:
        children = [int(c) for c in path.read_text().split()]
        if len(children) >= n:
            return children[:n]
        time.sleep(0.1)
    raise RuntimeError(f"gunicorn has fewer than {n} worker processes")


async def _lag_probe(lags: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        t = time.monotonic()
        await asyncio.sleep(TICK)
        lags.append(time.monotonic() - t - TICK)


async def clients(url: str, n: int, count: int, rate: float, ramp: float,
                  silent: bool = False, lockstep: bool = False,
                  ) -> tuple[list[StreamResult], list[float], float, float]:
    """n streams opened evenly over ``ramp`` seconds; results, client lags, wall, client CPU
    (a share of one core). ``silent``: the source paces its tokens but sends none;
    ``lockstep``: every stream's tokens come at the same instants (a batching engine's steps)."""
    script = {"count": count, "rate": rate, **({"silent": True} if silent else {}),
              **({"lockstep": True} if lockstep else {})}
    body = {"model": "synthetic", "stream": True,
            "messages": [{"role": "user", "content": json.dumps(script)}]}
    timeout = ramp + count / rate + 60
    lags: list[float] = []
    stop = asyncio.Event()

    async def one(session, i: int) -> StreamResult:
        await asyncio.sleep(i * ramp / n)
        return await stream(session, url, body, timeout)

    async with aiohttp.ClientSession(connector=connector(n),
                                     timeout=aiohttp.ClientTimeout(total=None)) as session:
        probe = asyncio.create_task(_lag_probe(lags, stop))
        cpu0, t0 = time.process_time(), time.monotonic()
        results = await asyncio.gather(*(one(session, i) for i in range(n)))
        wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
        stop.set()
        await probe
    return list(results), lags, wall, cpu / wall


async def short_requests(url: str, n: int, at_once: int) -> list[StreamResult]:
    """``n`` streams of one token, ``at_once`` at a time: what a request costs besides its
    tokens (HTTP, validation, the job's record, Celery's message, the worker's start and
    end, the stream's first and last chunks)."""
    body = {"model": "synthetic", "stream": True,
            "messages": [{"role": "user", "content": json.dumps({"tokens": ["x"]})}]}
    gate = asyncio.Semaphore(at_once)

    async def one(session) -> StreamResult:
        async with gate:
            return await stream(session, url, body, 30)

    async with aiohttp.ClientSession(connector=connector(at_once),
                                     timeout=aiohttp.ClientTimeout(total=None)) as session:
        return list(await asyncio.gather(*(one(session) for _ in range(n))))


def per_request(url: str, n: int, at_once: int, web_pids: list[int],
                cpu: dict[str, list[int]]) -> dict:
    """CPU ms per request of ``short_requests`` in each group, and requests per second."""
    with ProcWatch(web_pids, web=len(web_pids), cpu=cpu) as watch:
        t0 = time.monotonic()
        results = asyncio.run(short_requests(url, n, at_once))
        wall = time.monotonic() - t0
    failed = [r.error for r in results if r.error or r.text != "x"]
    if failed:
        raise CheckFailed(f"{len(failed)} of {n} one-token streams failed: {failed[0]!r}")
    return {"requests": n, "at_once": at_once, "per_s": n / wall,
            "cpu_ms": {k: 1e3 * watch.cpu_used[k] / n for k in ("web", *cpu)}}


def level_stats(n: int, results: list[StreamResult], lags: list[float], wall: float,
                client_cpu: float, watch: ProcWatch, web_pids: list[int], count: int,
                rate: float) -> dict:
    want = expected_text(count)
    errors = [r for r in results if r.error is not None]
    incomplete = [r for r in results if r.error is None and r.text != want]
    good = [r for r in results if r.error is None and r.text == want]
    nominal = 1.0 / rate
    gaps = np.concatenate([np.diff(r.times) for r in good]) if good else np.array([])
    # Each gap less the nominal time of the tokens its chunk brought.
    added = np.concatenate([np.diff(r.times) - nominal * np.array([tokens_in(p) for p in
                                                                   r.pieces[1:]])
                            for r in good]) if good else np.array([])
    # The window in which every stream was open: from the last first token to the first
    # last token (empty if the first streams ended before the last began).
    steady = np.array([])
    if good:
        lo, hi = max(r.times[0] for r in good), min(r.times[-1] for r in good)
        if hi > lo:
            steady = np.concatenate([
            (np.diff(t) - nominal * np.array([tokens_in(p) for p in r.pieces[1:]]))
            [(t[1:] > lo) & (t[1:] <= hi)] for r, t in ((r, np.array(r.times)) for r in good)])
    tokens = sum(tokens_in(r.text) for r in results)
    # CPU per token while every stream was open: the relay's own cost, without the opening
    # and closing of streams (a request's HTTP, job record and Celery message), which the
    # whole-level figures spread over its tokens.
    steady_us: dict[str, float] = {}
    if good and steady.size:
        cpu = watch.cpu_between(lo, hi)
        if cpu is not None:
            a, b = watch.steady_window
            steady_tokens = sum(tokens_in(p) for r in good for t, p in zip(r.times, r.pieces)
                                if a < t <= b)
            steady_us = {k: 1e6 * v / max(steady_tokens, 1) for k, v in cpu.items()
                         if not k[3:].isdigit()}
    return {
        "steady_us_per_token": steady_us,
        "streams": n, "ok": len(good), "errors": len(errors), "incomplete": len(incomplete),
        "error_samples": sorted({r.error for r in errors})[:5],
        "gap_p50_ms": ms(pct(gaps, 50)), "gap_p99_ms": ms(pct(gaps, 99)),
        "gap_max_ms": ms(float(gaps.max())) if gaps.size else None,
        "added_p99_ms": ms(pct(added, 99)) if added.size else None,
        "steady_gaps": int(steady.size),
        "steady_added_p99_ms": ms(pct(steady, 99)) if steady.size else None,
        "ttft_p50_ms": ms(pct([r.ttft for r in good], 50)),
        "ttft_p99_ms": ms(pct([r.ttft for r in good], 99)),
        "tokens_per_s": tokens / wall, "wall_s": wall,
        "chunks_per_token": sum(r.chunks for r in results) / max(tokens, 1),
        **{f"{k}_us_per_token": 1e6 * v * wall / max(tokens, 1)
           for k, v in {**watch.cpu_shares, "client": client_cpu}.items()
           if not k[3:].isdigit()},
        "web_rss_peak_mb": max(watch.peak_rss[p] for p in web_pids),
        "web_rss_total_peak_mb": watch.peak_total,
        "web_cpu_share": watch.cpu_share,
        "web_cpu_share_each": [watch.cpu_shares[f"web{i}"] for i in range(len(web_pids))]
        if len(web_pids) > 1 else [watch.cpu_share],
        "workers_cpu_share": watch.cpu_shares.get("workers"),
        "redis_cpu_share": watch.cpu_shares.get("redis"),
        "client_lag_p99_ms": ms(pct(lags, 99)), "client_lag_max_ms": ms(max(lags, default=0)),
        "client_cpu_share": client_cpu,
    }


def run(levels: list[int], count: int = 300, rate: float = 20.0, workers: int = 2,
        open_rate: float = 100.0, web_workers: int = 1, lockstep: bool = False,
        requests: int = 800, engine: bool = False) -> dict:
    """``engine``: the workers run the source as a batching engine (one loop thread makes
    every job's tokens and hands them over, task threads asleep: as a GPU host's workers
    run), in Celery's threads pool; else each job paces itself in the gevent pool."""
    per_worker = math.ceil(max(levels) / workers) + 10
    pool = (f"threads, {per_worker} jobs per process, one loop making every job's tokens"
            if engine else f"gevent, {per_worker} jobs per process")
    rows = []
    source_us: float | None = None
    with Stack("relay") as stack:
        stack.redis()
        redis_pid = stack.services[-1].proc.pid
        started = stack.workers("synthetic", workers, options={
            "batching": True, "threads": per_worker}) if engine else \
            stack.workers("synthetic", workers, "-c", str(per_worker), gevent=True)
        worker_pids = [w.proc.pid for w in started]
        web = stack.web(FERRY_WEB_WORKERS=str(web_workers))
        web_pids = web_worker_pids(web, web_workers)
        url = web.url + "/v1/chat/completions"
        asyncio.run(clients(url, 10, 5, rate, 0.1))  # warm up: connections, imports, pools
        cpu = {"workers": worker_pids, "redis": [redis_pid]}
        short = per_request(url, requests, 10, web_pids, cpu) if requests else None
        if short is not None:
            print(f"  per request ({requests} one-token streams, 10 at once): CPU ms "
                  f"{', '.join(f'{k} {v:.2f}' for k, v in short['cpu_ms'].items())}; "
                  f"{short['per_s']:.0f} requests/s", flush=True)
        for n in levels:
            with ProcWatch([*web_pids, web.proc.pid], web=web_workers,
                           cpu={"workers": worker_pids, "redis": [redis_pid]}) as watch:
                results, lags, wall, client_cpu = asyncio.run(
                    clients(url, n, count, rate, n / open_rate, lockstep=lockstep))
            row = level_stats(n, results, lags, wall, client_cpu, watch, web_pids, count, rate)
            rows.append(row)
            if source_us is None:
                # The same streams again, paced but silent: the synthetic source's own cost
                # (a benchmark instrument's, not the relay's) in the workers' figure.
                with ProcWatch([web.proc.pid], cpu={"workers": worker_pids}) as quiet:
                    asyncio.run(clients(url, n, count, rate, n / open_rate, silent=True,
                                        lockstep=lockstep))
                source_us = 1e6 * quiet.cpu_used["workers"] / (n * count)
            print(f"  {n:>5} streams: p99 added {row['added_p99_ms'] or 0:.1f} ms, errors "
                  f"{row['errors']}, incomplete {row['incomplete']}, web RSS "
                  f"{row['web_rss_total_peak_mb']:.0f} MB, CPU % web "
                  f"{100 * row['web_cpu_share']:.0f}, workers {100 * row['workers_cpu_share']:.0f}, "
                  f"redis {100 * row['redis_cpu_share']:.0f}; CPU µs/token web "
                  f"{row['web_us_per_token']:.0f}, workers {row['workers_us_per_token']:.0f}, "
                  f"redis {row['redis_us_per_token']:.0f}, client "
                  f"{row['client_us_per_token']:.0f}; chunks/token "
                  f"{row['chunks_per_token']:.2f}; all streams open: µs/token "
                  f"{', '.join(f'{k} {v:.0f}' for k, v in row['steady_us_per_token'].items())}"
                  f"; web CPU % each "
                  f"{', '.join(f'{100 * c:.0f}' for c in row['web_cpu_share_each'])}", flush=True)
    print_table(f"Relay capacity: {web_workers} web process(es) (gunicorn + gevent); {workers} "
                f"synthetic worker processes (Celery {pool}); {count} tokens per "
                f"stream at {rate:g} tok/s (nominal gap {1000 / rate:.0f} ms"
                f"{', every stream on the same instants' if lockstep else ''}); streams opened at "
                f"{open_rate:g}/s. CPU % is of one core; {os.cpu_count()} cores in all",
                ["streams", "ok", "errors", "incomplete", "gap p50 ms", "gap p99 ms",
                 "added p99 ms", "steady added p99", "TTFT p99 ms", "web RSS MB", "web CPU %",
                 "workers CPU %", "redis CPU %", "client lag p99 ms", "client CPU %",
                 "µs/token web", "workers", "redis", "client", "chunks/token",
                 "all open: µs/token web", "workers", "redis"],
                [[r["streams"], r["ok"], r["errors"], r["incomplete"], r["gap_p50_ms"],
                  r["gap_p99_ms"], r["added_p99_ms"], r["steady_added_p99_ms"], r["ttft_p99_ms"],
                  r["web_rss_total_peak_mb"], 100 * r["web_cpu_share"],
                  100 * r["workers_cpu_share"], 100 * r["redis_cpu_share"],
                  r["client_lag_p99_ms"], 100 * r["client_cpu_share"], r["web_us_per_token"],
                  r["workers_us_per_token"], r["redis_us_per_token"], r["client_us_per_token"],
                  r["chunks_per_token"],
                  *(r["steady_us_per_token"].get(k) for k in ("web", "workers", "redis"))]
                 for r in rows])
    if source_us is not None:
        print(f"the token source alone (the same {levels[0]} streams paced, no token sent): "
              f"workers {source_us:.0f} µs per token, the rest of their figure is relaying")
    carried = [r["streams"] for r in rows if r["errors"] == 0 and r["incomplete"] == 0
               and r["added_p99_ms"] is not None and r["added_p99_ms"] <= GOAL_ADDED_MS]
    per_web = max(carried) / web_workers if carried else 0
    print(f"streams per web process at p99 added <= {GOAL_ADDED_MS:g} ms: "
          f"{'at least ' if carried and max(carried) == max(levels) else ''}{per_web:g} "
          f"(of the levels run)")
    at = next((r for r in rows if r["streams"] == GOAL_STREAMS), None)
    met = at is not None and at["errors"] == 0 and at["incomplete"] == 0 and \
        at["added_p99_ms"] is not None and at["added_p99_ms"] <= GOAL_ADDED_MS and \
        at["web_rss_total_peak_mb"] <= GOAL_RSS_MB
    data = {"count": count, "rate": rate, "lockstep": lockstep, "open_rate": open_rate,
            "synthetic_workers": workers,
            "synthetic_pool": pool, "engine": engine,
            "web_processes": web_workers, "streams_per_web_process": per_web,
            "source_alone_workers_us_per_token": source_us,
            "per_request": short,
            "rows": rows,
            "goal": {"streams": GOAL_STREAMS, "added_p99_ms": GOAL_ADDED_MS,
                     "rss_mb": GOAL_RSS_MB, "errors": 0},
            "met": met if at is not None else None}
    save("relay_engine" if engine else "relay", data)
    if not any(r["ok"] for r in rows):
        raise CheckFailed("no stream delivered the scripted tokens")
    return data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--levels", default="100,500,1000")
    p.add_argument("--count", type=int, default=300, help="tokens per stream")
    p.add_argument("--rate", type=float, default=20.0, help="tokens per second per stream")
    p.add_argument("--workers", type=int, default=2, help="synthetic worker processes")
    p.add_argument("--open-rate", type=float, default=100.0, help="new streams per second")
    p.add_argument("--web-workers", type=int, default=1, help="web processes (FERRY_WEB_WORKERS)")
    p.add_argument("--coalesce-ms", type=float, default=None,
                   help="the workers' FERRY_STREAM_COALESCE_MS (default: the setting's)")
    p.add_argument("--requests", type=int, default=800,
                   help="one-token streams first, 10 at once, for CPU per request (0: none)")
    p.add_argument("--lockstep", action="store_true",
                   help="every stream's tokens at the same instants, as a batching engine "
                        "steps all its jobs at once (default: spread evenly)")
    p.add_argument("--engine", action="store_true",
                   help="the workers make every job's tokens on one loop thread and hand them "
                        "over, as the batching GPU backends do (default: each job paces "
                        "itself, Celery gevent pool)")
    a = p.parse_args()
    if a.coalesce_ms is not None:
        os.environ["FERRY_STREAM_COALESCE_MS"] = str(a.coalesce_ms)  # inherited by the workers
    run([int(x) for x in a.levels.split(",")], a.count, a.rate, a.workers, a.open_rate,
        a.web_workers, a.lockstep, a.requests, a.engine)


if __name__ == "__main__":
    main()
