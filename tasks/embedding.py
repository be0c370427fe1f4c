"""The embedding tasks. Thin: decode the job, hand it to this worker's runtime.

``embed_parts`` carries several requests as one job (the Batch API sends a chunk's lines
together, ``config.contract.job.EmbeddingPartsJob``).
"""

from __future__ import annotations

from celery import shared_task

from config.contract.job import EmbeddingJob, EmbeddingPartsJob
from config.contract.protocol import EMBED_PARTS_TASK, EMBED_TASK


@shared_task(name=EMBED_TASK, bind=True, ignore_result=True)
def embed(self, job: dict) -> None:
    self.app.ferry_runtime.embed(EmbeddingJob.model_validate(job))


@shared_task(name=EMBED_PARTS_TASK, bind=True, ignore_result=True)
def embed_parts(self, job: dict) -> None:
    self.app.ferry_runtime.embed_parts(EmbeddingPartsJob.model_validate(job))
