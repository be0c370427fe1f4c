"""The Messages dialect (Anthropic's ``/v1/messages``): a ``CreateMessageRequest`` translated
into a chat request and built by ``tasks.core.chat.prepare`` (one place builds chat jobs:
images, tools and their grammar, budgets), its events shaped by ``tasks.core.message_events``.

``count_tokens`` builds the same chat job from the same fields and sends it with
``count_only``: the worker renders and tokenizes it exactly as for generating (only it holds
the model's template and tokenizer) and answers with the prompt's length, without decoding.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from dataclasses import dataclass
from typing import Any

from config.contract import events
from config.errors import FerryError, InvalidRequest
from tasks.core import chat, generation
from tasks.core.message_events import MessageBuilder
from tasks.core.schemas.chat import CreateChatCompletionRequest
from tasks.core.schemas.messages import (ChoiceAny, ChoiceNone, ChoiceTool,
                                         CountMessageTokensRequest, CreateMessageRequest,
                                         ImageBlock, MessageInput, TextBlock, ToolResultBlock,
                                         ToolUseBlock)
from tasks.core.services import Ferry
from tasks.core.validation import validate

Request = CreateMessageRequest


@dataclass
class Turn:
    """A prepared Messages request: the chat job and the message's fixed fields."""

    req: CreateMessageRequest
    prepared: generation.Prepared

    @property
    def id(self) -> str:
        return self.prepared.job.id

    def builder(self) -> MessageBuilder:
        return MessageBuilder(self.id, self.prepared.entry.name)


def chat_request(req: MessageInput) -> CreateChatCompletionRequest:
    """The chat request the Messages request stands for (sampling only for a create)."""
    req.check()
    system = req.system_text
    tools = req.client_tools()
    body: dict[str, Any] = {
        "model": req.model,
        "messages": ([{"role": "system", "content": system}] if system else [])
                    + chat_messages(req),
        "tools": [{"type": "function", "function": {
            "name": t.name, "description": t.description, "parameters": t.input_schema}}
            for t in tools] or None,
        "tool_choice": _tool_choice(req) if tools or req.tool_choice else None,
    }
    fmt = req.output_config.format if req.output_config else None
    if fmt is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "output", "schema": fmt.json_schema, "strict": True}}
    if isinstance(req, CreateMessageRequest):
        # No max_completion_tokens: the chat request asks for "up to the rest of the
        # context", and ``prepare`` caps that at max_tokens (see ``fit_max_tokens``).
        body.update(temperature=req.temperature,
                    top_p=req.top_p, stop=req.stop_sequences or None,
                    user=req.metadata.user_id if req.metadata else None)
    return validate(CreateChatCompletionRequest, body)


def _tool_choice(req: MessageInput) -> Any:
    choice = req.tool_choice
    if isinstance(choice, ChoiceTool):
        return {"type": "function", "function": {"name": choice.name}}
    if isinstance(choice, ChoiceAny):
        return "required"
    if isinstance(choice, ChoiceNone):
        return "none"
    return "auto"


def prepare(req: CreateMessageRequest, ferry: Ferry) -> Turn:
    """The turn's chat job. ``max_tokens`` is an upper bound, as llama.cpp's server and
    Ollama take it: coding agents send 32000 or 64000 whatever the model, so the worker
    generates at most what a chat request without max_tokens gets (the rest of the context,
    at most max_job_tokens), and a reply cut there ends with stop_reason max_tokens. A
    prompt that leaves no room at all is still the worker's 400."""
    prepared = chat.prepare(chat_request(req), ferry)
    job = prepared.job
    if req.top_k:
        job = job.model_copy(update={"sampling": job.sampling.model_copy(
            update={"top_k": req.top_k})})
    job = job.model_copy(update={"id": f"msg_{uuid.uuid4().hex}", "max_tokens": req.max_tokens,
                                 "fit_max_tokens": True,
                                 "continue_final_message": req.prefill})
    return Turn(req, dataclasses.replace(prepared, job=job))


def prepare_count(req: CountMessageTokensRequest, ferry: Ferry) -> generation.Prepared:
    prepared = chat.prepare(chat_request(req), ferry)
    return dataclasses.replace(prepared, job=prepared.job.model_copy(
        update={"id": f"msg_count_{uuid.uuid4().hex}", "count_only": True,
                "continue_final_message": req.prefill}))


def count_tokens(ferry: Ferry, req: CountMessageTokensRequest,
                 caller: generation.Caller) -> tuple[str, dict[str, int]]:
    """The count's job id and ``{"input_tokens": n}``: what a create with the same body
    reports as its input (``input_tokens + cache_read_input_tokens``: Anthropic counts a
    cached prefix apart)."""
    run = generation.start(ferry, [prepare_count(req, ferry)], caller, streamed=False)
    try:
        for ev in run.events():
            if isinstance(ev, events.Done):
                return run.id, {"input_tokens": ev.prompt_tokens}
    finally:
        run.close()
    raise InvalidRequest("The count ended early.")  # pragma: no cover - Done always ends it


def begin(ferry: Ferry, turn: Turn, caller: generation.Caller,
          streamed: bool = True) -> tuple[MessageBuilder, generation.Streaming]:
    """Start the turn's job and wait for the worker to start it (so that errors found while
    preparing it, such as the context length, fail the request itself); its Messages stream
    events then follow, until ``message_stop``, or an ``error``."""
    builder = turn.builder()
    return builder, generation.stream(ferry, turn.prepared, caller, _Feed(builder),
                                      streamed=streamed)


class _Feed:
    """The Messages stream's events (``generation.Feed``)."""

    def __init__(self, builder: MessageBuilder):
        self.feed = builder.feed
        self._fail = builder.fail

    def opening(self) -> list[dict[str, Any]]:
        return []

    def fail(self, err: FerryError) -> list[dict[str, Any]]:
        return [self._fail(err)]


def collect(ferry: Ferry, turn: Turn, caller: generation.Caller) -> dict[str, Any]:
    """The turn run to its end: the message object (a failure is raised)."""
    builder, streaming = begin(ferry, turn, caller, streamed=False)
    streaming.to_end()
    return builder.message()


def answer(req: CreateMessageRequest, ferry: Ferry,
           caller: generation.Caller) -> tuple[str, dict[str, Any]]:
    """A batch line (``tasks.core.endpoints.answer``): the message id and object."""
    if req.stream:
        raise InvalidRequest("A batch line cannot ask for stream.", param="stream")
    turn = prepare(req, ferry)
    return turn.id, collect(ferry, turn, caller)


# -- messages --------------------------------------------------------------------------------


def chat_messages(req: MessageInput) -> list[dict[str, Any]]:
    """Anthropic's turns as chat messages: a user turn's ``tool_result`` blocks are tool
    messages (before the rest of the turn, where Anthropic puts them), an assistant turn's
    ``tool_use`` blocks its tool calls."""
    out: list[dict[str, Any]] = []
    for m in req.messages:
        if m.role == "assistant":
            out.append(_assistant(m.blocks))
            continue
        rest = []
        for block in m.blocks:
            if isinstance(block, ToolResultBlock):
                out.append({"role": "tool", "tool_call_id": block.tool_use_id,
                            "content": _result_content(block)})
            elif isinstance(block, ToolUseBlock):
                raise InvalidRequest("tool_use blocks belong in assistant messages.",
                                     param="messages")
            else:
                rest.append(block)
        if rest:
            out.append({"role": "user", "content": _parts(rest)})
    return out


def _assistant(blocks) -> dict[str, Any]:
    text = "".join(b.text for b in blocks if isinstance(b, TextBlock))
    calls = [{"id": b.id, "type": "function",
              "function": {"name": b.name, "arguments": json.dumps(b.input)}}
             for b in blocks if isinstance(b, ToolUseBlock)]
    if any(isinstance(b, (ImageBlock, ToolResultBlock)) for b in blocks):
        raise InvalidRequest("Assistant messages hold text and tool_use blocks only.",
                             param="messages")
    return {"role": "assistant", "content": text or None, **({"tool_calls": calls} if calls
                                                              else {})}


def _parts(blocks) -> str | list[dict[str, Any]]:
    if all(isinstance(b, TextBlock) for b in blocks):
        return "".join(b.text for b in blocks)
    return [{"type": "image_url", "image_url": {"url": b.url}} if isinstance(b, ImageBlock)
            else {"type": "text", "text": b.text} for b in blocks]


def _result_content(block: ToolResultBlock) -> str | list[dict[str, Any]]:
    content = block.content
    parts = _parts(content) if isinstance(content, list) else content or ""
    if block.is_error:  # the model is told, as Anthropic's models are
        return "Error: " + parts if isinstance(parts, str) else \
            [{"type": "text", "text": "Error: "}, *parts]
    return parts
