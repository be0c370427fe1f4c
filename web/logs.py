"""Request logging: one line per generation request, keyed by the job id that the worker logs
too, so a request can be followed from web to worker. A client's own id (``X-Client-Request-Id``
or ``X-Request-Id``) is logged beside it and echoed back as ``X-Client-Request-Id``."""

from __future__ import annotations

import logging

from flask import Flask, g, has_request_context, request

log = logging.getLogger("ferry.web")


def client_request_id() -> str | None:
    value = request.headers.get("X-Client-Request-Id") or request.headers.get("X-Request-Id")
    return value[:128] if value else None


def enqueued(job_id: str, model: str) -> None:
    g.job_id = job_id
    if not has_request_context():  # in-process work of the batch worker
        log.info("enqueued job=%s model=%s", job_id, model)
        return
    log.info("enqueued job=%s model=%s client_request_id=%s user_agent=%s", job_id, model,
             client_request_id(), request.headers.get("User-Agent", "-")[:80])


def register(app: Flask) -> None:
    @app.after_request
    def _echo(resp):
        theirs = client_request_id()
        if theirs:
            resp.headers["X-Client-Request-Id"] = theirs
        if "X-Request-Id" not in resp.headers and g.get("job_id"):
            resp.headers["X-Request-Id"] = g.job_id
        return resp
