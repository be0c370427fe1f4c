"""POST /v1/chat/completions."""

from __future__ import annotations

import uuid

from flask import Blueprint, current_app

from config.errors import InvalidRequest
from tasks.jobs.shapes import ResponseSpec
from models.job import GenerationJob
from web import generation
from web.schemas.chat import CreateChatCompletionRequest
from web.validation import parse_body

bp = Blueprint("chat", __name__)

# For /v1/jobs: the request this endpoint takes.
Request = CreateChatCompletionRequest


def prepare(req: CreateChatCompletionRequest) -> generation.Prepared:
    """The job a chat request asks for (the one place it is built, for this endpoint and
    for /v1/jobs)."""
    entry = current_app.extensions["ferry"].registry.resolve(req.model)
    if entry.kind != "chat":
        raise InvalidRequest(f"The model '{req.model}' is an embedding model; it cannot chat.",
                             param="model")
    for i, m in enumerate(req.messages):
        if m.has_images():
            raise InvalidRequest(f"The model '{req.model}' has no image input; send text only.",
                                 param=f"messages[{i}].content")
    job = GenerationJob(
        id=f"chatcmpl-{uuid.uuid4().hex}", model=entry.name,
        messages=[m.for_template() for m in req.messages], max_tokens=req.token_limit,
        stop=req.stops, n=req.n, sampling=req.sampling(),
    )
    return generation.Prepared(entry, job, ResponseSpec(endpoint="/v1/chat/completions"))


@bp.post("/v1/chat/completions")
def create_chat_completion():
    req = parse_body(CreateChatCompletionRequest)
    return generation.respond(prepare(req), stream=req.stream, include_usage=req.include_usage)
