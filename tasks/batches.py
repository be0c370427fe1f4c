"""The Batch API's Celery tasks. Thin: hand the batch to this worker's ``BatchRunner``.

Acknowledged late (``tasks/app.py: make_batch_celery``): a task whose worker dies is run
again. A task that fails is retried with backoff; both are safe because chunk results are
written once. A chunk that fails every retry is given up (its lines reported as failed), so
its batch still ends.
"""

from __future__ import annotations

import logging

from celery import shared_task

from config.contract.protocol import BATCH_CHUNK_TASK, BATCH_QUEUE, BATCH_START_TASK

log = logging.getLogger(__name__)

RETRY = dict(bind=True, ignore_result=True, acks_late=True, max_retries=10)


@shared_task(name=BATCH_START_TASK, autoretry_for=(Exception,), retry_backoff=True,
             retry_backoff_max=60, **RETRY)
def start(self, batch_id: str) -> None:
    def enqueue_chunk(batch: str, index: int) -> None:
        self.app.send_task(BATCH_CHUNK_TASK, args=[batch, index], queue=BATCH_QUEUE)

    self.app.ferry_batches.start(batch_id, enqueue_chunk)


@shared_task(name=BATCH_CHUNK_TASK, **RETRY)
def run_chunk(self, batch_id: str, index: int) -> None:
    retries = self.app.ferry_settings.batch_chunk_retries
    try:
        self.app.ferry_batches.run_chunk(batch_id, index)
    except Exception as e:
        if self.request.retries < retries:  # backing off 1, 2, 4 ... 60 s
            raise self.retry(exc=e, countdown=min(60, 2 ** self.request.retries),
                             max_retries=retries) from None
        # Out of retries: without this the chunk is never written and its batch never ends.
        log.exception("batch %s chunk %d failed %d times; giving up", batch_id, index,
                      retries + 1)
        self.app.ferry_batches.give_up(batch_id, index, f"{type(e).__name__}: {e}")
