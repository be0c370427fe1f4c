"""bench/stack.py's promise: services it started stop with the benchmark, also when the
benchmark is terminated by a signal rather than finishing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.services import ROOT

SCRIPT = """
import sys, time
from bench.stack import Stack
with Stack("signal-test") as stack:
    stack.redis()
    print(stack.services[0].proc.pid, flush=True)
    time.sleep(60)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ", 1)[1][0] != "Z"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_services_stop_when_the_benchmark_is_terminated(sig):
    bench = subprocess.Popen([sys.executable, "-c", SCRIPT], cwd=ROOT, stdout=subprocess.PIPE,
                             text=True)
    try:
        redis_pid = int(bench.stdout.readline())
        assert alive(redis_pid)
        bench.send_signal(sig)
        assert bench.wait(15) == 128 + sig
        deadline = time.monotonic() + 5
        while alive(redis_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(redis_pid)
    finally:
        bench.kill()
