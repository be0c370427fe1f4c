"""Ends jobs that nobody else will: queued past their deadline (``expired``), or running on
a worker that died (``failed``, ``worker_lost``), or queued with their Celery message lost
(``failed``, ``job_lost``: see ``LostMessages``). Their webhooks fire from here, so they
fire with no client connected. It moves jobs routed to a worker that died back onto their
model's queue (``tasks/routing.py``). Every web process runs one; the transitions in
``jobs.store`` are atomic, so a job is ended once however many sweep. It also deletes files
past their ``expires_at`` (metadata and content) and drops expired batches from the list."""

from __future__ import annotations

import logging
import time

import gevent
import redis as redis_lib

from tasks.batchstore import BatchStore
from tasks.filestore import FileStore

log = logging.getLogger(__name__)

# Seconds between sweeps: expiry is reported within about this much of the deadline.
INTERVAL = 1.0


class LostMessages:
    """Finds queued jobs whose message is in no Celery queue, and fails them.

    Redis restarted from its append-only file loses up to its last second of writes (a
    message pushed then), and a worker killed between popping a message and starting its
    job takes it along: such a job would stay ``queued`` until its deadline, its client
    waiting as long. A job is failed once it was seen missing in two looks at least a
    sweep apart and is older than ``job_lost_after`` (a worker may be between the pop and
    the start at the first look; then its start wins and the second look finds nothing)."""

    def __init__(self, ferry):
        self.ferry = ferry
        self._suspects: dict[str, float] = {}

    def sweep(self) -> None:
        now, settings = time.time(), self.ferry.settings
        seen: dict[str, float] = {}
        for queue in {entry.queue for entry in self.ferry.registry}:
            for bulk in (False, True):
                for job_id in self.ferry.jobs.missing(queue, bulk, now - settings.job_lost_after):
                    first = self._suspects.get(job_id, now)
                    if now - first >= INTERVAL * 0.9 and self.ferry.jobs.fail_lost_message(job_id):
                        log.warning("job %s failed: its queued message was lost", job_id)
                        continue
                    seen[job_id] = first
        self._suspects = seen


def start(ferry) -> gevent.Greenlet:
    return gevent.spawn(_run, ferry)


def _run(ferry) -> None:
    files = FileStore(ferry.redis, ferry.settings.files_dir)
    batches = BatchStore(ferry.redis, ferry.settings.batch_retention)
    lost = LostMessages(ferry)
    while True:
        gevent.sleep(INTERVAL)
        try:
            ferry.jobs.sweep()
            _rescue(ferry)
            lost.sweep()
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
