"""The request core on its own, with no Flask app (tests/core_probe.py): a front door such
as the batch runner gets the HTTP endpoint's answer as plain values, and an abandoned
request's job is cancelled."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.services import ROOT, ferry_env


def test_the_core_answers_without_the_web_app(redis_server, synthetic_worker):
    done = subprocess.run([sys.executable, "-m", "tests.core_probe"], cwd=ROOT,
                          env=ferry_env(redis_server.url), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    status, request_id, body = out["done"]
    assert status == 200 and request_id.startswith("chatcmpl-") and body["id"] == request_id
    assert body["choices"][0]["message"]["content"] == "ab"
    status, request_id, body = out["invalid"]
    assert (status, request_id) == (400, None)
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] == "messages"
    assert out["abandoned"] is None
    assert out["abandoned_status"] == "cancelled"
