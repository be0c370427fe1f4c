"""POST /v1/chat/completions."""

from __future__ import annotations

import logging
import uuid

from flask import Blueprint, current_app

from config.errors import InvalidRequest
from models import events
from models.job import GenerationJob
from web import generation
from web.content import check_image_parts
from web.results import ChoiceResult
from web.schemas.chat import CreateChatCompletionRequest
from web.validation import parse_body

bp = Blueprint("chat", __name__)
log = logging.getLogger(__name__)


class ChatShape(generation.ShapeBase):
    object = "chat.completion.chunk"

    def __init__(self, job_id: str, model: str, logprobs: bool):
        super().__init__(job_id, model)
        self.logprobs = logprobs

    def chunk(self, index: int, ev: events.Event | None) -> dict:
        logprobs = None
        if ev is None:
            delta, reason = {"role": "assistant", "content": ""}, None
        elif isinstance(ev, events.Delta):
            delta, reason = {"content": ev.text}, None
            logprobs = self._logprobs(ev.logprobs or [])
        elif isinstance(ev, events.ToolCallDelta):
            delta, reason = {"tool_calls": [tool_call_delta(ev)]}, None
        else:
            delta, reason = {}, generation.public_reason(ev.finish_reason)
        return self._chunk([{"index": index, "delta": delta, "logprobs": logprobs,
                             "finish_reason": reason}])

    def _logprobs(self, entries: list) -> dict | None:
        return {"content": entries, "refusal": None} if self.logprobs else None

    def response(self, choices: dict[int, ChoiceResult], usage: dict) -> dict:
        out = []
        for i in sorted(choices):
            c = choices[i]
            message = {"role": "assistant", "content": c.text or (None if c.tool_calls else ""),
                       "refusal": None}
            if c.tool_calls:
                message["tool_calls"] = c.tool_calls
            out.append({"index": i, "message": message, "logprobs": self._logprobs(c.logprobs),
                        "finish_reason": c.finish_reason or "stop"})
        return {**self.base, "object": "chat.completion", "choices": out, "usage": usage}


def tool_call_delta(ev: events.ToolCallDelta) -> dict:
    """OpenAI's streaming shape: id, type and name first, then argument fragments."""
    if ev.id is not None:
        return {"index": ev.call, "id": ev.id, "type": "function",
                "function": {"name": ev.name, "arguments": ev.arguments}}
    return {"index": ev.call, "function": {"arguments": ev.arguments}}


@bp.post("/v1/chat/completions")
def create_chat_completion():
    req = parse_body(CreateChatCompletionRequest)
    entry = current_app.extensions["ferry"].registry.resolve(req.model)
    if entry.kind != "chat":
        raise InvalidRequest(f"The model '{req.model}' is an embedding model; it cannot chat.",
                             param="model")
    req.check()
    settings = current_app.extensions["ferry"].settings
    check_image_parts(req.messages, settings)
    job = GenerationJob(
        id=f"chatcmpl-{uuid.uuid4().hex}", model=entry.name,
        messages=[m.for_template(i) for i, m in enumerate(req.messages)],
        max_tokens=req.token_limit, stop=req.stops, n=req.n, sampling=req.sampling(),
        top_logprobs=req.top_logprobs_wanted, response_format=req.job_response_format(),
        tools=req.job_tools(), tool_choice=req.job_tool_choice(),
        deadline=generation.now() + settings.queue_timeout,
    )
    if req.user is not None:
        log.info("request %s from user %r", job.id, req.user)
    sub = generation.start(entry, job)
    shape = ChatShape(job.id, entry.name, logprobs=bool(req.logprobs))
    if req.stream:
        return generation.stream(sub, shape, req.include_usage)
    return generation.collect(sub, shape)
