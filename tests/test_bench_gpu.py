"""bench/gpu.py's own logic (not a GPU measurement): it skips cleanly without CUDA, and its
concurrent driver and table work over the ExLlamaV2 backend with the engine double."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from bench import gpu
from tests.test_exllamav2_backend import Toy


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU host `make gpu-check` runs it")
def test_skips_without_cuda():
    out = subprocess.run([sys.executable, "-m", "bench.gpu"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "skipped: no CUDA"


def test_levels_drive_concurrent_streams_and_tabulate(tmp_path):
    toy = Toy(tmp_path, script=lambda job: [4] * 1000, step=0.005)
    try:
        row = gpu.level(toy.backend, 4, max_tokens=100)
    finally:
        toy.backend.close()
    assert row["streams"] == 4 and row["errors"] == 0 and row["tokens"] == 400
    assert any(len(step) == 4 for step in toy.gen.decode_steps)  # decoded together
    text = gpu.table([row])
    assert text.splitlines()[0].startswith("| streams | errors | tokens")
    assert text.splitlines()[2].startswith(f"| 4 | 0 | {400} |")
