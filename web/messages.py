"""/v1/messages and /v1/messages/count_tokens, Anthropic's Messages API (the core is
``tasks/core/messages.py``). Its errors are in Anthropic's shape (``web/errors.py``, by path)."""

from __future__ import annotations

import json

from flask import Blueprint, Response, current_app, g, request

from tasks.core import messages
from tasks.core.generation import ClientGone
from tasks.core.schemas.messages import (CountMessageTokensRequest, CreateMessageRequest,
                                         check_betas)
from web import generation
from web.validation import parse_body

bp = Blueprint("messages", __name__)


def _ferry():
    return current_app.extensions["ferry"]


@bp.before_request
def _betas():
    # ``anthropic-version`` is accepted and ignored: there is one version of this API here.
    check_betas(request.headers.get("anthropic-beta"))


@bp.post("/v1/messages")
def create_message():
    req = parse_body(CreateMessageRequest)
    turn = messages.prepare(req, _ferry())
    g.model, g.job_id = turn.prepared.entry.name, turn.id
    headers = {"X-Request-Id": turn.id, "request-id": turn.id}
    try:
        if not req.stream:
            body = messages.collect(_ferry(), turn, generation.caller())
            return Response(json.dumps(body), status=200, mimetype="application/json",
                            headers=headers)
        _, streaming = messages.begin(_ferry(), turn, generation.caller())
    except ClientGone:
        return Response(status=499)
    return generation.dialect_stream(streaming, headers)


@bp.post("/v1/messages/count_tokens")
def count_tokens():
    req = parse_body(CountMessageTokensRequest)
    try:
        job_id, body = messages.count_tokens(_ferry(), req, generation.caller())
    except ClientGone:
        return Response(status=499)
    return Response(json.dumps(body), status=200, mimetype="application/json",
                    headers={"X-Request-Id": job_id, "request-id": job_id})
