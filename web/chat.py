"""POST /v1/chat/completions."""

from __future__ import annotations

import logging
import uuid

from flask import Blueprint, current_app

from config.errors import InvalidRequest
from config.contract.job import GenerationJob
from tasks.jobs.shapes import ResponseSpec
from web import bounds, generation
from web.content import check_image_parts, job_images
from web.offload import off_hub
from web.schemas.chat import CreateChatCompletionRequest
from web.validation import parse_body

bp = Blueprint("chat", __name__)
log = logging.getLogger(__name__)

# For /v1/jobs: the request this endpoint takes.
Request = CreateChatCompletionRequest


def prepare(req: CreateChatCompletionRequest) -> generation.Prepared:
    """The job a chat request asks for (the one place it is built, for this endpoint and
    for /v1/jobs)."""
    ferry = current_app.extensions["ferry"]
    entry = ferry.registry.resolve(req.model)
    if entry.kind != "chat":
        raise InvalidRequest(f"The model '{req.model}' is an embedding model; it cannot chat.",
                             param="model")
    req.check()
    bounds.check_budget(entry, req.n, req.token_limit)
    off_hub(req.check_schemas, bounds.schema_limits(ferry.settings))
    check_image_parts(req.messages, ferry.settings)
    messages, images = job_images(entry, req.messages,
                                  [m.for_template(i) for i, m in enumerate(req.messages)],
                                  ferry.settings)
    job = GenerationJob(
        id=f"chatcmpl-{uuid.uuid4().hex}", model=entry.name,
        messages=messages, images=images,
        max_tokens=req.token_limit, stop=req.stops, n=req.n, sampling=req.sampling(),
        top_logprobs=req.top_logprobs_wanted, response_format=req.job_response_format(),
        tools=req.job_tools(), tool_choice=req.job_tool_choice(),
    )
    if req.user is not None:
        log.info("request %s from user %r", job.id, req.user)
    spec = ResponseSpec(endpoint="/v1/chat/completions", logprobs=bool(req.logprobs))
    return generation.Prepared(entry, job, spec)


@bp.post("/v1/chat/completions")
def create_chat_completion():
    req = parse_body(CreateChatCompletionRequest)
    return generation.respond(prepare(req), stream=req.stream, include_usage=req.include_usage)
