"""Drives the request core with no web app (``python -m tests.core_probe``): what a front
door other than the HTTP routes sees. Patched by gevent first, as the batch worker is (the
core's relay runs on gevent). Prints one JSON line per case, read by tests/test_core.py."""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import time  # noqa: E402

from config import load_settings  # noqa: E402
from config.tenants import Tenant  # noqa: E402
from tasks.core import endpoints, services  # noqa: E402
from tasks.core.generation import Caller  # noqa: E402

CHAT = "/v1/chat/completions"


def script(**kw) -> dict:
    return {"model": "synthetic", "messages": [{"role": "user", "content": json.dumps(kw)}]}


def main() -> None:
    ferry = services.build(load_settings())
    tenant = Tenant("core-probe")
    out = {"done": endpoints.answer(ferry, CHAT, script(tokens=["a", "b"]), Caller(tenant)),
           "invalid": endpoints.answer(ferry, CHAT, {"model": "synthetic"}, Caller(tenant))}
    enqueued: list[str] = []
    gone_at = time.monotonic() + 0.3
    caller = Caller(tenant, abandoned=lambda: time.monotonic() > gone_at,
                    on_enqueued=lambda job_id, model: enqueued.append(job_id))
    out["abandoned"] = endpoints.answer(ferry, CHAT, script(count=200, rate=20), caller)
    until = time.monotonic() + 10
    record = ferry.jobs.get(enqueued[0], owner=tenant.owner)
    while record.status != "cancelled" and time.monotonic() < until:
        time.sleep(0.1)
        record = ferry.jobs.get(enqueued[0], owner=tenant.owner)
    out["abandoned_status"] = record.status
    print(json.dumps(out))


if __name__ == "__main__":
    main()
