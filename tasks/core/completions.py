"""Text completions (the legacy endpoint): the jobs a ``CreateCompletionRequest`` asks for."""

from __future__ import annotations

import logging
import uuid

from config.errors import InvalidRequest
from config.contract.job import GenerationJob
from tasks.jobs.shapes import ResponseSpec
from tasks.core import bounds, generation
from tasks.core.schemas.completions import CreateCompletionRequest
from tasks.core.services import Ferry

log = logging.getLogger(__name__)

# The request this endpoint takes.
Request = CreateCompletionRequest


def prepare_all(req: CreateCompletionRequest, ferry: Ferry) -> list[generation.Prepared]:
    """One job per prompt (so prompts run in parallel on free workers), ids
    ``<request id>-<p>`` when there are several."""
    entry = ferry.registry.resolve(req.model)
    if entry.kind != "chat":
        raise InvalidRequest(f"The model '{req.model}' is an embedding model; it cannot "
                             "complete text.", param="model")
    req.check()
    settings = ferry.settings
    prompts = req.prompts()
    bounds.check_prompts(settings, len(prompts))
    bounds.check_budget(entry, req.candidates, req.max_tokens)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    # best_of ranks candidates by their log probabilities, so it asks for them.
    top = req.logprobs if req.logprobs is not None else (0 if req.candidates > req.n else None)
    spec = ResponseSpec(endpoint="/v1/completions", logprobs=req.logprobs is not None,
                        n=req.n, candidates=req.candidates)
    if req.user is not None:
        log.info("request %s from user %r", request_id, req.user)
    return [generation.Prepared(entry, GenerationJob(
        id=request_id if len(prompts) == 1 else f"{request_id}-{p}", model=entry.name,
        prompt=prompt, suffix=req.suffix, echo=req.echo, max_tokens=req.max_tokens,
        stop=req.stops, n=req.candidates, sampling=req.sampling(), top_logprobs=top,
    ), spec) for p, prompt in enumerate(prompts)]


def prepare(req: CreateCompletionRequest, ferry: Ferry) -> generation.Prepared:
    """For /v1/jobs: a job holds one prompt."""
    prepared = prepare_all(req, ferry)
    if len(prepared) != 1:
        raise InvalidRequest("A job takes one prompt; submit one job per prompt.",
                             param="prompt")
    return prepared[0]

