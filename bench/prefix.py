"""Benchmark: prompt prefix reuse on multi-turn chat. Conversations over one long system
prompt, each turn appending the last reply and a new question, through
``/v1/chat/completions``, greedy, streamed; ``--concurrent`` conversations in flight at once,
each sending its next turn when its last reply ended. Three sides in one run, one after the
other on the same cores:

- Ferry, reuse off: one worker process with ``prefix_reuse = false`` (every prompt evaluated
  whole, as before prefix reuse);
- Ferry, reuse on: the same worker with the option at its default;
- the peer: ``python -m llama_cpp.server`` on the same GGUF with its prompt cache on
  (``--cache True``, a RAM cache of saved states: its best setting for this traffic).

Both Ferry sides get one worker of ``--threads`` llama.cpp threads and ``--concurrent``
slots; the peer gets the same threads (it runs one request at a time). Per side: TTFT p50 and
p99 per turn index, prompt tokens evaluated and read from cache (Ferry's usage), aggregate
completion tokens/s over the whole run. Greedy replies must be the same with reuse on as
off (a different one is counted, and fails the run). Goals: warm turns (every turn after the
first) TTFT p50 at least 5x lower with reuse on than off, and lower than the peer's.

    python -m bench.prefix [--quick] [--conversations 16] [--turns 6] [--concurrent 8]
                           [--system-tokens 1000] [--tokens 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
from dataclasses import dataclass, field

import aiohttp

from bench.client import StreamResult, connector, stream
from bench.common import CheckFailed, ms, pct, print_table, ratio, save, times
from bench.stack import Stack, bench_entry

GOAL_WARM_VS_OFF = 5.0
TOPICS = ["tides", "lighthouses", "knots", "ferries", "harbours", "compasses", "sails",
          "anchors", "buoys", "rivers", "storms", "maps", "ropes", "gulls", "islands", "oars"]


def system_prompt(tokens: int) -> str:
    """About ``tokens`` tokens of rules (SmolLM2: ~12 tokens a rule)."""
    rules = [f"Rule {i}: answer in plain words and mention the number {i} only if asked."
             for i in range(max(1, tokens // 16))]
    return "You are a patient harbour guide.\n" + "\n".join(rules)


def question(conv: int, turn: int) -> str:
    return f"Question {turn + 1}: tell me one fact about {TOPICS[(conv + turn) % len(TOPICS)]}."


@dataclass
class Side:
    label: str
    url: str
    extra: dict
    results: dict[tuple[int, int], StreamResult] = field(default_factory=dict)
    texts: dict[tuple[int, int], str] = field(default_factory=dict)
    wall: float = 0.0

    def turn(self, t: int) -> list[StreamResult]:
        return [r for (_, turn), r in sorted(self.results.items()) if turn == t]

    def warm(self) -> list[StreamResult]:
        return [r for (_, turn), r in self.results.items() if turn > 0]

    def ttft(self, results: list[StreamResult], q: float) -> float | None:
        return ms(pct([r.ttft for r in results if r.ttft is not None], q))

    def usage(self, key: str) -> int | None:
        vals = [r.usage for r in self.results.values()]
        if not vals or any(u is None for u in vals):
            return None
        if key == "cached":
            return sum((u.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
                       for u in vals)
        return sum(u["prompt_tokens"] for u in vals)

    @property
    def failed(self) -> int:
        return sum(not r.ok for r in self.results.values())

    @property
    def aggregate(self) -> float:
        return sum(r.tokens for r in self.results.values() if r.error is None) / self.wall


async def conversation(session, side: Side, conv: int, turns: int, system: str,
                       tokens: int, gate: asyncio.Semaphore) -> None:
    messages = [{"role": "system", "content": system}]
    async with gate:
        for t in range(turns):
            messages.append({"role": "user", "content": question(conv, t)})
            body = {"model": "smollm2", "messages": messages, "max_tokens": tokens,
                    "temperature": 0, **side.extra}
            res = await stream(session, side.url + "/v1/chat/completions", body, 300)
            side.results[(conv, t)] = res
            side.texts[(conv, t)] = res.text
            if not res.ok:
                return
            messages.append({"role": "assistant", "content": res.text})


async def measure(side: Side, conversations: int, turns: int, concurrent: int, system: str,
                  tokens: int) -> Side:
    gate = asyncio.Semaphore(concurrent)
    async with aiohttp.ClientSession(connector=connector(concurrent),
                                     timeout=aiohttp.ClientTimeout(total=None)) as session:
        t0 = asyncio.get_running_loop().time()
        await asyncio.gather(*(conversation(session, side, c, turns, system, tokens, gate)
                               for c in range(conversations)))
        side.wall = asyncio.get_running_loop().time() - t0
    warm = side.ttft(side.warm(), 50)
    print(f"  {side.label:<28} {side.aggregate:7.1f} tok/s, warm TTFT p50 {warm or 0:8.1f} ms, "
          f"failed {side.failed}", flush=True)
    return side


def run(conversations: int = 16, turns: int = 6, concurrent: int = 8,
        system_tokens: int = 1000, tokens: int = 32, threads: int = 2) -> dict:
    entry = bench_entry("smollm2")
    system = system_prompt(system_tokens)
    usage = {"stream_options": {"include_usage": True}}
    off = Side("Ferry, reuse off", "", usage)
    on = Side("Ferry, reuse on", "", usage)
    peer = Side("peer, cache=true", "", {"repeat_penalty": 1.0})
    args = (conversations, turns, concurrent, system, tokens)
    with Stack("prefix") as stack:
        stack.redis()
        web = stack.web()
        for side, reuse in ((off, False), (on, True)):
            workers = stack.workers("smollm2", 1, options={
                "n_threads": threads, "parallel": concurrent, "prefix_reuse": reuse})
            side.url = web.url
            asyncio.run(measure(side, *args))
            for w in workers:
                w.stop()
        server = stack.peer(entry.weights_path(), "cache", n_ctx=entry.num_ctx,
                            n_threads=threads, n_threads_batch=threads,
                            interrupt_requests="False", cache="True")
        peer.url = server.url
        asyncio.run(measure(peer, *args))
    return report([off, on, peer], conversations, turns, concurrent, system_tokens, tokens,
                  threads)


def report(sides: list[Side], conversations: int, turns: int, concurrent: int,
           system_tokens: int, tokens: int, threads: int) -> dict:
    off, on, peer = sides
    differs = sum(on.texts.get(k) != v for k, v in off.texts.items())
    peer_differs = sum(peer.texts.get(k) != v for k, v in off.texts.items())
    rows = []
    for t in range(turns):
        row = [t + 1]
        for s in sides:
            rs = s.turn(t)
            row += [s.ttft(rs, 50), s.ttft(rs, 99)]
        rows.append(row)
    headers = ["turn"] + [f"{s.label} TTFT {q}" for s in sides for q in ("p50", "p99")]
    title = (f"Prefix reuse: {conversations} conversations x {turns} turns, {concurrent} at "
             f"once, ~{system_tokens}-token system prompt, {tokens} tokens a reply, greedy; "
             f"TTFT in ms. Every side: {threads} llama.cpp threads; Ferry 1 worker with "
             f"{concurrent} slots. Machine: {os.cpu_count()} cores, load "
             f"{os.getloadavg()[0]:.1f}")
    print_table(title, headers, rows)
    summary = []
    for s in sides:
        prompt, cached = s.usage("prompt"), s.usage("cached")
        summary.append([s.label, s.ttft(s.warm(), 50), s.ttft(s.warm(), 99),
                        None if prompt is None else prompt - cached, cached, s.aggregate,
                        s.failed])
    print_table("Per side (warm: turns 2 on)",
                ["side", "warm TTFT p50 ms", "warm TTFT p99 ms", "prompt tokens evaluated",
                 "read from cache", "agg tok/s", "failed"], summary)
    warm = {s.label: s.ttft(s.warm(), 50) for s in sides}
    speedup = ratio(warm[off.label], warm[on.label])
    vs_peer = ratio(warm[peer.label], warm[on.label])
    met = (speedup is not None and speedup >= GOAL_WARM_VS_OFF and vs_peer is not None
           and vs_peer > 1.0 and differs == 0)
    print(f"warm TTFT p50: reuse on is {times(speedup)} better than off (goal "
          f"{times(GOAL_WARM_VS_OFF)}), {times(vs_peer)} better than the peer (goal > 1x); "
          f"replies differing on vs off: {differs}; peer replies differing from Ferry's: "
          f"{peer_differs} (another sampler stack; shown, not a goal). Goal met: {met}")
    data = {"conversations": conversations, "turns": turns, "concurrent": concurrent,
            "system_tokens": system_tokens, "tokens": tokens, "threads": threads,
            "rows": [dict(zip(headers, r)) for r in rows],
            "sides": [dict(zip(["side", "warm_ttft_p50_ms", "warm_ttft_p99_ms",
                                "prompt_evaluated", "prompt_cached", "aggregate_tok_s",
                                "failed"], r)) for r in summary],
            "warm_speedup_vs_off": speedup, "warm_speedup_vs_peer": vs_peer,
            "differs_on_vs_off": differs, "peer_differs": peer_differs,
            "goal": {"warm_vs_off": GOAL_WARM_VS_OFF, "warm_vs_peer": 1.0}, "met": met}
    save("prefix", data)
    if off.failed or on.failed or differs:
        raise CheckFailed(f"Ferry conversations failed ({off.failed} off, {on.failed} on) or "
                          f"replies differ with reuse on ({differs})")
    return data


QUICK = {"conversations": 4, "turns": 3, "concurrent": 4, "system_tokens": 400, "tokens": 16}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"small parameters: {QUICK}")
    p.add_argument("--conversations", type=int, default=16)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--concurrent", type=int, default=8)
    p.add_argument("--system-tokens", type=int, default=1000)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    kw = {"conversations": a.conversations, "turns": a.turns, "concurrent": a.concurrent,
          "system_tokens": a.system_tokens, "tokens": a.tokens, "threads": a.threads}
    run(**(kw | QUICK if a.quick else kw))


if __name__ == "__main__":
    main()
