"""/v1/responses: create, retrieve, delete and list input items (the core is
``tasks/core/responses.py``)."""

from __future__ import annotations

import json
from collections.abc import Iterator

from flask import Blueprint, Response, current_app, g, jsonify, request

from config.errors import InvalidRequest
from tasks.core import responses
from tasks.core.generation import ClientGone
from tasks.core.schemas.responses import CreateResponseRequest
from web import generation
from web.auth import current_tenant
from web.validation import parse_body

bp = Blueprint("responses", __name__)


def _ferry():
    return current_app.extensions["ferry"]


@bp.post("/v1/responses")
def create_response():
    req = parse_body(CreateResponseRequest)
    turn = responses.prepare(req, _ferry(), current_tenant())
    g.model = turn.prepared.entry.name
    headers = {"X-Request-Id": turn.id}
    try:
        if not req.stream:
            return Response(json.dumps(responses.collect(_ferry(), turn, generation.caller())),
                            status=200, mimetype="application/json", headers=headers)
        _, stream = responses.begin(_ferry(), turn, generation.caller())
    except ClientGone:
        return Response(status=499)
    return Response(_sse(stream), status=200, mimetype="text/event-stream",
                    headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _sse(stream: Iterator[dict]) -> Iterator[bytes]:
    try:
        for ev in stream:
            yield (f"event: {ev['type']}\ndata: ".encode()
                   + json.dumps(ev, separators=(",", ":")).encode() + b"\n\n")
    except ClientGone:
        return


@bp.get("/v1/responses/<response_id>")
def retrieve_response(response_id: str):
    return jsonify(_store().get(response_id, owner=current_tenant().owner).response)


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
    return responses.store_of(_ferry())
