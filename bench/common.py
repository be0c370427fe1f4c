"""What every benchmark shares: percentiles, the printed table, the JSON it leaves behind."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results"


class CheckFailed(Exception):
    """A benchmark's output was wrong: its figures must not be reported as a result."""


def pct(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation); None for no values."""
    return float(np.percentile(values, q)) if len(values) else None


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def times(r: float | None) -> str:
    """A ratio as printed in tables: ``1.02x``."""
    return "-" if r is None else f"{r:.2f}x"


def fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def print_table(title: str, headers: list[str], rows: list[list]) -> None:
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = "  ".join("-" * w for w in widths)
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    print(line)
    for r in cells:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    print(flush=True)


def machine() -> dict:
    """The machine a result was measured on, and how busy it was when the run started."""
    model = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {"nproc": os.cpu_count(), "cpu": model, "loadavg": list(os.getloadavg())}


def save(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    body = {"benchmark": name, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": machine(), **data}
    path.write_text(json.dumps(body, indent=2))
    print(f"wrote {path.relative_to(BENCH_DIR.parent)}")
    return path


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None
