"""POST /v1/completions (the legacy text completion endpoint)."""

from __future__ import annotations

import uuid

from flask import Blueprint, current_app

from config.errors import InvalidRequest
from models import events
from models.job import GenerationJob
from web import generation
from web.schemas.completions import CreateCompletionRequest
from web.validation import parse_body

bp = Blueprint("completions", __name__)


class CompletionShape(generation.ShapeBase):
    object = "text_completion"

    def __init__(self, job_id: str, model: str, echo: str | None):
        super().__init__(job_id, model)
        self.echo = echo

    def chunk(self, index: int, ev: events.Event | None) -> dict | None:
        if ev is None:
            if not self.echo:
                return None
            text, reason = self.echo, None
        elif isinstance(ev, events.Delta):
            text, reason = ev.text, None
        else:
            text, reason = "", generation.public_reason(ev.finish_reason)
        return self._chunk([{"text": text, "index": index, "logprobs": None,
                             "finish_reason": reason}])

    def response(self, texts: dict[int, str], finishes: dict[int, str], usage: dict) -> dict:
        choices = [{"text": (self.echo or "") + texts.get(i, ""), "index": i, "logprobs": None,
                    "finish_reason": finishes.get(i, "stop")} for i in sorted(finishes)]
        return {**self.base, "choices": choices, "usage": usage}


@bp.post("/v1/completions")
def create_completion():
    req = parse_body(CreateCompletionRequest)
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
        deadline=generation.now() + current_app.extensions["ferry"].settings.queue_timeout,
    )
    sub = generation.start(entry, job)
    shape = CompletionShape(job.id, entry.name, prompt if req.echo else None)
    if req.stream:
        return generation.stream(sub, shape, req.include_usage)
    return generation.collect(sub, shape)
