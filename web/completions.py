"""POST /v1/completions (the legacy text completion endpoint)."""

from __future__ import annotations

from flask import Blueprint, current_app

from tasks.core import completions
from tasks.core.schemas.completions import CreateCompletionRequest
from web import generation
from web.validation import parse_body

bp = Blueprint("completions", __name__)


@bp.post("/v1/completions")
def create_completion():
    req = parse_body(CreateCompletionRequest)
    prepared = completions.prepare_all(req, current_app.extensions["ferry"])
    return generation.respond(prepared, stream=req.stream, include_usage=req.include_usage)
