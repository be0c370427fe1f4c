"""A job's events as a Responses object and its stream events.

One ``ResponseBuilder`` per request: ``feed`` each core event (``config.contract.events``)
and it returns the Responses stream events it makes (``response.output_item.added``, the
text and argument deltas, the ``...done`` events), numbered by ``sequence_number``; the
non-streamed answer is the same builder's ``response()`` at the end, so both agree.

A reply is one choice: a message with one ``output_text`` part, or function calls, each its
own output item. A choice cut off by ``max_output_tokens`` leaves the response
``incomplete`` (``incomplete_details.reason = "max_output_tokens"``).
"""

from __future__ import annotations

from typing import Any

from config.contract import events
from config.errors import FerryError


def usage(done: events.Done) -> dict[str, Any]:
    return {"input_tokens": done.prompt_tokens,
            "input_tokens_details": {"cached_tokens": done.cached_tokens},
            "output_tokens": done.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def error_of(err: FerryError) -> dict[str, str]:
    # Response.error.code is one of OpenAI's few codes; the message keeps Ferry's.
    code = ("server_error" if err.status >= 500 else
            "rate_limit_exceeded" if err.status == 429 else "invalid_prompt")
    return {"code": code, "message": err.message}


class ResponseBuilder:
    def __init__(self, base: dict[str, Any]):
        self.base = base
        self.seq = 0
        self.output: list[dict[str, Any]] = []
        self.message: dict[str, Any] | None = None
        self.calls: dict[int, dict[str, Any]] = {}
        self.finish: str | None = None
        self.usage: dict[str, Any] | None = None
        self.error: dict[str, str] | None = None

    # -- the response object --------------------------------------------------------------

    @property
    def status(self) -> str:
        if self.error is not None:
            return "failed"
        if self.finish == "cancelled":
            return "cancelled"
        if self.finish == "length":
            return "incomplete"
        return "completed" if self.usage is not None else "in_progress"

    def response(self, status: str | None = None) -> dict[str, Any]:
        status = status or self.status
        return {**self.base, "status": status, "error": self.error,
                "incomplete_details": ({"reason": "max_output_tokens"}
                                       if status == "incomplete" else None),
                "output": [dict(item) for item in self.output], "usage": self.usage}

    @property
    def text(self) -> str:
        return self.message["content"][0]["text"] if self.message else ""

    def messages(self) -> list[dict[str, Any]]:
        """The output as chat messages (the prefix of a turn that continues it)."""
        out: list[dict[str, Any]] = []
        if self.message is not None:
            out.append({"role": "assistant", "content": self.text})
        calls = [{"id": c["call_id"], "type": "function",
                  "function": {"name": c["name"], "arguments": c["arguments"]}}
                 for c in self.output if c["type"] == "function_call"]
        if calls:
            out.append({"role": "assistant", "content": None, "tool_calls": calls})
        return out

    # -- stream events --------------------------------------------------------------------

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        ev = {"type": kind, **fields, "sequence_number": self.seq}
        self.seq += 1
        return ev

    def opening(self, status: str = "in_progress") -> list[dict[str, Any]]:
        kind = "response.queued" if status == "queued" else "response.in_progress"
        return [self.event("response.created", response=self.response(status)),
                self.event(kind, response=self.response(status))]

    def feed(self, ev: events.Event) -> list[dict[str, Any]]:
        if isinstance(ev, events.Delta) and ev.text and not ev.prompt:
            return self._text(ev.text)
        if isinstance(ev, events.ToolCallDelta):
            return self._call(ev)
        if isinstance(ev, events.Finish):
            self.finish = ev.finish_reason
            return self._close_items()
        if isinstance(ev, events.Done):
            self.usage = usage(ev)
            return [self.event(self._final_kind(), response=self.response())]
        return []

    def fail(self, err: FerryError) -> list[dict[str, Any]]:
        self.error = error_of(err)
        return [self.event("response.failed", response=self.response())]

    def _final_kind(self) -> str:
        return {"incomplete": "response.incomplete",
                "cancelled": "response.incomplete"}.get(self.status, "response.completed")

    def _id(self, prefix: str) -> str:
        # From the response's id and the item's place: a replay of the same events (a
        # background response) names its items as the first run did.
        return f"{prefix}_{self.base['id'].removeprefix('resp_')}_{len(self.output)}"

    def cancel(self) -> list[dict[str, Any]]:
        """The job was cancelled before it made any output (there is no
        ``response.cancelled`` event: the response ends ``cancelled`` in a
        ``response.incomplete`` event)."""
        self.finish = "cancelled"
        return [*self._close_items(), self.event("response.incomplete", response=self.response())]

    def _add(self, item: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self.output.append(item)
        index = len(self.output) - 1
        return index, self.event("response.output_item.added", output_index=index,
                                 item=dict(item))

    def _text(self, text: str) -> list[dict[str, Any]]:
        out = []
        if self.message is None:
            self.message = {"id": self._id("msg"), "type": "message", "role": "assistant",
                            "status": "in_progress", "content": []}
            index, added = self._add(self.message)
            self.message["content"].append({"type": "output_text", "text": "",
                                            "annotations": [], "logprobs": []})
            out += [added, self.event("response.content_part.added", item_id=self.message["id"],
                                      output_index=index, content_index=0,
                                      part={"type": "output_text", "text": "",
                                            "annotations": [], "logprobs": []})]
        self.message["content"][0]["text"] += text
        out.append(self.event("response.output_text.delta", item_id=self.message["id"],
                              output_index=self.output.index(self.message), content_index=0,
                              delta=text, logprobs=[]))
        return out

    def _call(self, ev: events.ToolCallDelta) -> list[dict[str, Any]]:
        out = []
        if ev.call not in self.calls:
            call = {"id": self._id("fc"), "type": "function_call",
                    "call_id": ev.id or self._id("call"),
                    "name": ev.name or "", "arguments": "", "status": "in_progress"}
            self.calls[ev.call] = call
            out.append(self._add(call)[1])
        call = self.calls[ev.call]
        if ev.arguments:
            call["arguments"] += ev.arguments
            out.append(self.event("response.function_call_arguments.delta", item_id=call["id"],
                                  output_index=self.output.index(call), delta=ev.arguments))
        return out

    def _close_items(self) -> list[dict[str, Any]]:
        status = "incomplete" if self.finish in ("length", "cancelled") else "completed"
        out = []
        for index, item in enumerate(self.output):
            if item["status"] != "in_progress":
                continue
            item["status"] = status
            if item is self.message:
                part = dict(item["content"][0])
                out += [self.event("response.output_text.done", item_id=item["id"],
                                   output_index=index, content_index=0, text=part["text"],
                                   logprobs=[]),
                        self.event("response.content_part.done", item_id=item["id"],
                                   output_index=index, content_index=0, part=part)]
            else:
                out.append(self.event("response.function_call_arguments.done",
                                      item_id=item["id"], output_index=index,
                                      name=item["name"], arguments=item["arguments"]))
            out.append(self.event("response.output_item.done", output_index=index,
                                  item=dict(item, content=list(item.get("content", [])))
                                  if item is self.message else dict(item)))
        return out
