"""POST /v1/jobs: an OpenAI request body, and where it would have been sent; GET /v1/jobs."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from tasks.jobs.shapes import Endpoint
from web.schemas.batches import ListBatchesRequest


class CreateJobRequest(BaseModel):
    # Ferry's own envelope: an unknown field is a mistake worth a 400, not a silent no-op.
    model_config = ConfigDict(extra="forbid")

    endpoint: Endpoint
    # Validated by the endpoint's own request class (tasks/core/schemas/chat.py, completions.py).
    body: dict[str, Any]
    # POSTed the final job object when the job ends (see tasks/webhooks.py).
    webhook: Annotated[str, Field(max_length=2048)] | None = None


class ListJobsRequest(ListBatchesRequest):
    """The caller's jobs, newest first: ``after`` a job id, ``limit`` (1-100, default 20),
    OpenAI's list shape (the same cursor as ``GET /v1/batches``)."""
