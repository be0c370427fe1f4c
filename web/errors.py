"""One error handler: every failure is an OpenAI error envelope with its status, or, under
/v1/messages, Anthropic's ``{"type": "error", "error": {type, message}}`` (the same exception
tree, spelt by ``tasks.core.message_events.error_body``)."""

from __future__ import annotations

import json
import logging
import uuid

import redis as redis_lib
from flask import Flask, Response, g, has_request_context, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from config.errors import FerryError, PayloadTooLarge, RateLimited, ServiceUnavailable
from tasks.core import message_events

# Requests under this path speak Anthropic's dialect (web/messages.py).
MESSAGES_PATH = "/v1/messages"

log = logging.getLogger(__name__)


def _anthropic() -> bool:
    path = request.path if has_request_context() else ""
    return path == MESSAGES_PATH or path.startswith(MESSAGES_PATH + "/")


def error_response(err: FerryError) -> Response:
    if _anthropic():
        request_id = g.get("job_id") or f"req_{uuid.uuid4().hex}"
        resp = Response(json.dumps(message_events.error_body(err, request_id)),
                        status=message_events.error_status(err), mimetype="application/json",
                        headers={"request-id": request_id})
    else:
        resp = Response(json.dumps({"error": err.to_dict()}), status=err.status,
                        mimetype="application/json")
    if isinstance(err, RateLimited):
        resp.headers["Retry-After"] = str(err.retry_after)
    return resp


def register(app: Flask) -> None:
    @app.errorhandler(FerryError)
    def _ferry(err: FerryError):
        return error_response(err)

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(_):
        return error_response(PayloadTooLarge("The request body is too large."))

    @app.errorhandler(redis_lib.RedisError)
    def _redis(exc: redis_lib.RedisError):
        log.warning("Redis error: %s", exc)
        return error_response(ServiceUnavailable(f"Redis is unreachable: {exc}"))

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):
        err = FerryError(exc.description or exc.name)
        err.status = exc.code or 500
        err.type = "invalid_request_error" if err.status < 500 else "server_error"
        err.code = {404: "not_found", 405: "method_not_allowed"}.get(err.status)
        return error_response(err)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("unhandled error")
        return error_response(FerryError("The server had an error while processing the request."))
