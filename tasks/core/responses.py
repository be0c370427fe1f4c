"""The Responses dialect: a ``CreateResponseRequest`` translated into a chat request and
built by ``tasks.core.chat.prepare`` (one place builds chat jobs), its events shaped by
``tasks.core.response_events``, and the turn stored (``tasks.core.responses_store``).

``previous_response_id``: the stored conversation (earlier input and output, as chat
messages) is the new prompt's prefix, so the CPU backend's prompt prefix reuse evaluates
only the new turn (``usage.input_tokens_details.cached_tokens`` shows it).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass
from typing import Any

from config.contract import events
from config.errors import FerryError, InvalidRequest
from config.tenants import Tenant
from tasks.core import chat, generation, responses_background as background
from tasks.core.response_events import ResponseBuilder
from tasks.core.responses_store import StoredResponse, store_of
from tasks.core.schemas.chat import CreateChatCompletionRequest
from tasks.core.schemas.responses import (CreateResponseRequest, FunctionCallItem,
                                          FunctionCallOutputItem, InputImage, MessageItem,
                                          TextFormatJSONObject, TextFormatJSONSchema)
from tasks.core.services import Ferry

Request = CreateResponseRequest


@dataclass
class Turn:
    """A prepared Responses request: the chat job, what it continues, and the response
    object's fixed fields."""

    req: CreateResponseRequest
    prepared: generation.Prepared
    # The chat messages of the conversation so far and of this input (no instructions).
    history: list[dict[str, Any]]
    input_items: list[dict[str, Any]]
    base: dict[str, Any]

    @property
    def id(self) -> str:
        return self.prepared.job.id

    def builder(self) -> ResponseBuilder:
        return ResponseBuilder(self.base)

    def stored(self, builder: ResponseBuilder, owner: str) -> StoredResponse:
        return StoredResponse(owner=owner, response=builder.response(),
                              input_items=self.input_items,
                              messages=self.history + builder.messages())


def prepare(req: CreateResponseRequest, ferry: Ferry, tenant: Tenant) -> Turn:
    req.check()
    history: list[dict[str, Any]] = []
    if req.previous_response_id is not None:
        previous = background.refresh(ferry, store_of(ferry).get(
            req.previous_response_id, owner=tenant.owner, param="previous_response_id"))
        if background.pending(previous):
            raise InvalidRequest(f"Response '{req.previous_response_id}' is still "
                                 f"{previous.response['status']}; continue it once it ended.",
                                 param="previous_response_id")
        history = previous.messages
    history = history + input_messages(req)
    system = [{"role": "system", "content": req.instructions}] if req.instructions else []
    tools = req.function_tools()
    named = req.named_choice()
    chat_req = CreateChatCompletionRequest.model_validate({
        "model": req.model, "messages": system + history,
        "max_completion_tokens": req.max_output_tokens, "temperature": req.temperature,
        "top_p": req.top_p, "seed": req.seed, "user": req.user,
        "tools": [{"type": "function", "function": t.model_dump(exclude={"type"})}
                  for t in tools] or None,
        "tool_choice": ({"type": "function", "function": {"name": named}} if named
                        else req.tool_choice),
        "response_format": _response_format(req)})
    prepared = chat.prepare(chat_req, ferry)
    response_id = f"resp_{uuid.uuid4().hex}"
    prepared = dataclasses.replace(prepared,
                                   job=prepared.job.model_copy(update={"id": response_id}))
    return Turn(req, prepared, history, _input_items(req), _base(req, response_id, tools,
                                                                  prepared.entry.name))


def begin(ferry: Ferry, turn: Turn, caller: generation.Caller,
          streamed: bool = True) -> tuple[ResponseBuilder, generation.Streaming]:
    """Start the turn's job and wait for the worker to start it (so that errors found while
    preparing it, such as the context length, fail the request itself); its Responses
    stream events then follow, until the final one, or
    ``response.failed``. A stored turn is stored before its final event is given out, so a
    client that has it can retrieve the response."""
    builder = turn.builder()
    feed = _Feed(ferry, turn, builder, caller.tenant.owner)
    return builder, generation.stream(ferry, turn.prepared, caller, feed, streamed=streamed)


class _Feed:
    """The Responses stream's events (``generation.Feed``); the turn is kept (when
    stored) at its end."""

    def __init__(self, ferry: Ferry, turn: Turn, builder: ResponseBuilder, owner: str):
        self.ferry, self.turn, self.builder, self.owner = ferry, turn, builder, owner

    def opening(self) -> list[dict[str, Any]]:
        return self.builder.opening()

    def feed(self, ev: events.Event) -> list[dict[str, Any]]:
        out = self.builder.feed(ev)
        if isinstance(ev, events.Done):
            _keep(self.ferry, self.turn, self.builder, self.owner)
        return out

    def fail(self, err: FerryError) -> list[dict[str, Any]]:
        out = self.builder.fail(err)
        _keep(self.ferry, self.turn, self.builder, self.owner)
        return out


def _keep(ferry: Ferry, turn: Turn, builder: ResponseBuilder, owner: str) -> None:
    if turn.req.store:
        store_of(ferry).put(turn.stored(builder, owner))


def submit_background(ferry: Ferry, turn: Turn, caller: generation.Caller) -> dict[str, Any]:
    """``background: true``: record and enqueue the turn's job (nobody follows it; see
    ``tasks.core.responses_background``), store the response as ``queued``; its object."""
    generation.submit(ferry, turn.prepared, caller=caller,
                      deadline=time.time() + ferry.settings.job_deadline)
    stored = StoredResponse(owner=caller.tenant.owner,
                            response=turn.builder().response("queued"),
                            input_items=turn.input_items, messages=turn.history)
    store_of(ferry).put(stored)
    return stored.response


def collect(ferry: Ferry, turn: Turn, caller: generation.Caller) -> dict[str, Any]:
    """The turn run to its end: the response object (a failure is raised)."""
    builder, streaming = begin(ferry, turn, caller, streamed=False)
    streaming.to_end()
    return builder.response()


def answer(req: CreateResponseRequest, ferry: Ferry,
           caller: generation.Caller) -> tuple[str, dict[str, Any]]:
    """A batch line (``tasks.core.endpoints.answer``): the response id and object."""
    for name in ("stream", "background"):
        if getattr(req, name):
            raise InvalidRequest(f"A batch line cannot ask for {name}.", param=name)
    turn = prepare(req, ferry, caller.tenant)
    return turn.id, collect(ferry, turn, caller)


def input_messages(req: CreateResponseRequest) -> list[dict[str, Any]]:
    """The input items as chat messages; consecutive function calls are one assistant
    message (a parallel call)."""
    out: list[dict[str, Any]] = []
    for item in req.items:
        if isinstance(item, MessageItem):
            out.append({"role": item.role, "content": _content(item)})
        elif isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls"):
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text})
    return out


def _content(item: MessageItem) -> str | list[dict[str, Any]]:
    if isinstance(item.content, str):
        return item.content
    return [{"type": "image_url", "image_url": {"url": p.image_url, "detail": p.detail}}
            if isinstance(p, InputImage) else {"type": "text", "text": p.text}
            for p in item.content]


def _response_format(req: CreateResponseRequest) -> dict[str, Any] | None:
    fmt = req.text.format if req.text else None
    if isinstance(fmt, TextFormatJSONObject):
        return {"type": "json_object"}
    if isinstance(fmt, TextFormatJSONSchema):
        return {"type": "json_schema",
                "json_schema": {"name": fmt.name, "schema": fmt.json_schema,
                                "strict": fmt.strict, "description": fmt.description}}
    return None


def _input_items(req: CreateResponseRequest) -> list[dict[str, Any]]:
    out = []
    for item in req.items:
        data = item.model_dump(exclude_none=True)
        if isinstance(item, MessageItem):
            content = item.content
            data["content"] = ([{"type": "input_text", "text": content}]
                               if isinstance(content, str) else data["content"])
            data["status"] = "completed"
        data["id"] = item.id or f"{'msg' if isinstance(item, MessageItem) else 'fc'}_" \
                                f"{uuid.uuid4().hex}"
        out.append(data)
    return out


def _base(req: CreateResponseRequest, response_id: str, tools, model: str) -> dict[str, Any]:
    fmt = req.text.format if req.text and req.text.format else None
    return {
        "id": response_id, "object": "response", "created_at": int(time.time()),
        "model": model, "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens, "metadata": req.metadata or {},
        "parallel_tool_calls": req.parallel_tool_calls is not False,
        "previous_response_id": req.previous_response_id, "reasoning": None,
        "store": req.store, "background": req.background,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "text": {"format": fmt.model_dump(by_alias=True) if fmt else {"type": "text"}},
        "tool_choice": req.tool_choice or "auto",
        "tools": [t.model_dump() for t in tools], "truncation": req.truncation or "disabled",
        "user": req.user,
    }
