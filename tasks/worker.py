"""A model worker: ``python -m tasks.worker <model>`` serves one model from the registry.

One model per process, loaded once when the worker starts (not before: never load a model
and then fork). The backend class chooses the pool (``worker_pool``/``worker_concurrency``
in ``models/base.py``): the solo pool runs one job at a time in the main thread, which is
what llama.cpp wants; embedding backends take threads, so that concurrent requests can share
a forward pass. Scale with more processes or hosts on the same Redis.
"""

from __future__ import annotations

import logging
import os
import socket
import sys

from celery.signals import worker_ready, worker_shutting_down

from config import Registry, load_settings
from models import backend_class
from tasks.app import make_celery
from tasks.runtime import Runtime

settings = load_settings()
app = make_celery(settings)
log = logging.getLogger("ferry.worker")


@worker_ready.connect
def _start(sender, **_):
    entry = Registry(settings.models).resolve(os.environ["FERRY_WORKER_MODEL"])
    app.ferry_runtime = Runtime(settings, entry, sender.hostname)
    app.ferry_runtime.start()
    log.info("worker %s serving %s on queue %s", sender.hostname, entry.name, entry.queue)


@worker_shutting_down.connect
def _stop(**_):
    runtime = getattr(app, "ferry_runtime", None)
    if runtime is not None:
        runtime.stop()


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit("usage: python -m tasks.worker <model> [celery worker options]")
    name, extra = argv[0], argv[1:]
    entry = Registry(settings.models).resolve(name)
    os.environ["FERRY_WORKER_MODEL"] = entry.name
    backend = backend_class(entry)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app.worker_main([
        "worker", "-Q", entry.queue, "-P", backend.worker_pool, "-c", str(backend.worker_concurrency),
        "--prefetch-multiplier", "1",
        "-n", f"{entry.name}.{os.getpid()}@{socket.gethostname()}", "--without-gossip",
        "--without-mingle", "--loglevel", "INFO", *extra,
    ])


if __name__ == "__main__":
    main(sys.argv[1:])
