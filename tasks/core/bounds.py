"""What one request may ask, checked before its jobs are built (each a 400 naming the
parameter and the limit). The README's "Bounded requests" table lists them all.

A job's budget is per model (``ModelEntry.max_job_tokens``): ``n x max_tokens`` beyond it is
refused here; a request without ``max_tokens`` is not refused but capped by the worker
(``models.base.completion_budget``), which also ends a job running past
``max_job_seconds``.
"""

from __future__ import annotations

from config.errors import InvalidRequest
from config.settings import ModelEntry, Settings
from models.constraints import SchemaLimits


def schema_limits(settings: Settings) -> SchemaLimits:
    return SchemaLimits(max_bytes=settings.max_schema_bytes, max_depth=settings.max_schema_depth,
                        max_repeat=settings.max_schema_repeat,
                        max_total_repeat=settings.max_schema_repeat_total)


def check_budget(entry: ModelEntry, choices: int, max_tokens: int | None) -> None:
    """``choices`` generated (n, or best_of) of at most ``max_tokens`` each."""
    if max_tokens is not None and choices * max_tokens > entry.max_job_tokens:
        raise InvalidRequest(
            f"n x max_tokens is {choices} x {max_tokens} = {choices * max_tokens} tokens; the "
            f"model '{entry.name}' generates at most {entry.max_job_tokens} tokens per request "
            "(max_job_tokens). Lower max_tokens or n.", param="max_tokens")


def check_prompts(settings: Settings, prompts: int) -> None:
    if prompts > settings.max_prompts:
        raise InvalidRequest(f"{prompts} prompts in one request; at most {settings.max_prompts} "
                             "are accepted (max_prompts). Send several requests.",
                             param="prompt")
