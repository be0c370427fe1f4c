"""The embedding tasks. Thin: decode the job(s), hand them to this worker's runtime.

``embed_many`` carries several jobs in one message (the Batch API sends a chunk's lines
together): the same jobs, events and errors, one Celery message instead of one each.
"""

from __future__ import annotations

from celery import shared_task

from models.job import EmbeddingJob
from tasks.protocol import EMBED_MANY_TASK, EMBED_TASK


@shared_task(name=EMBED_TASK, bind=True, ignore_result=True)
def embed(self, job: dict) -> None:
    self.app.ferry_runtime.embed(EmbeddingJob.model_validate(job))


@shared_task(name=EMBED_MANY_TASK, bind=True, ignore_result=True)
def embed_many(self, jobs: list[dict]) -> None:
    self.app.ferry_runtime.embed_many([EmbeddingJob.model_validate(j) for j in jobs])
