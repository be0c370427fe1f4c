"""POST /v1/jobs: an OpenAI request body, and where it would have been sent."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from tasks.jobs.shapes import Endpoint


class CreateJobRequest(BaseModel):
    # Ferry's own envelope: an unknown field is a mistake worth a 400, not a silent no-op.
    model_config = ConfigDict(extra="forbid")

    endpoint: Endpoint
    # Validated by the endpoint's own request class (tasks/core/schemas/chat.py, completions.py).
    body: dict[str, Any]
    # POSTed the final job object when the job ends (see tasks/webhooks.py).
    webhook: Annotated[str, Field(max_length=2048)] | None = None
