"""POST /v1/completions (the legacy text completion endpoint)."""

from __future__ import annotations

import logging
import uuid

from flask import Blueprint, current_app

from config.errors import InvalidRequest
from models import events
from models.events import TokenLogprob
from models.job import GenerationJob
from web import generation
from web.results import ChoiceResult
from web.schemas.completions import CreateCompletionRequest
from web.validation import parse_body

bp = Blueprint("completions", __name__)
log = logging.getLogger(__name__)


def legacy_logprobs(entries: list[TokenLogprob], offset: int) -> dict:
    """OpenAI's completions shape; ``offset``: where the first token starts in the text."""
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        out["tokens"].append(e["token"])
        out["token_logprobs"].append(e["logprob"])
        out["top_logprobs"].append(
            None if e["logprob"] is None else {t["token"]: t["logprob"] for t in e["top_logprobs"]})
        out["text_offset"].append(offset)
        offset += len(e["token"])
    return out


class CompletionShape(generation.ShapeBase):
    object = "text_completion"

    def __init__(self, job_id: str, model: str, req: CreateCompletionRequest):
        super().__init__(job_id, model)
        self.logprobs = req.logprobs is not None
        self.n, self.candidates = req.n, req.candidates
        self._offsets: dict[int, int] = {}

    def chunk(self, index: int, ev: events.Event | None) -> dict | None:
        if ev is None:
            return None
        logprobs = None
        if isinstance(ev, events.Delta):
            text, reason = ev.text, None
            if self.logprobs:
                logprobs = legacy_logprobs(ev.logprobs or [], self._offsets.get(index, 0))
                self._offsets[index] = self._offsets.get(index, 0) + \
                    sum(len(t) for t in logprobs["tokens"])
        elif isinstance(ev, events.Finish):
            text, reason = "", generation.public_reason(ev.finish_reason)
        else:
            return None
        return self._chunk([{"text": text, "index": index, "logprobs": logprobs,
                             "finish_reason": reason}])

    def response(self, choices: dict[int, ChoiceResult], usage: dict) -> dict:
        out = [{"text": c.text, "index": i,
                "logprobs": legacy_logprobs(c.logprobs, 0) if self.logprobs else None,
                "finish_reason": c.finish_reason or "stop"}
               for i, c in enumerate(self._best(choices))]
        return {**self.base, "choices": out, "usage": usage}

    def _best(self, choices: dict[int, ChoiceResult]) -> list[ChoiceResult]:
        """Per prompt, the ``n`` candidates of highest mean log probability (best_of), in
        that order; without best_of, every choice in index order."""
        if self.candidates == self.n:
            return [choices[i] for i in sorted(choices)]
        best = []
        for first in range(0, len(choices), self.candidates):
            group = [choices[i] for i in range(first, first + self.candidates) if i in choices]
            best.extend(sorted(group, key=lambda c: c.mean_logprob, reverse=True)[:self.n])
        return best


@bp.post("/v1/completions")
def create_completion():
    req = parse_body(CreateCompletionRequest)
    entry = current_app.extensions["ferry"].registry.resolve(req.model)
    if entry.kind != "chat":
        raise InvalidRequest(f"The model '{req.model}' is an embedding model; it cannot "
                             "complete text.", param="model")
    req.check()
    request_id = f"cmpl-{uuid.uuid4().hex}"
    prompts = req.prompts()
    # best_of ranks candidates by their log probabilities, so it asks for them.
    top = req.logprobs if req.logprobs is not None else (0 if req.candidates > req.n else None)
    deadline = generation.now() + current_app.extensions["ferry"].settings.queue_timeout
    jobs = [GenerationJob(
        id=request_id if len(prompts) == 1 else f"{request_id}-{p}", model=entry.name,
        prompt=prompt, suffix=req.suffix, echo=req.echo, max_tokens=req.max_tokens,
        stop=req.stops, n=req.candidates, sampling=req.sampling(), top_logprobs=top,
        deadline=deadline,
    ) for p, prompt in enumerate(prompts)]
    if req.user is not None:
        log.info("request %s from user %r", request_id, req.user)
    sub = generation.start_all(request_id, entry, jobs, req.candidates)
    shape = CompletionShape(request_id, entry.name, req)
    if req.stream:
        return generation.stream(sub, shape, req.include_usage)
    return generation.collect(sub, shape)
