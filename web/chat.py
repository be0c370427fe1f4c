"""POST /v1/chat/completions."""

from __future__ import annotations

from flask import Blueprint, current_app

from tasks.core import chat
from tasks.core.schemas.chat import CreateChatCompletionRequest
from web import generation
from web.validation import parse_body

bp = Blueprint("chat", __name__)


@bp.post("/v1/chat/completions")
def create_chat_completion():
    req = parse_body(CreateChatCompletionRequest)
    prepared = chat.prepare_all(req, current_app.extensions["ferry"])
    return generation.respond(prepared, stream=req.stream, include_usage=req.include_usage)
