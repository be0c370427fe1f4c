"""The embedding task. Thin: decode the job, hand it to this worker's runtime."""

from __future__ import annotations

from celery import shared_task

from models.job import EmbeddingJob
from tasks.protocol import EMBED_TASK


@shared_task(name=EMBED_TASK, bind=True, ignore_result=True)
def embed(self, job: dict) -> None:
    self.app.ferry_runtime.embed(EmbeddingJob.model_validate(job))
