"""``background: true`` responses, on the job system: submitted as a job (recorded, then
enqueued; nobody follows it), stored at once as ``queued``, and read back from the job.

The job's record says where it is (queued, in progress, ended); once it ended, its events,
replayed from the job's buffer (``JobStore.replay``), are folded by the same
``ResponseBuilder`` a synchronous request uses, and the final response is stored in place
of the queued one, so later reads need neither the job nor its buffer (the buffer is kept
``job_events_ttl``, a stored response ``response_ttl``). The builder names items by the
response id and their place, so every replay of the stream gives the same events.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

from config.contract import events
from config.errors import FerryError, InvalidRequest, rebuild
from config.tenants import ANY_OWNER
from tasks.core.response_events import ResponseBuilder
from tasks.core.responses_store import StoredResponse, store_of
from tasks.core.services import Ferry
from tasks.jobs.record import JobRecord

# Job states as a response's status while the job has not ended.
_RUNNING = {"queued": "queued", "in_progress": "in_progress"}


def pending(stored: StoredResponse) -> bool:
    return stored.response.get("background") and stored.response["status"] in _RUNNING


def refresh(ferry: Ferry, stored: StoredResponse) -> StoredResponse:
    """A stored response as it stands now: a background one's job read again, and once
    it ended, its final response stored. Its events are replayed; where the buffer no
    longer holds them all (kept ``job_events_ttl``), the job's result is read instead."""
    if not pending(stored):
        return stored
    record = ferry.jobs.get(stored.response["id"], owner=ANY_OWNER)
    if record is None:  # its record is gone (``job_ttl``): as it was last seen
        return stored
    if not record.done:
        return stored.model_copy(update={"response": {**stored.response,
                                                      "status": _RUNNING[record.status]}})
    builder = ResponseBuilder(_base(stored))
    for _ in fold(builder, (ev for _, ev in ferry.jobs.replay(record.id))):
        pass
    if builder.status in _RUNNING:
        builder = ResponseBuilder(_base(stored))
        for _ in fold(builder, result_events(record)):
            pass
    return finalize(ferry, stored, builder)


def result_events(record: JobRecord) -> Iterator[events.Event]:
    """A finished job's events, rebuilt from its result (the chat body)."""
    if record.result is None:
        err = (rebuild(record.error, 500) if record.error else
               FerryError("The job ended without a result.", code="cancelled"
                          if record.status == "cancelled" else None))
        yield events.Failed(status=err.status, error=err.to_dict())
        return
    choice, usage = record.result["choices"][0], record.result["usage"]
    message = choice["message"]
    if message.get("content"):
        yield events.Delta(0, message["content"])
    for i, call in enumerate(message.get("tool_calls") or ()):
        yield events.ToolCallDelta(0, i, call["function"]["arguments"], call["id"],
                                   call["function"]["name"])
    reason = "cancelled" if record.status == "cancelled" else choice["finish_reason"]
    yield events.Finish(0, reason, usage["completion_tokens"])
    yield events.Done(usage["prompt_tokens"], usage["completion_tokens"],
                      usage.get("prompt_tokens_details", {}).get("cached_tokens", 0))


def fold(builder: ResponseBuilder, evs: Iterable[events.Event]) -> Iterator[dict[str, Any]]:
    """A background job's events as Responses stream events, from ``response.created``."""
    yield from builder.opening("queued")
    for ev in evs:
        if isinstance(ev, events.Failed):
            err = rebuild(ev.error, ev.status)
            yield from builder.cancel() if err.code == "cancelled" else builder.fail(err)
            return
        yield from builder.feed(ev)
        if isinstance(ev, events.Done):
            return


def finalize(ferry: Ferry, stored: StoredResponse, builder: ResponseBuilder) -> StoredResponse:
    final = stored.model_copy(update={
        "response": builder.response(), "messages": stored.messages + builder.messages()})
    store_of(ferry).put(final)
    return final


def replay(ferry: Ferry, stored: StoredResponse, evs: Iterable[events.Event],
           starting_after: int) -> Iterator[dict[str, Any]]:
    """The stream of a background response (``evs``: its job's events, replayed then
    followed live), its events numbered above ``starting_after``; the final response is
    stored when the stream reaches it."""
    builder = ResponseBuilder(_base(stored))
    for ev in fold(builder, evs):
        if ev["type"] in ("response.completed", "response.incomplete", "response.failed") \
                and pending(stored):
            finalize(ferry, stored, builder)
        if ev["sequence_number"] > starting_after:
            yield ev


def cancel(ferry: Ferry, stored: StoredResponse, owner: str, wait: float) -> StoredResponse:
    """Cancel a background response's job (queued: at once; running: its worker stops it
    within a decode step), waiting up to ``wait`` seconds for it to end; the response."""
    if not stored.response.get("background"):
        raise InvalidRequest("Only background responses can be cancelled.",
                             param="response_id")
    ferry.jobs.cancel(stored.response["id"], owner=owner)
    until = time.monotonic() + wait
    while True:
        record = ferry.jobs.get(stored.response["id"], owner=owner)
        if record is None or record.done or time.monotonic() > until:
            return refresh(ferry, stored)
        time.sleep(0.05)


def _base(stored: StoredResponse) -> dict[str, Any]:
    keep = ("status", "error", "incomplete_details", "output", "usage")
    return {k: v for k, v in stored.response.items() if k not in keep}
