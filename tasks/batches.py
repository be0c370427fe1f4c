"""The Batch API's Celery tasks. Thin: hand the batch to this worker's ``BatchRunner``.

Acknowledged late (``tasks/app.py: make_batch_celery``): a task whose worker dies is run
again. A task that fails is retried with backoff; both are safe because chunk results are
written once.
"""

from __future__ import annotations

from celery import shared_task

from tasks.protocol import BATCH_CHUNK_TASK, BATCH_QUEUE, BATCH_START_TASK

RETRY = dict(bind=True, ignore_result=True, acks_late=True, autoretry_for=(Exception,),
             retry_backoff=True, retry_backoff_max=60, max_retries=10)


@shared_task(name=BATCH_START_TASK, **RETRY)
def start(self, batch_id: str) -> None:
    def enqueue_chunk(batch: str, index: int) -> None:
        self.app.send_task(BATCH_CHUNK_TASK, args=[batch, index], queue=BATCH_QUEUE)

    self.app.ferry_batches.start(batch_id, enqueue_chunk)


@shared_task(name=BATCH_CHUNK_TASK, **RETRY)
def run_chunk(self, batch_id: str, index: int) -> None:
    self.app.ferry_batches.run_chunk(batch_id, index)
