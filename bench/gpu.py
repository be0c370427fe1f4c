"""GPU throughput: the ExLlamaV2 backend at 1, 8 and 32 concurrent streams.

    FERRY_TEST_EXL2_MODEL=/models/Qwen2.5-7B-Instruct-exl2 python -m bench.gpu

Run by ``make gpu-check`` after the conformance suite. Without CUDA it prints "skipped: no
CUDA" and exits 0. Streams are driven in-process, through ``ExLlamaV2Backend.generate`` from
N threads exactly as a worker's Celery task threads drive it, so the figures are the
engine's and the batching loop's, without Redis and HTTP (the server-level benchmarks are
elsewhere in bench/). Optional: FERRY_TEST_EXL2_CTX (num_ctx, default 4096),
FERRY_TEST_EXL2_OPTIONS (registry options as JSON), FERRY_BENCH_TOKENS (per stream, 256).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass

LEVELS = (1, 8, 32)
TOPICS = ["rivers", "bread", "volcanoes", "chess", "bees", "lighthouses", "glaciers", "violins"]


@dataclass
class Stream:
    ttft: float = 0.0       # seconds from submit to the first text
    tokens: int = 0
    decode: float = 0.0     # seconds from the first text to the end
    error: str = ""


def entry():
    from config.settings import ModelEntry
    from models.exllamav2.options import round_up

    num_ctx = int(os.environ.get("FERRY_TEST_EXL2_CTX", "4096"))
    # Enough batch slots and cache for 32 streams of a short prompt + FERRY_BENCH_TOKENS.
    default = {"max_batch_size": max(LEVELS), "cache_size": max(round_up(num_ctx), 16384)}
    options = json.loads(os.environ.get("FERRY_TEST_EXL2_OPTIONS") or json.dumps(default))
    return ModelEntry(name="exl2-bench", backend="exllamav2",
                      weights=os.environ["FERRY_TEST_EXL2_MODEL"], num_ctx=num_ctx,
                      options=options)


def one(backend, i: int, max_tokens: int, out: list[Stream]) -> None:
    from config.contract.events import Delta, Finish
    from config.contract.job import GenerationJob, Sampling

    s, start, first = Stream(), time.monotonic(), None
    job = GenerationJob(id=f"bench-{i}", model="exl2-bench", max_tokens=max_tokens,
                        sampling=Sampling(temperature=0.7, seed=i), messages=[{
                            "role": "user",
                            "content": f"Write an essay about {TOPICS[i % len(TOPICS)]} ({i})."}])
    try:
        for ev in backend.generate(job, lambda: False):
            if isinstance(ev, Delta) and ev.text and first is None:
                first = time.monotonic()
                s.ttft = first - start
            elif isinstance(ev, Finish):
                s.tokens = ev.completion_tokens
        s.decode = time.monotonic() - (first or start)
    except Exception as e:  # reported in the table, not hidden
        s.error = f"{type(e).__name__}: {e}"
    out[i] = s


def level(backend, n: int, max_tokens: int) -> dict:
    streams = [Stream() for _ in range(n)]
    threads = [threading.Thread(target=one, args=(backend, i, max_tokens, streams))
               for i in range(n)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    ok = [s for s in streams if not s.error]
    tokens = sum(s.tokens for s in ok)
    return {
        "streams": n, "errors": n - len(ok), "tokens": tokens, "wall_s": wall,
        "agg_tok_s": tokens / wall if wall else 0.0,
        "stream_tok_s": statistics.median(s.tokens / s.decode for s in ok if s.decode) if ok else 0,
        "ttft_p50_ms": 1000 * statistics.median(s.ttft for s in ok) if ok else 0,
        "ttft_max_ms": 1000 * max(s.ttft for s in ok) if ok else 0,
        "first_error": next((s.error for s in streams if s.error), ""),
    }


def table(rows: list[dict]) -> str:
    head = ("streams", "errors", "tokens", "wall s", "total tok/s", "tok/s per stream",
            "TTFT p50 ms", "TTFT max ms")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r['streams']} | {r['errors']} | {r['tokens']} | {r['wall_s']:.2f} | "
                     f"{r['agg_tok_s']:.1f} | {r['stream_tok_s']:.1f} | {r['ttft_p50_ms']:.0f} | "
                     f"{r['ttft_max_ms']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("skipped: no CUDA")
        return 0
    if not os.environ.get("FERRY_TEST_EXL2_MODEL"):
        print("bench.gpu: set FERRY_TEST_EXL2_MODEL to an EXL2 model directory", file=sys.stderr)
        return 2
    from models import load_backend

    max_tokens = int(os.environ.get("FERRY_BENCH_TOKENS", "256"))
    e = entry()
    print(f"loading {e.weights} (num_ctx {e.num_ctx}, options {e.options}) on "
          f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}", flush=True)
    backend = load_backend(e)
    try:
        level(backend, 1, 16)  # warm-up, not reported
        rows = [level(backend, n, max_tokens) for n in LEVELS]
    finally:
        backend.close()
    print(f"\nExLlamaV2, {max_tokens} tokens per stream, paged attention "
          f"{'on' if backend.engine.paged else 'OFF (one job at a time)'}\n")
    print(table(rows))
    errors = [r["first_error"] for r in rows if r["errors"]]
    for err in errors:
        print(f"error: {err}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
