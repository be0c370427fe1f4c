"""Benchmark 2, single stream: decode tokens/s of one stream through Ferry against the same
backend in process, at the same thread count, greedy sampling. Goal: at least 0.95x.

Decode rate = (tokens - 1) / (last chunk - first chunk): the prompt is left out, so this is
the rate a reader sees once text flows. Runs alternate sides; the median run counts (the best
run is shown too: on a shared machine noise only ever slows a run down).

    python -m bench.single_stream [--runs 3] [--tokens 256]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics

from bench.client import StreamResult
from bench.common import times, pct, print_table, save
from bench.inprocess import InProcess, Paired
from bench.stack import Stack, bench_entry

MESSAGES = [{"role": "user", "content": "Tell me a long story about a ferry that crosses a "
                                        "wide river every day, and the people it carries."}]
GOAL = 0.95


def decode_rate(res: StreamResult) -> float:
    return (res.tokens - 1) / (res.times[-1] - res.times[0])


def run(runs: int = 3, tokens: int = 256) -> dict:
    entry = bench_entry("smollm2")
    local = InProcess(entry)
    try:
        with Stack("single") as stack:
            stack.redis()
            stack.workers("smollm2", 1)
            web = stack.web()
            pair = Paired(local, web.url + "/v1/chat/completions", MESSAGES, tokens)
            inproc, ferry = asyncio.run(pair.run(runs, warmup=1))
    finally:
        local.close()
    a = [decode_rate(r) for r in inproc]
    b = [decode_rate(r) for r in ferry]
    base, ours = statistics.median(a), statistics.median(b)
    n = inproc[0].tokens
    print_table(f"Single stream: decode tok/s, Ferry vs in-process llama.cpp ({runs} runs each, "
                f"{entry.options['n_threads']} thread, {n} tokens, temperature 0)",
                ["", "in-process", "Ferry", "ratio", "goal"],
                [["median tok/s", base, ours, times(ours / base), times(GOAL)],
                 ["best tok/s", max(a), max(b), times(max(b) / max(a)), None]])
    data = {"runs": runs, "threads": entry.options["n_threads"], "tokens": n,
            "tok_s": {"inprocess": a, "ferry": b},
            "median": {"inprocess": base, "ferry": ours, "ratio": ours / base},
            "best": {"inprocess": max(a), "ferry": max(b), "ratio": max(b) / max(a)},
            "ttft_p50_ms": {"inprocess": pct([r.ttft for r in inproc], 50) * 1000,
                            "ferry": pct([r.ttft for r in ferry], 50) * 1000},
            "goal": GOAL, "met": ours / base >= GOAL}
    save("single_stream", data)
    return data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--tokens", type=int, default=256)
    a = p.parse_args()
    run(a.runs, a.tokens)


if __name__ == "__main__":
    main()
