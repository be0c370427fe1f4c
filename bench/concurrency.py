"""Benchmark 3, concurrency: bursts of 1, 8 and 32 identical streams against Ferry and against
llama-cpp-python's own server (``python -m llama_cpp.server``), both started here on the same
GGUF and the same cores, measured in the same run, levels alternating sides.

Per level and side: aggregate completion tokens/s over the burst's wall time, p50/p99 time to
first token, and streams that failed, came back empty, or whose text is not the other side's
for the same prompt (cut short, or different). Goal at 8: aggregate >= 1.5x the peer, p50 TTFT
<= 0.2x the peer's, no empty streams.

Who gets what (say it in every table):
- Ferry: one gunicorn web process, Redis, and ONE worker process with ``--threads`` llama.cpp
  threads (2: the same two threads the peer gets) and ``--parallel`` slots (8): concurrent
  streams are decoded together in one context. With ``--baseline N``, also a second pass
  with N worker processes of 1 thread and 1 slot each (one stream at a time per process, as
  Ferry ran before it batched) on the same cores.
- Peer, tuned: n_threads=2, n_threads_batch=2, interrupt_requests=False (its best setting
  here: with its default, a new request cuts the running stream off).
- Peer, defaults (only at 8): its defaults as shipped (n_threads=cpu_count//2,
  interrupt_requests=True), to show what a user of it gets out of the box.

Both run the legacy completions endpoint with raw prompts so that both see the same tokens;
sampling is greedy (temperature 0) on both, with the peer's repeat_penalty set to 1.0 (its
default is 1.1; Ferry has none), so both must give the same text for the same prompt. Ferry's
streams must also be complete, non-empty and as long as asked (by its usage count).

    python -m bench.concurrency [--levels 1,8,32] [--tokens 64] [--threads 2] [--parallel 8]
                                [--baseline 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
from dataclasses import dataclass

from bench.client import StreamResult, burst
from bench.common import CheckFailed, ms, pct, print_table, ratio, save, times
from bench.stack import Stack, bench_entry

STORY = ("The ferry left the harbour at dawn. On board were a doctor, a fisherman, two "
         "children and a dog. This is their story, told from the beginning.\n\n")
GOAL_AGG, GOAL_TTFT = 1.5, 0.2
THREADS = 2  # the thread budget both sides get


def prompt(k: int) -> str:
    """Prompt number k. Every stream of a level gets its own, and each level its own set:
    llama_cpp.server reuses its KV cache for a repeated prompt prefix, which would turn its
    TTFT into a cache benchmark (Ferry re-evaluates every greedy prompt)."""
    return f"Chapter {k}. {STORY}"


@dataclass
class Target:
    label: str
    url: str
    extra: dict  # request fields only this server takes


@dataclass
class Level:
    side: str
    prompts: list[int]
    results: list[StreamResult]
    wall: float
    max_tokens: int
    # Complete streams whose text is not the other side's for the same prompt: cut short
    # (a proper prefix of it) or different.
    cut: int = 0
    differs: int = 0

    @property
    def n(self) -> int:
        return len(self.results)

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.results if r.error is None)

    @property
    def aggregate(self) -> float:
        return self.tokens / self.wall

    def ttft(self, q: float) -> float | None:
        return ms(pct([r.ttft for r in self.results if r.ttft is not None], q))

    @property
    def failed(self) -> int:
        return sum(r.error is not None for r in self.results)

    @property
    def empty(self) -> int:
        return sum(not r.text for r in self.results)

    @property
    def short(self) -> int:
        """Complete streams that stopped early without the model choosing to (by usage)."""
        return sum(r.error is None and r.usage_tokens is not None
                   and r.usage_tokens != self.max_tokens and r.finish_reason != "stop"
                   for r in self.results)

    def row(self) -> dict:
        return {"side": self.side, "streams": self.n, "aggregate_tok_s": self.aggregate,
                "tokens": self.tokens, "wall_s": self.wall, "ttft_p50_ms": self.ttft(50),
                "ttft_p99_ms": self.ttft(99), "failed": self.failed, "empty": self.empty,
                "short": self.short, "cut": self.cut, "differs": self.differs}


async def measure(target: Target, prompts: list[int], tokens: int, quiet: bool = False) -> Level:
    bodies = [{"model": "smollm2", "prompt": prompt(k), "max_tokens": tokens, "temperature": 0,
               **target.extra} for k in prompts]
    timeout = 60 + len(prompts) * tokens / 5  # far beyond any sane run; a hang still ends
    results, wall = await burst(target.url + "/v1/completions", bodies, timeout)
    level = Level(target.label, prompts, results, wall, tokens)
    if not quiet:
        print(f"  {target.label:<20} {level.n:>3} streams: {level.aggregate:7.1f} tok/s, "
              f"TTFT p50 {level.ttft(50) or 0:8.1f} ms, failed {level.failed}, "
              f"empty {level.empty}", flush=True)
    return level


def cross_check(levels: list[Level], reference_side: str) -> None:
    """Greedy decoding of one prompt must give one text whichever server ran it: compare
    every stream with the reference side's stream for the same prompt (and that side with
    the first other side that has the prompt)."""
    texts: dict[str, dict[int, str]] = {}
    for lv in levels:
        for k, r in zip(lv.prompts, lv.results):
            if r.error is None and r.text:
                texts.setdefault(lv.side, {})[k] = r.text
    for lv in levels:
        others = [reference_side] if lv.side != reference_side else \
            [s for s in texts if s != reference_side]
        for k, r in zip(lv.prompts, lv.results):
            if r.error is not None or not r.text:
                continue
            ref = next((texts[s][k] for s in others if k in texts.get(s, {})), None)
            if ref is None or r.text == ref:
                continue
            if ref.startswith(r.text):
                lv.cut += 1
            else:
                lv.differs += 1


def run(levels: list[int], tokens: int = 64, threads: int = THREADS, parallel: int = 8,
        baseline: int = 0) -> dict:
    entry = bench_entry("smollm2")
    path = entry.weights_path()
    ferry_label = f"Ferry 1x{threads} threads, {parallel} slots"
    base_label = f"Ferry {baseline}x1 thread, 1 slot"
    peer_label = f"peer {THREADS} threads"
    out: list[Level] = []
    sets, k = [], 1000
    for n in levels:
        sets.append(list(range(k, k + n)))
        k += n
    with Stack("concurrency") as stack:
        stack.redis()
        batched = stack.workers("smollm2", 1, options={"n_threads": threads,
                                                       "parallel": parallel})
        web = stack.web()
        ferry = Target(ferry_label, web.url, {"stream_options": {"include_usage": True}})
        tuned = stack.peer(path, "tuned", n_ctx=entry.num_ctx, n_threads=THREADS,
                           n_threads_batch=THREADS, interrupt_requests="False")
        # repeat_penalty: the peer's default is 1.1; Ferry (like OpenAI) has none.
        peer = Target(peer_label, tuned.url, {"repeat_penalty": 1.0})
        defaults = stack.peer(path, "defaults", n_ctx=entry.num_ctx)
        peer_defaults = Target("peer defaults", defaults.url, {"repeat_penalty": 1.0})
        # One short stream each first: first-touch page faults, thread pools, connections.
        for t in (ferry, peer, peer_defaults):
            asyncio.run(measure(t, [0], 8, quiet=True))
        for i, (n, ids) in enumerate(zip(levels, sets)):
            for t in ((ferry, peer) if i % 2 == 0 else (peer, ferry)):
                out.append(asyncio.run(measure(t, ids, tokens)))
            if n == 8:
                out.append(asyncio.run(measure(peer_defaults, ids, tokens)))
        if baseline:
            for w in batched:
                w.stop()
            stack.workers("smollm2", baseline, options={"n_threads": 1, "parallel": 1})
            base = Target(base_label, web.url, ferry.extra)
            asyncio.run(measure(base, [0], 8, quiet=True))
            for ids in sets:
                out.append(asyncio.run(measure(base, ids, tokens)))
    cross_check(out, peer_label)
    return report(out, levels, tokens, threads, parallel, baseline, ferry_label, peer_label,
                  base_label)


def report(out: list[Level], levels: list[int], tokens: int, threads: int, parallel: int,
           baseline: int, ferry_label: str, peer_label: str, base_label: str) -> dict:
    by = {(lv.side, lv.n): lv for lv in out}
    rows = []
    for lv in out:
        base = by.get((peer_label, lv.n))
        rows.append([lv.side, lv.n, lv.aggregate,
                     times(ratio(lv.aggregate, base.aggregate)) if base else None,
                     lv.ttft(50), lv.ttft(99),
                     times(ratio(lv.ttft(50), base.ttft(50))) if base else None,
                     lv.failed, lv.empty, lv.cut, lv.differs])
    print_table(f"Concurrency: {tokens} tokens per stream, all streams sent at once, greedy, "
                f"one prompt per stream; ratios against '{peer_label}' (llama_cpp.server, "
                f"interrupt_requests=False). Ferry: 1 web process + Redis + worker processes as "
                f"labelled. Machine: {os.cpu_count()} cores",
                ["side", "streams", "agg tok/s", "vs peer", "TTFT p50 ms", "TTFT p99 ms",
                 "TTFT vs peer", "failed", "empty", "cut short", "differs"], rows)
    f8, p8 = by.get((ferry_label, 8)), by.get((peer_label, 8))
    goal = None
    if f8 and p8:
        goal = {"aggregate_ratio": ratio(f8.aggregate, p8.aggregate),
                "ttft_p50_ratio": ratio(f8.ttft(50), p8.ttft(50)),
                "empty": f8.empty + f8.failed}
        goal["met"] = (goal["aggregate_ratio"] >= GOAL_AGG
                       and goal["ttft_p50_ratio"] <= GOAL_TTFT and goal["empty"] == 0)
    data = {"levels": levels, "tokens": tokens, "threads_budget": THREADS,
            "sides": {ferry_label: f"Ferry: 1 worker process, {threads} llama.cpp threads, "
                                   f"{parallel} sequences decoded together; 1 gunicorn gevent "
                                   "web process, redis-server",
                      base_label: f"Ferry: {baseline} worker processes x 1 llama.cpp thread, "
                                  "one stream at a time each",
                      peer_label: f"python -m llama_cpp.server: n_threads={THREADS}, "
                                  f"n_threads_batch={THREADS}, interrupt_requests=False",
                      "peer defaults": "python -m llama_cpp.server with its defaults "
                                       f"(n_threads={max(1, (os.cpu_count() or 2) // 2)}, "
                                       "interrupt_requests=True)"},
            "ferry": ferry_label, "peer": peer_label, "baseline": base_label,
            "rows": [lv.row() for lv in out], "goal_at_8": goal,
            "goal": {"aggregate_ratio": GOAL_AGG, "ttft_p50_ratio": GOAL_TTFT, "empty": 0}}
    save("concurrency", data)
    bad = [lv.row() for lv in out if lv.side.startswith("Ferry")
           and (lv.failed or lv.empty or lv.short)]
    if bad:
        raise CheckFailed(f"Ferry streams failed, came back empty or short: {bad}")
    return data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--levels", default="1,8,32")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=THREADS,
                   help="llama.cpp threads of Ferry's one worker process")
    p.add_argument("--parallel", type=int, default=8, help="its slots (sequences batched)")
    p.add_argument("--baseline", type=int, default=0,
                   help="a second Ferry pass with this many 1-thread, 1-slot workers (0: none)")
    a = p.parse_args()
    run([int(x) for x in a.levels.split(",")], a.tokens, a.threads, a.parallel, a.baseline)


if __name__ == "__main__":
    main()
