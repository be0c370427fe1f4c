"""/v1/responses: create, retrieve, delete and list input items (the core is
``tasks/core/responses.py``)."""

from __future__ import annotations

import json
from collections.abc import Iterator

from flask import Blueprint, Response, current_app, g, jsonify, request

from config.contract.protocol import events_log
from config.errors import InvalidRequest, ServiceUnavailable
from config.tenants import ANY_OWNER
from tasks.core import responses, responses_background as background
from tasks.core.generation import Caller, ClientGone
from tasks.core.responses_store import StoredResponse, store_of
from tasks.core.schemas.responses import CreateResponseRequest
from web import generation, job_events, logs
from web.auth import current_tenant
from web.validation import parse_body

bp = Blueprint("responses", __name__)

# Seconds a cancel waits for a running job's worker to record its end (one decode step).
CANCEL_WAIT = 2.0


def _ferry():
    return current_app.extensions["ferry"]


@bp.post("/v1/responses")
def create_response():
    req = parse_body(CreateResponseRequest)
    turn = responses.prepare(req, _ferry(), current_tenant())
    g.model = turn.prepared.entry.name
    headers = {"X-Request-Id": turn.id}
    if req.background:
        caller = Caller(current_tenant(), on_enqueued=logs.enqueued)
        body = responses.submit_background(_ferry(), turn, caller)
        return Response(json.dumps(body), status=200, mimetype="application/json",
                        headers=headers)
    try:
        if not req.stream:
            return Response(json.dumps(responses.collect(_ferry(), turn, generation.caller())),
                            status=200, mimetype="application/json", headers=headers)
        _, streaming = responses.begin(_ferry(), turn, generation.caller())
    except ClientGone:
        return Response(status=499)
    return generation.dialect_stream(streaming, headers)


@bp.get("/v1/responses/<response_id>")
def retrieve_response(response_id: str):
    stored = _store().get(response_id, owner=current_tenant().owner)
    if request.args.get("stream", "false").lower() != "true":
        return jsonify(background.refresh(_ferry(), stored).response)
    if not stored.response.get("background"):
        raise InvalidRequest("Only background responses can be streamed again.",
                             param="stream")
    try:
        after = int(request.args.get("starting_after", -1))
    except ValueError:
        raise InvalidRequest("starting_after must be an integer.",
                             param="starting_after") from None
    return generation.named_events(_replay(stored, after), {"X-Request-Id": response_id})


def _replay(stored: StoredResponse, after: int) -> Iterator[dict]:
    """A background response's stream events above ``after``: replayed from its job's
    buffer, then followed live (``web.job_events.Follower``). Set up now, in the request;
    the events are read as the response is sent."""
    ferry, response_id = _ferry(), stored.response["id"]
    record = ferry.jobs.get(response_id, owner=ANY_OWNER)
    if record is not None and record.done and not ferry.redis.exists(events_log(response_id)):
        # Its events expired (``job_events_ttl``): the same stream, rebuilt from its result.
        return background.replay(ferry, stored, background.result_events(record), after)
    tap = ferry.relay.tap(response_id)  # before the buffer is read (web/job_events.py)
    follower = job_events.Follower(ferry.jobs, tap, response_id, -1)
    gone = generation.client_watch()
    lost: list[str] = []

    def evs():
        try:
            for item in follower.events():
                if item is None and gone():
                    return
                if item is not None:
                    yield item[1]
        except job_events.EventsLost as e:
            lost.append(str(e))
        finally:
            tap.close()

    def stream():
        last = after
        for ev in background.replay(ferry, stored, evs(), after):
            last = ev["sequence_number"]
            yield ev
        if lost:  # some events are no longer kept (the buffer is capped): said, not skipped
            err = ServiceUnavailable(lost[0], code="events_lost")
            yield {"type": "error", "code": err.code, "message": err.message, "param": None,
                   "sequence_number": last + 1}

    return stream()


@bp.post("/v1/responses/<response_id>/cancel")
def cancel_response(response_id: str):
    owner = current_tenant().owner
    stored = _store().get(response_id, owner=owner)
    return jsonify(background.cancel(_ferry(), stored, owner, wait=CANCEL_WAIT).response)


@bp.delete("/v1/responses/<response_id>")
def delete_response(response_id: str):
    _store().delete(response_id, owner=current_tenant().owner)
    return jsonify({"id": response_id, "object": "response.deleted", "deleted": True})


@bp.get("/v1/responses/<response_id>/input_items")
def list_input_items(response_id: str):
    items = _store().get(response_id, owner=current_tenant().owner).input_items
    order = request.args.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequest("order must be 'asc' or 'desc'.", param="order")
    try:
        limit = int(request.args.get("limit", 20))
    except ValueError:
        raise InvalidRequest("limit must be an integer.", param="limit") from None
    if not 1 <= limit <= 100:
        raise InvalidRequest("limit must be between 1 and 100.", param="limit")
    items = items[::-1] if order == "desc" else items
    after = request.args.get("after")
    if after is not None:
        ids = [i["id"] for i in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    page = items[:limit]
    return jsonify({"object": "list", "data": page,
                    "first_id": page[0]["id"] if page else None,
                    "last_id": page[-1]["id"] if page else None,
                    "has_more": len(items) > limit})


def _store():
    return store_of(_ferry())
