"""POST /v1/completions (the legacy text completion endpoint)."""

from __future__ import annotations

import uuid

from flask import Blueprint, current_app

from config.errors import InvalidRequest
from tasks.jobs.shapes import ResponseSpec
from models.job import GenerationJob
from web import generation
from web.schemas.completions import CreateCompletionRequest
from web.validation import parse_body

bp = Blueprint("completions", __name__)

# For /v1/jobs: the request this endpoint takes.
Request = CreateCompletionRequest


def prepare(req: CreateCompletionRequest) -> generation.Prepared:
    """The job a completion request asks for (the one place it is built, for this endpoint
    and for /v1/jobs)."""
    entry = current_app.extensions["ferry"].registry.resolve(req.model)
    if entry.kind != "chat":
        raise InvalidRequest(f"The model '{req.model}' is an embedding model; it cannot "
                             "complete text.", param="model")
    prompts = req.prompts()
    if len(prompts) != 1:
        raise InvalidRequest("Send one prompt per request; use n for several completions.",
                             param="prompt")
    prompt = prompts[0]
    if req.echo and not isinstance(prompt, str):
        raise InvalidRequest("echo needs a text prompt.", param="echo")
    job = GenerationJob(
        id=f"cmpl-{uuid.uuid4().hex}", model=entry.name, prompt=prompt,
        max_tokens=req.max_tokens, stop=req.stops, n=req.n, sampling=req.sampling(),
    )
    spec = ResponseSpec(endpoint="/v1/completions", echo=prompt if req.echo else None)
    return generation.Prepared(entry, job, spec)


@bp.post("/v1/completions")
def create_completion():
    req = parse_body(CreateCompletionRequest)
    return generation.respond(prepare(req), stream=req.stream, include_usage=req.include_usage)
