"""A model worker: ``python -m tasks.worker <model>`` serves one model from the registry;
``python -m tasks.worker --webhooks`` delivers webhooks (see ``tasks/webhooks.py``).

One model per process, loaded once when the worker starts (not before: never load a model
and then fork). The pool is the backend's (``worker_pool`` in ``models/base.py``): threads
where task threads feed the one batching loop that owns the model (llama.cpp with parallel
slots, ExLlamaV2, embeddings), solo where an engine runs one job at a time — never prefork:
CUDA does not survive fork, and each process would load its own model; never gevent: a
forward pass would block the hub. Scale with more processes or hosts on the same Redis.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import sys

from celery.signals import worker_ready, worker_shutdown

from config import Registry, load_settings
from models import backend_class
from tasks.app import log_format, make_celery, make_webhook_celery, worker_argv
from config.contract.protocol import WEBHOOK_QUEUE, connect
from tasks.redis_check import EvictingRedis, check_eviction_policy
from tasks.routing import worker_queue
from tasks.runtime import Runtime

settings = load_settings()
app = make_celery(settings)
log = logging.getLogger("ferry.worker")
# Celery's threads pool, woken when a thread frees (no prefetch: see tasks/thread_pool.py).
THREAD_POOL = "tasks.thread_pool:TaskPool"


@worker_ready.connect
def _start(sender, **_):
    if "FERRY_WORKER_MODEL" not in os.environ:
        return  # the webhook worker runs no model
    entry = Registry(settings.models).resolve(os.environ["FERRY_WORKER_MODEL"])
    own = worker_queue(entry.queue, sender.hostname)
    if not sender.task_consumer.consuming_from(own):
        # Named by an operator's own -n: its queue is the one routers will use.
        sender.add_task_queue(own)
    app.ferry_runtime = Runtime(settings, entry, sender.hostname, app)
    app.ferry_runtime.start()
    # The model and everything loaded with it live as long as the process: out of the
    # collector's sight, a full collection no longer stalls the job in hand for tens of ms.
    gc.freeze()
    log.info("worker %s serving %s on queue %s", sender.hostname, entry.name, entry.queue)


@worker_shutdown.connect
def _stop(**_):
    # After the warm shutdown finished the job in hand: until then the worker keeps beating,
    # so the web does not fail a stream that is still being served.
    runtime = getattr(app, "ferry_runtime", None)
    if runtime is not None:
        runtime.stop()


def webhooks_main(extra: list[str]) -> None:
    """The webhook sender: deliveries wait on the network, so threads, several at a time."""
    os.environ.pop("FERRY_WORKER_MODEL", None)
    sender = make_webhook_celery(settings)
    sender.conf.worker_pool = THREAD_POOL
    sender.worker_main(worker_argv(
        settings, "-Q", WEBHOOK_QUEUE, "-c", "4",
        "-n", f"webhooks.{os.getpid()}@{socket.gethostname()}", "--without-gossip",
        "--without-mingle", *extra,
    ))


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit("usage: python -m tasks.worker <model> | --webhooks  [celery worker options]")
    logging.basicConfig(**log_format(settings))
    try:
        check_eviction_policy(connect(settings.redis_url), settings.allow_redis_eviction)
    except EvictingRedis as e:
        sys.exit(f"ferry worker: {e}")
    if argv[0] == "--webhooks":
        return webhooks_main(argv[1:])
    if settings.log_level != "debug":
        # Ferry's own lines say when each job started and finished (tasks/runtime.py):
        # Celery's "received" and "succeeded" lines for every task said it again, ~5% of a
        # short job's CPU in a model worker (the webhook sender keeps them). A task's failure
        # is still logged (an error).
        for name in ("celery.worker.strategy", "celery.app.trace"):
            logging.getLogger(name).setLevel(logging.WARNING)
    name, extra = argv[0], argv[1:]
    entry = Registry(settings.models).resolve(name)
    os.environ["FERRY_WORKER_MODEL"] = entry.name
    pool, concurrency = backend_class(entry).worker_pool(entry)
    pool_option = ["-P", pool]
    if pool == "threads":
        # Celery's threads pool, woken when a thread frees (tasks/thread_pool.py). A pool
        # class is named by the setting: -P takes only Celery's own pool names.
        app.conf.worker_pool = THREAD_POOL
        pool_option = []
    name = f"{entry.name}.{os.getpid()}@{socket.gethostname()}"
    # The shared queue and this worker's own (prefix affinity, tasks/routing.py).
    queues = f"{entry.queue},{worker_queue(entry.queue, name)}"
    app.worker_main(worker_argv(
        settings, "-Q", queues, *pool_option, "-c", str(concurrency),
        "--prefetch-multiplier", "1",
        "-n", name, "--without-gossip",
        # Liveness is Ferry's own heartbeat (tasks/runtime.py), not Celery's events.
        "--without-mingle", "--without-heartbeat", *extra,
    ))


if __name__ == "__main__":
    main(sys.argv[1:])
