"""The generation task. Thin: decode the job, hand it to this worker's runtime."""

from __future__ import annotations

from celery import shared_task

from config.contract.job import GenerationJob
from config.contract.protocol import GENERATE_TASK


@shared_task(name=GENERATE_TASK, bind=True, ignore_result=True)
def generate(self, job: dict) -> None:
    self.app.ferry_runtime.run(GenerationJob.model_validate(job))
