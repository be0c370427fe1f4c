"""Runs every benchmark, then the report: ``python -m bench`` (``make bench``).

    python -m bench [--quick] [--only overhead,single_stream,structured,concurrency,prefix,affinity,relay,relay_engine,handover,embeddings,gpu,chaos]

``--quick`` uses small parameters, to check that the scripts work, not to measure. A
benchmark that fails (a wrong output, a service that would not start) is reported and the
others still run; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import traceback

from bench import (affinity, concurrency, handover, overhead, prefix, relay, report,
                   single_stream, structured)
from bench.common import BENCH_DIR

FULL = {
    "overhead": lambda: overhead.run(runs=100),
    "single_stream": lambda: single_stream.run(runs=3, tokens=256),
    "structured": lambda: structured.run(runs=3, tokens=300),
    "concurrency": lambda: concurrency.run([1, 8, 32], tokens=64, baseline=2),
    "prefix": lambda: prefix.run(conversations=16, turns=6, concurrent=8),
    "affinity": lambda: affinity.run(),
    "relay": lambda: relay.run([100, 500, 1000], count=300, rate=20.0, open_rate=100.0),
    # As a GPU host's workers make tokens: one loop per worker steps all its jobs at once.
    "relay_engine": lambda: relay.run([100, 500], count=300, rate=20.0, open_rate=100.0,
                                      lockstep=True, requests=0, engine=True),
    "handover": lambda: handover.run(jobs=32, tokens=300, step_ms=16.0),
}
QUICK = {
    "overhead": lambda: overhead.run(runs=3),
    "single_stream": lambda: single_stream.run(runs=1, tokens=32),
    "structured": lambda: structured.run(runs=1, tokens=300),
    "concurrency": lambda: concurrency.run([1, 4], tokens=16, parallel=4),
    "prefix": lambda: prefix.run(**prefix.QUICK),
    "affinity": lambda: affinity.run(**affinity.QUICK),
    "relay": lambda: relay.run([20, 50], count=20, rate=20.0, requests=100),
    "relay_engine": lambda: relay.run([20], count=20, rate=20.0, lockstep=True, requests=0,
                                      engine=True),
    "handover": lambda: handover.run(jobs=8, tokens=40, step_ms=4.0, rounds=1),
}
OTHERS = ("embeddings", "gpu", "chaos")
# Arguments for the benchmarks in their own modules.
FULL_ARGS = {"embeddings": ["--torch"]}
QUICK_ARGS = {"embeddings": ["--sentences", "500"], "chaos": ["--minutes", "1"]}


def external(name: str, args: list[str]) -> bool:
    """Benchmarks that live in their own module, written alongside this runner: run each if
    it is in this build. GPU without its module still says why it did not run."""
    if (BENCH_DIR / f"{name}.py").is_file():
        return subprocess.run([sys.executable, "-m", f"bench.{name}", *args]).returncode == 0
    if name == "gpu":
        probe = subprocess.run([sys.executable, "-c",
                                "import torch; print(torch.cuda.is_available())"],
                               capture_output=True, text=True)
        cuda = probe.stdout.strip() == "True"
        print("\ngpu: skipped: " + ("bench/gpu.py is not in this build" if cuda else "no CUDA"))
    else:
        print(f"\n{name}: skipped: bench/{name}.py is not in this build")
    return True


def main() -> int:
    p = argparse.ArgumentParser(description="Ferry's benchmarks")
    p.add_argument("--quick", action="store_true", help="small parameters, to try the scripts")
    p.add_argument("--only", default="", help="comma-separated benchmark names")
    a = p.parse_args()
    suite = QUICK if a.quick else FULL
    names = [n for n in a.only.split(",") if n] or [*suite, *OTHERS]
    failed = []
    t0 = time.monotonic()
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        try:
            if name in OTHERS:
                ok = external(name, (QUICK_ARGS if a.quick else FULL_ARGS).get(name, []))
            else:
                ok = (suite[name](), True)[1]
        except Exception:
            traceback.print_exc()
            ok = False
        if not ok:
            failed.append(name)
    print("\n=== report ===", flush=True)
    report.main(png=not a.quick)  # the committed plot comes from full runs only
    print(f"\nbenchmarks took {time.monotonic() - t0:.0f} s" +
          (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
