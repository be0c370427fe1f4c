"""Chat completions: the job a ``CreateChatCompletionRequest`` asks for."""

from __future__ import annotations

import logging
import uuid

from config.errors import InvalidRequest
from config.contract.job import GenerationJob
from tasks.jobs.shapes import ResponseSpec
from tasks.core import bounds, generation
from tasks.core.content import check_image_parts, job_images
from tasks.core.offload import off_hub
from tasks.core.schemas.chat import CreateChatCompletionRequest
from tasks.core.services import Ferry

log = logging.getLogger(__name__)

# The request this endpoint takes.
Request = CreateChatCompletionRequest


def prepare(req: CreateChatCompletionRequest, ferry: Ferry) -> generation.Prepared:
    """The job a chat request asks for (the one place it is built, for the endpoint, for
    /v1/jobs and for batch lines)."""
    entry = ferry.registry.resolve(req.model)
    if entry.kind != "chat":
        raise InvalidRequest(f"The model '{req.model}' is an embedding model; it cannot chat.",
                             param="model")
    req.check()
    bounds.check_budget(entry, req.n, req.token_limit)
    if req.has_schemas:  # a request without any costs no hand-off to the thread (~1.5%)
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



def prepare_all(req: CreateChatCompletionRequest, ferry: Ferry) -> list[generation.Prepared]:
    return [prepare(req, ferry)]
