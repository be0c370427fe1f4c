"""Benchmark: prefix affinity with two workers. The multi-turn conversations of
``bench.prefix`` (one long system prompt, each turn appending the last reply and a question),
against Ferry with two smollm2 workers, affinity routing off and then on
(``FERRY_AFFINITY``). A warm turn (every turn after the first) *hits its cache* when the
worker that ran it read at least the whole previous turn's prompt from its prefix cache
(usage ``cached_tokens``): only the worker that served the conversation holds that; the
other one holds at most the system prompt. Each worker has a sequence for every
conversation, so a miss is the routing's, not the cache's size. Goal: with affinity on,
at least 90% of warm turns hit (off: about half, as two workers take turns at random).

    python -m bench.affinity [--quick] [--conversations 8] [--turns 5] [--concurrent 8]
                             [--system-tokens 600] [--tokens 16]
"""

from __future__ import annotations

import argparse
import asyncio
import os

from bench.common import CheckFailed, print_table, save
from bench.prefix import Side, measure, system_prompt
from bench.stack import Stack

GOAL_HIT_RATE = 0.90


def hit_rate(side: Side) -> tuple[int, int]:
    """Warm turns that read the previous turn's whole prompt from cache, and warm turns."""
    hits = warm = 0
    for (conv, t), res in side.results.items():
        before = side.results.get((conv, t - 1))
        if t == 0 or before is None or res.usage is None or before.usage is None:
            continue
        warm += 1
        cached = (res.usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        hits += cached >= before.usage["prompt_tokens"]
    return hits, warm


def run(conversations: int = 8, turns: int = 5, concurrent: int = 8, system_tokens: int = 600,
        tokens: int = 16) -> dict:
    system = system_prompt(system_tokens)
    usage = {"stream_options": {"include_usage": True}}
    sides = [Side("affinity off", "", usage), Side("affinity on", "", usage)]
    with Stack("affinity") as stack:
        stack.redis()
        for side, affinity in zip(sides, ("false", "true")):
            web = stack.web(FERRY_AFFINITY=affinity)
            workers = stack.workers("smollm2", 2, options={
                "n_threads": 1, "parallel": concurrent, "prefix_reuse": True})
            side.url = web.url
            asyncio.run(measure(side, conversations, turns, concurrent, system, tokens))
            for service in (*workers, web):
                service.stop()
    rows = []
    for side in sides:
        hits, warm = hit_rate(side)
        rows.append([side.label, warm, hits, 100.0 * hits / warm if warm else None,
                     side.ttft(side.warm(), 50), side.usage("prompt") - side.usage("cached")
                     if side.usage("prompt") is not None else None, side.failed])
    print_table(f"Prefix affinity: 2 smollm2 workers (1 llama.cpp thread, {concurrent} "
                f"sequences each), {conversations} conversations x {turns} turns, "
                f"{concurrent} at once, ~{system_tokens}-token system prompt, {tokens} tokens "
                f"a reply. Machine: {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
                ["routing", "warm turns", "cache hits", "hit rate %", "warm TTFT p50 ms",
                 "prompt tokens evaluated", "failed"], rows)
    rate_on = rows[1][3]
    met = rate_on is not None and rate_on >= 100 * GOAL_HIT_RATE and not any(r[6] for r in rows)
    print(f"warm-turn cache hit rate: {rows[0][3] or 0:.0f}% off, {rate_on or 0:.0f}% on "
          f"(goal >= {100 * GOAL_HIT_RATE:.0f}%). Goal met: {met}")
    data = {"conversations": conversations, "turns": turns, "concurrent": concurrent,
            "system_tokens": system_tokens, "tokens": tokens,
            "sides": [dict(zip(["routing", "warm_turns", "hits", "hit_rate_pct",
                                "warm_ttft_p50_ms", "prompt_evaluated", "failed"], r))
                      for r in rows],
            "goal": {"hit_rate": GOAL_HIT_RATE}, "met": met}
    save("affinity", data)
    if any(r[6] for r in rows):
        raise CheckFailed(f"conversations failed: {[r[6] for r in rows]}")
    return data


QUICK = {"conversations": 4, "turns": 3, "concurrent": 4, "system_tokens": 300, "tokens": 8}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"small parameters: {QUICK}")
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--concurrent", type=int, default=8)
    p.add_argument("--system-tokens", type=int, default=600)
    p.add_argument("--tokens", type=int, default=16)
    a = p.parse_args()
    kw = {"conversations": a.conversations, "turns": a.turns, "concurrent": a.concurrent,
          "system_tokens": a.system_tokens, "tokens": a.tokens}
    run(**(kw | QUICK if a.quick else kw))


if __name__ == "__main__":
    main()
