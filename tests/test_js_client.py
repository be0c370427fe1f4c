"""The official OpenAI JavaScript client (npm `openai`, node's test runner) against Ferry."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

JS = Path(__file__).with_name("js")


@pytest.mark.skipif(shutil.which("node") is None or shutil.which("npm") is None,
                    reason="node and npm are needed for the JavaScript client test")
def test_official_js_client(web, smollm2_worker, embeddings_worker):
    if not (JS / "node_modules" / "openai").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=JS, check=True,
                       capture_output=True, timeout=300)
    env = dict(os.environ, FERRY_BASE_URL=web.url + "/v1", FERRY_EMBEDDINGS="1")
    out = subprocess.run(["node", "--test"], cwd=JS, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "# fail 0" in out.stdout and "# skipped 0" in out.stdout, out.stdout[-2000:]
