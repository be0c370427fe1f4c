"""POST /v1/chat/completions."""

from __future__ import annotations

import uuid

from flask import Blueprint, current_app

from config.errors import InvalidRequest
from models import events
from models.job import GenerationJob
from web import generation
from web.schemas.chat import CreateChatCompletionRequest
from web.validation import parse_body

bp = Blueprint("chat", __name__)


class ChatShape(generation.ShapeBase):
    object = "chat.completion.chunk"


    def chunk(self, index: int, ev: events.Event | None) -> dict:
        if ev is None:
            delta, reason = {"role": "assistant", "content": ""}, None
        elif isinstance(ev, events.Delta):
            delta, reason = {"content": ev.text}, None
        else:
            delta, reason = {}, generation.public_reason(ev.finish_reason)
        return self._chunk([{"index": index, "delta": delta, "logprobs": None,
                             "finish_reason": reason}])

    def response(self, texts: dict[int, str], finishes: dict[int, str], usage: dict) -> dict:
        choices = [{"index": i,
                    "message": {"role": "assistant", "content": texts.get(i, ""), "refusal": None},
                    "logprobs": None, "finish_reason": finishes.get(i, "stop")}
                   for i in sorted(finishes)]
        return {**self.base, "object": "chat.completion", "choices": choices, "usage": usage}


@bp.post("/v1/chat/completions")
def create_chat_completion():
    req = parse_body(CreateChatCompletionRequest)
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
        deadline=generation.now() + current_app.extensions["ferry"].settings.queue_timeout,
    )
    sub = generation.start(entry, job)
    shape = ChatShape(job.id, entry.name)
    if req.stream:
        return generation.stream(sub, shape, req.include_usage)
    return generation.collect(sub, shape)
