"""The job record: what Redis keeps about one job, and the job object clients see."""

from __future__ import annotations

import json
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from tasks.jobs.shapes import ResponseSpec

JobStatus = Literal["queued", "in_progress", "completed", "failed", "cancelled", "expired"]
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "cancelled", "expired"})

# Fields stored as JSON in the hash; the others are strings or Unix times.
_JSON = ("spec", "result", "error")


class JobRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    endpoint: str
    model: str
    # The Celery queue the job was sent to (its position is counted there).
    queue: str
    status: JobStatus
    spec: ResponseSpec
    created: float
    # Not started by then: expired.
    deadline: float
    # The record (and its result) is deleted then.
    retained_until: float
    started: float | None = None
    finished: float | None = None
    worker: str | None = None
    webhook: str | None = None
    # Who submitted it (``config/tenants.py``); "" for records made before owners existed.
    owner: str = ""
    # The body the synchronous endpoint returns (completed, or cancelled while running).
    result: dict[str, Any] | None = None
    # The OpenAI error object (failed, expired).
    error: dict[str, Any] | None = None
    # Why ``result`` is null although the job completed: it was over the size kept per job.
    result_omitted: str | None = None

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes]) -> "JobRecord":
        data: dict[str, Any] = {k.decode(): v.decode() for k, v in raw.items()}
        for key in _JSON:
            if key in data:
                data[key] = json.loads(data[key])
        return cls.model_validate(data)

    def to_hash(self) -> dict[str, str]:
        out = {}
        for key, value in self.model_dump(mode="json", exclude_none=True).items():
            out[key] = json.dumps(value) if key in _JSON else str(value)
        return out

    def public(self, queue_position: int | None = None) -> dict[str, Any]:
        """The job object of ``/v1/jobs`` (also the webhook payload)."""
        return {
            "id": self.id, "object": "job", "endpoint": self.endpoint, "model": self.model,
            "status": self.status, "created_at": _ts(self.created),
            "started_at": _ts(self.started), "finished_at": _ts(self.finished),
            "expires_at": _ts(self.deadline),
            # Rounded up: the record is deleted at the exact time, never after this.
            "retained_until": math.ceil(self.retained_until),
            "queue_position": queue_position if self.status == "queued" else None,
            # Kept apart, as milliseconds (the times above are whole seconds): waiting for a
            # worker (until it started, or ended unstarted) and running on it.
            "queue_wait_ms": _ms(self.created, self.started or self.finished),
            "run_time_ms": _ms(self.started, self.finished),
            "webhook": self.webhook, "result": self.result,
            "result_omitted": self.result_omitted, "error": self.error,
        }


def _ms(start: float | None, end: float | None) -> int | None:
    return None if start is None or end is None else max(0, round((end - start) * 1000))


def _ts(t: float | None) -> int | None:
    # Whole seconds, as OpenAI's ``created``.
    return None if t is None else int(t)
