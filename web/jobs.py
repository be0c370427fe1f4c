"""The jobs API: submit an OpenAI request now, watch it or collect it later, cancel it.

    POST /v1/jobs                  {"endpoint", "body", "webhook"?} -> 202, the job object
    GET  /v1/jobs                  the caller's jobs, newest first (?after=<id>&limit=<n>)
    GET  /v1/jobs/{id}             the job object; every synchronous request is a job too
                                   (its X-Request-Id is the job id)
    GET  /v1/jobs/{id}/events      SSE: replay, then live (web/job_events.py)
    POST /v1/jobs/{id}/cancel      the job object, once the job ended (or after 2 s)

The body is validated, and the job built, by the endpoint's own ``Request`` and ``prepare``
(``tasks/core/endpoints.py``), exactly as the synchronous endpoint does it: an invalid body
is a 400 at submit.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import redis as redis_lib
from flask import Blueprint, current_app, g, jsonify, request

from config.errors import FerryError, InvalidRequest, NotFound
from tasks.jobs.record import JobRecord
from tasks import webhooks
from tasks.core import endpoints
from tasks.core.generation import Caller, submit
from web import job_events, logs
from web.auth import current_tenant
from web.schemas.jobs import CreateJobRequest, ListJobsRequest
from web.validation import parse_body, validate

bp = Blueprint("jobs", __name__)

# Seconds a cancel waits for a running job's worker to record its end (one decode step).
CANCEL_WAIT = 2.0


@contextmanager
def _within(prefix: str) -> Iterator[None]:
    """Errors about the inner request name their parameter from the envelope: ``body.n``."""
    try:
        yield
    except FerryError as e:
        e.param = f"{prefix}.{e.param}" if e.param else prefix
        raise


def _not_found(job_id: str) -> NotFound:
    hours = current_app.extensions["ferry"].settings.job_ttl / 3600
    return NotFound(f"No job '{job_id}': it does not exist, or it has expired (jobs are kept "
                    f"{hours:g} h).", param="id")


def _find(job_id: str) -> JobRecord:
    record = current_app.extensions["ferry"].jobs.get(job_id, owner=current_tenant().owner)
    if record is None:
        raise _not_found(job_id)
    return record


def _public(record: JobRecord) -> dict:
    try:
        position = current_app.extensions["ferry"].jobs.position(record)
    except redis_lib.RedisError:
        position = None
    return record.public(position)


@bp.post("/v1/jobs")
def create_job():
    ferry = current_app.extensions["ferry"]
    req = parse_body(CreateJobRequest)
    family = endpoints.family(req.endpoint)
    with _within("body"):
        body = validate(family.Request, req.body)
        if getattr(body, "stream", False):
            raise InvalidRequest("A job is not streamed: submit it without stream, and follow "
                                 "GET /v1/jobs/{id}/events.", param="stream")
        prepared = family.prepare(body, ferry)
    if req.webhook is not None:
        webhooks.check_url(req.webhook, allow_private=ferry.settings.webhook_allow_private)
    g.model = prepared.entry.name
    record = submit(ferry, prepared,
                    caller=Caller(current_tenant(), on_enqueued=logs.enqueued),
                    deadline=time.time() + ferry.settings.job_deadline, webhook=req.webhook)
    return jsonify(_public(record)), 202, {"Location": f"/v1/jobs/{record.id}",
                                           "X-Request-Id": record.id}


@bp.get("/v1/jobs")
def list_jobs():
    q = validate(ListJobsRequest, request.args.to_dict())
    found, has_more = current_app.extensions["ferry"].jobs.list(
        current_tenant().owner, after=q.after, limit=q.limit)
    return jsonify(q.page([_public(r) for r in found], has_more))


@bp.get("/v1/jobs/<job_id>")
def retrieve_job(job_id: str):
    ferry = current_app.extensions["ferry"]
    record = _find(job_id)
    if record.status == "queued" and time.time() > record.deadline:
        ferry.jobs.expire(job_id)  # the janitor would within a second; answer exactly now
        record = _find(job_id)
    return jsonify(_public(record))


@bp.post("/v1/jobs/<job_id>/cancel")
def cancel_job(job_id: str):
    ferry = current_app.extensions["ferry"]
    owner = current_tenant().owner
    record = ferry.jobs.cancel(job_id, owner=owner)
    if record is None:
        raise _not_found(job_id)
    until = time.monotonic() + CANCEL_WAIT
    while not record.done and time.monotonic() < until:
        time.sleep(0.05)
        record = ferry.jobs.get(job_id, owner=owner) or record
    return jsonify(_public(record))


@bp.get("/v1/jobs/<job_id>/events")
def stream_job_events(job_id: str):
    raw = request.headers.get("Last-Event-ID", "-1").strip() or "-1"
    try:
        after = int(raw)
    except ValueError:
        raise InvalidRequest("Last-Event-ID must be the id (a number) of an event of this "
                             "job.", param="Last-Event-ID") from None
    return job_events.stream(current_app.extensions["ferry"], _find(job_id), max(after, -1))
