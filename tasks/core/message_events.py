"""A job's events as an Anthropic message and its stream events, and Ferry's errors in
Anthropic's shape.

One ``MessageBuilder`` per request: ``feed`` each core event (``config.contract.events``) and
it returns the stream events it makes (``message_start`` and a ``ping`` on ``Started``, then
``content_block_start`` / ``_delta`` / ``_stop`` per text or tool_use block, then
``message_delta`` and ``message_stop`` on ``Done``); the non-streamed answer is the same
builder's ``message()`` at the end, so both agree.

Usage as Anthropic counts it: ``input_tokens`` are the prompt tokens evaluated, apart from
``cache_read_input_tokens`` (those the backend's prefix reuse found cached); their sum is the
prompt's length, what ``count_tokens`` reports. ``message_start`` cannot know the cached part
yet and counts the whole prompt; ``message_delta`` carries the final counts, which the
client's accumulator takes over.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from config.contract import events
from config.errors import FerryError

# Anthropic's error type for each status; any other 4xx is an invalid_request_error, any
# other 5xx an api_error.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               403: "permission_error", 404: "not_found_error", 413: "request_too_large",
               429: "rate_limit_error", 500: "api_error", 529: "overloaded_error"}

_STOP_REASONS = {"length": "max_tokens", "tool_calls": "tool_use"}


def error_status(err: FerryError) -> int:
    # Ferry's 503 (no live worker, Redis away) is Anthropic's 529: come back later.
    return 529 if err.status == 503 else err.status


def error_body(err: FerryError, request_id: str | None = None) -> dict[str, Any]:
    status = error_status(err)
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    body: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": err.message}}
    if request_id is not None:
        body["request_id"] = request_id
    return body


def usage(done: events.Done) -> dict[str, int]:
    return {"input_tokens": done.prompt_tokens - done.cached_tokens,
            "output_tokens": done.completion_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": done.cached_tokens}


class MessageBuilder:
    def __init__(self, message_id: str, model: str):
        self.id, self.model = message_id, model
        self.content: list[dict[str, Any]] = []
        self._json: dict[int, str] = {}  # a tool_use block's index -> its input's JSON text
        self._calls: dict[int, int] = {}  # the core's call number -> block index
        self._open: int | None = None
        self.stop_reason: str | None = None
        self.stop_sequence: str | None = None
        self.usage: dict[str, int] = {"input_tokens": 0, "output_tokens": 0,
                                      "cache_creation_input_tokens": 0,
                                      "cache_read_input_tokens": 0}

    def message(self) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": [dict(b) for b in self.content], "stop_reason": self.stop_reason,
                "stop_sequence": self.stop_sequence, "usage": dict(self.usage)}

    def feed(self, ev: events.Event) -> list[dict[str, Any]]:
        if isinstance(ev, events.Started):
            self.usage["input_tokens"] = ev.prompt_tokens
            return [{"type": "message_start", "message": self.message()}, {"type": "ping"}]
        if isinstance(ev, events.Delta) and ev.text and not ev.prompt:
            return self._text(ev.text)
        if isinstance(ev, events.ToolCallDelta):
            return self._call(ev)
        if isinstance(ev, events.Finish):
            self._finish(ev)
            return self._close()
        if isinstance(ev, events.Done):
            self.usage = usage(ev)
            return [{"type": "message_delta",
                     "delta": {"stop_reason": self.stop_reason,
                               "stop_sequence": self.stop_sequence},
                     "usage": dict(self.usage)},
                    {"type": "message_stop"}]
        return []

    def fail(self, err: FerryError) -> dict[str, Any]:
        return error_body(err)

    def _finish(self, ev: events.Finish) -> None:
        self.stop_reason = _STOP_REASONS.get(ev.finish_reason, "end_turn")
        if ev.stop_sequence is not None:
            self.stop_reason, self.stop_sequence = "stop_sequence", ev.stop_sequence

    def _start(self, block: dict[str, Any]) -> list[dict[str, Any]]:
        out = self._close()
        self.content.append(block)
        self._open = len(self.content) - 1
        return out + [{"type": "content_block_start", "index": self._open,
                       "content_block": dict(block)}]

    def _close(self) -> list[dict[str, Any]]:
        if self._open is None:
            return []
        index, self._open = self._open, None
        if index in self._json:
            self.content[index]["input"] = _input(self._json[index])
        return [{"type": "content_block_stop", "index": index}]

    def _text(self, text: str) -> list[dict[str, Any]]:
        out = []
        if self._open is None or self.content[self._open]["type"] != "text":
            out = self._start({"type": "text", "text": ""})
        self.content[self._open]["text"] += text
        return out + [{"type": "content_block_delta", "index": self._open,
                       "delta": {"type": "text_delta", "text": text}}]

    def _call(self, ev: events.ToolCallDelta) -> list[dict[str, Any]]:
        out = []
        if ev.call not in self._calls:
            out = self._start({"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}",
                               "name": ev.name or "", "input": {}})
            self._calls[ev.call] = self._open
            self._json[self._open] = ""
        index = self._calls[ev.call]
        if ev.arguments:
            self._json[index] += ev.arguments
            out.append({"type": "content_block_delta", "index": index,
                        "delta": {"type": "input_json_delta", "partial_json": ev.arguments}})
        return out


def _input(text: str) -> dict[str, Any]:
    """A tool_use block's input: its JSON; {} where it was cut off (stop_reason
    max_tokens) and is no JSON object."""
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
