"""The batch worker: ``python -m tasks.batch_worker`` runs Batch API jobs from ``ferry.batch``.

It holds no model: each batch line is a request to the request core (``tasks/core``), which
queues it on the model's own queue behind interactive requests. gevent runs the lines of a
chunk concurrently (and the core's event relay), so it patches before anything else is
imported; chunks run ``batch_chunk_concurrency`` at a time.

Chunks are acknowledged when done; a chunk taken by a worker that died stays unacknowledged
and is handed out again once older than ``batch_visibility_timeout``. Kombu sweeps for those
only from its event loop, which a gevent worker does not run, so ``_redeliver`` does it.
A message lost between kombu's BRPOP and its unacknowledged record is beyond that: the same
sweep queues again the work of batches that made no progress for a visibility timeout
(``BatchRunner.resume_stalled``).
"""

from gevent import monkey

monkey.patch_all()

import logging  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402
from celery.signals import worker_ready  # noqa: E402

from config import load_settings  # noqa: E402
from tasks.app import log_format, make_batch_celery, worker_argv  # noqa: E402
from tasks.batch_runner import BatchRunner  # noqa: E402
from config.contract.protocol import BATCH_CHUNK_TASK, BATCH_QUEUE, BATCH_START_TASK  # noqa: E402
from tasks.redis_check import EvictingRedis  # noqa: E402

settings = load_settings()
app = make_batch_celery(settings)
log = logging.getLogger("ferry.batch_worker")


def _redeliver() -> None:
    period = min(settings.batch_visibility_timeout / 4, 30.0)
    while True:
        try:
            with app.connection_for_write() as conn:
                conn.default_channel.qos.restore_visible(num=1000, interval=1)
            app.ferry_batches.resume_stalled(
                lambda batch: app.send_task(BATCH_START_TASK, args=[batch], queue=BATCH_QUEUE),
                lambda batch, index: app.send_task(BATCH_CHUNK_TASK, args=[batch, index],
                                                   queue=BATCH_QUEUE))
        except Exception as e:  # the next sweep tries again
            log.warning("could not look for abandoned chunks: %s", e)
        gevent.sleep(period)


@worker_ready.connect
def _start_redelivery(**_):
    gevent.spawn(_redeliver)


def main(argv: list[str]) -> None:
    logging.basicConfig(**log_format(settings))
    try:
        app.ferry_batches = BatchRunner(settings)
    except EvictingRedis as e:
        sys.exit(f"ferry batch worker: {e}")
    app.worker_main(worker_argv(
        settings, "-Q", BATCH_QUEUE, "-P", "gevent", "-c", str(settings.batch_chunk_concurrency),
        # One chunk reserved ahead of each running one: with every slot busy, the consumer
        # polls the broker only once a second, and a freed slot should not wait for that.
        "--prefetch-multiplier", "2", "-n", f"batch.{os.getpid()}@{socket.gethostname()}",
        "--without-gossip", "--without-mingle", *argv,
    ))


if __name__ == "__main__":
    main(sys.argv[1:])
