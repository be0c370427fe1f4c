"""Ends jobs that nobody else will: queued past their deadline (``expired``), or running on
a worker that died (``failed``, ``worker_lost``). Their webhooks fire from here, so they
fire with no client connected. It moves jobs routed to a worker that died back onto their
model's queue (``tasks/routing.py``). Every web process runs one; the transitions in
``jobs.store`` are atomic, so a job is ended once however many sweep. It also deletes files
past their ``expires_at`` (metadata and content) and drops expired batches from the list."""

from __future__ import annotations

import logging

import gevent
import redis as redis_lib

from tasks.batchstore import BatchStore
from tasks.filestore import FileStore

log = logging.getLogger(__name__)

# Seconds between sweeps: expiry is reported within about this much of the deadline.
INTERVAL = 1.0


def start(ferry) -> gevent.Greenlet:
    return gevent.spawn(_run, ferry)


def _run(ferry) -> None:
    files = FileStore(ferry.redis, ferry.settings.files_dir)
    batches = BatchStore(ferry.redis, ferry.settings.batch_retention)
    while True:
        gevent.sleep(INTERVAL)
        try:
            ferry.jobs.sweep(lambda queue: set(ferry.relay.live_workers(queue)))
            _rescue(ferry)
            files.sweep_expired()
            batches.sweep_expired()
        except redis_lib.RedisError as e:
            log.warning("job sweep skipped: %s", e)
        except Exception:
            log.exception("job sweep failed")


def _rescue(ferry) -> None:
    """Jobs routed to a worker that died since are moved back to their model's queue."""
    for entry in ferry.registry:
        moved = ferry.router.rescue(entry.queue)
        if moved:
            log.warning("moved %d jobs of a lapsed %s worker back to %s", moved, entry.name,
                        entry.queue)
