"""Tool calls: the template's own format where it has one, else Ferry's JSON tool format.

Ferry's format, for templates with none: the tools are described to the model in a system
message, and a reply that calls a tool is exactly one JSON object ``{"name": <tool>,
"arguments": {...}}`` and nothing else. Templates written for ``<tool_call>`` tags (Hermes,
Qwen 2.5 and their kin) render the tools and earlier calls themselves, and a call is the same
JSON object between the tags. Decoding is grammar-constrained (``models.constraints``): with
``tool_choice`` ``required`` or a named tool the reply must be such an object whose
arguments validate against the tool's schema; with ``auto`` the first character decides:
``{`` starts a (then constrained) call, anything else a plain text reply. One call per reply (``parallel_tool_calls``
allows, but never requires, more).

Earlier turns are shown to the model in the same format: an assistant message's
``tool_calls`` become that JSON as its content (unless the template renders ``tool_calls``
itself), and ``tool`` messages are passed to the template as they are.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from config.contract.job import FunctionTool, NamedToolChoice, ToolChoice


@dataclass(frozen=True)
class ToolFormat:
    """How a call is written: the JSON call object between ``open`` and ``close``.
    ``native``: the template renders the tools and earlier calls itself."""

    open: str = ""
    close: str = ""
    native: bool = False

    @property
    def first(self) -> str:
        """The character that opens a call (and so may not open a text reply)."""
        return (self.open or "{")[0]


FERRY = ToolFormat()
TAGGED = ToolFormat(open="<tool_call>\n", close="\n</tool_call>", native=True)


def format_for(template_source: str) -> ToolFormat:
    return TAGGED if "<tool_call>" in template_source and "tools" in template_source else FERRY


def template_tools(tools: list[FunctionTool]) -> list[dict[str, Any]]:
    """Tools as templates expect them (the Hugging Face convention)."""
    return [{"type": "function", "function": t.model_dump(exclude_none=True)} for t in tools]


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def chosen_tools(tools: list[FunctionTool], choice: ToolChoice) -> list[FunctionTool]:
    if isinstance(choice, NamedToolChoice):
        return [t for t in tools if t.name == choice.name]
    return list(tools)


def call_schema(tools: list[FunctionTool], choice: ToolChoice) -> dict[str, Any]:
    """The JSON schema of one call to one of the chosen tools."""
    return {"anyOf": [{
        "type": "object",
        "properties": {"name": {"const": t.name}, "arguments": t.parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    } for t in chosen_tools(tools, choice)]}


def instructions(tools: list[FunctionTool], choice: ToolChoice) -> str:
    listing = "\n".join(json.dumps({"name": t.name, "description": t.description or "",
                                    "parameters": t.parameters}, ensure_ascii=False)
                        for t in chosen_tools(tools, choice))
    how = ('To call a tool, reply with only a JSON object {"name": <tool name>, '
           '"arguments": <the arguments as a JSON object>}.')
    if choice == "auto":
        rule = "Call a tool when it helps to answer; otherwise reply normally."
    elif isinstance(choice, NamedToolChoice):
        rule = f"Call the tool {choice.name} now."
    else:
        rule = "Call one of these tools now."
    return f"You can call these tools:\n{listing}\n{how} {rule}"


def call_text(call: dict[str, Any]) -> str:
    """An earlier call as the model would have written it."""
    fn = call.get("function") or {}
    return json.dumps({"name": fn.get("name"), "arguments": fn.get("arguments")},
                      ensure_ascii=False)


def prepare_messages(messages: list[dict[str, Any]], tools: list[FunctionTool],
                     choice: ToolChoice, template_renders_calls: bool,
                     fmt: ToolFormat = FERRY) -> list[dict[str, Any]]:
    """The messages to render: tool instructions in the system message (when a call may be
    made and the template does not describe tools itself), and earlier calls in Ferry's
    format unless the template renders them."""
    out = []
    for m in messages:
        if m.get("tool_calls") and not template_renders_calls:
            text = "\n".join(call_text(c) for c in m["tool_calls"])
            content = m.get("content") or ""
            m = {k: v for k, v in m.items() if k != "tool_calls"}
            m["content"] = f"{content}\n{text}" if content else text
        out.append(m)
    if not tools or choice == "none" or fmt.native:
        return out
    note = instructions(tools, choice)
    if out and out[0].get("role") == "system":
        first = dict(out[0])
        first["content"] = f"{first.get('content') or ''}\n\n{note}".lstrip()
        return [first, *out[1:]]
    return [{"role": "system", "content": note}, *out]


@dataclass(frozen=True)
class CallPiece:
    """Part of a tool call: the first piece has ``id`` and ``name``, later ones arguments."""

    arguments: str = ""
    id: str | None = None
    name: str | None = None


_HEAD = r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*'


class CallParser:
    """Splits a reply in Ferry's tool format into text or one call, as it is generated.

    ``feed`` takes the next piece of decoded text and returns what can be released: strings
    (plain text) or ``CallPiece``s. Argument fragments are released as soon as they arrive;
    the envelope's closing brace is not part of the arguments and is dropped.
    """

    def __init__(self, text_allowed: bool, fmt: ToolFormat = FERRY):
        self.text_allowed = text_allowed
        self._first = fmt.first
        # Blank space before the object: a grammar may allow it (a tool format's open tag
        # followed by indentation), and it is no reason to lose the call.
        self._head_re = re.compile(re.escape(fmt.open) + r"\s*" + _HEAD)
        self.state = "start"
        self._buf = ""
        self._depth = 0
        self._in_string = False
        self._escaped = False
        self.called = False

    def feed(self, text: str) -> list[str | CallPiece]:
        if self.state == "start":
            self._buf += text
            if not self._buf:
                return []
            if self.text_allowed and not self._buf.startswith(self._first):
                self.state = "text"
            else:
                self.state = "head"
            text, self._buf = self._buf, ""
        if self.state == "text":
            return [text] if text else []
        if self.state == "head":
            return self._head(text)
        if self.state == "args":
            return self._args(text)
        return []  # after the call: the envelope's end

    def finish(self) -> list[str | CallPiece]:
        """At the end of generation. A call that never got its name is returned as text."""
        if self.state in ("start", "head") and self._buf:
            text, self._buf = self._buf, ""
            return [text]
        return []

    def _head(self, text: str) -> list[str | CallPiece]:
        self._buf += text
        m = self._head_re.match(self._buf)
        if m is None:
            return []
        rest, self._buf = self._buf[m.end():], ""
        self.state, self.called = "args", True
        head = CallPiece(id=new_call_id(), name=json.loads(f'"{m.group(1)}"'))
        return [head, *self._args(rest)]

    def _args(self, text: str) -> list[str | CallPiece]:
        if self._depth == 0:
            text = text.lstrip()  # whitespace between the colon and the arguments
        end = self._scan(text)
        piece = text if end is None else text[:end]
        if end is not None:
            self.state = "done"
        return [CallPiece(arguments=piece)] if piece else []

    def _scan(self, text: str) -> int | None:
        """Track the arguments' nesting; the index just past their closing bracket, if here."""
        for i, c in enumerate(text):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif c == "\\":
                    self._escaped = True
                elif c == '"':
                    self._in_string = False
            elif c == '"':
                self._in_string = True
            elif c in "{[":
                self._depth += 1
            elif c in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return i + 1
        return None
