"""Chat templates: the model's own Jinja template, rendered in a sandbox.

Shared by every backend whose engine has no template renderer of its own (llama.cpp's
Python binding has one but only for its server; ExLlamaV2 has none). Templates come from the
model (GGUF metadata, ``tokenizer_config.json``) and are untrusted input: they run in an
immutable sandbox, and ``raise_exception`` inside a template becomes a 400.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from config.errors import InvalidRequest
from models.tools import format_for as tool_format_for


class _TemplateRaised(Exception):
    pass


def _raise_exception(message: str):
    raise _TemplateRaised(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, **_: Any) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = ""):
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
        )
        env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
        env.filters["tojson"] = _tojson
        self._template = env.from_string(source)
        # Templates written for tool use render assistant ``tool_calls`` themselves; for the
        # others, earlier calls are written into the message content (``models.tools``).
        self.renders_tool_calls = "tool_calls" in source
        self.tool_format = tool_format_for(source)
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> str:
        """``continue_final_message`` (as Hugging Face's and vLLM's): the last message, an
        assistant turn, is left open for the reply to continue (a prefill). It is rendered
        as a finished turn whose text is a marker, cut at the marker, and its text appended:
        what a template writes after a turn's text (its end of turn) is dropped, and a
        template that trims or rewrites the text cannot hide where it ends."""
        if continue_final_message:
            return self._continued(messages, tools)
        return self._render(messages, tools, add_generation_prompt)

    def _continued(self, messages: list[dict[str, Any]],
                   tools: list[dict[str, Any]] | None) -> str:
        marker = "\x00FERRY-PREFILL\x00"
        last = messages[-1]
        text = self._render([*messages[:-1], {**last, "content": marker}], tools, False)
        head, found, _ = text.partition(marker)
        if not found:
            raise InvalidRequest("The model's chat template does not write the last assistant "
                                 "message's text, so it cannot be continued.",
                                 param="messages")
        return head + flatten_content(last.get("content"))

    def _render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                add_generation_prompt: bool) -> str:
        try:
            return self._template.render(
                messages=messages,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except _TemplateRaised as e:
            raise InvalidRequest(f"The model's chat template rejected the messages: {e}",
                                 param="messages") from None
        except TemplateError as e:
            raise InvalidRequest(f"The messages could not be rendered with the model's chat "
                                 f"template: {e}", param="messages") from None


def flatten_content(content: Any) -> str:
    """OpenAI content may be a string or a list of parts; text-only models see the text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if p.get("type") == "text")


# Chat templates of model directories (Hugging Face layout), for engines that read none.

_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def find_chat_template(model_dir: Path, tokenizer_config: dict[str, Any],
                       name: str | None = None) -> str | None:
    """The template source of a model directory, or None if it has none.

    Lookup order: ``name`` (a file, absolute or in the model directory, or a named template
    of tokenizer_config.json), then ``chat_template.jinja``, ``chat_template.json`` and
    tokenizer_config.json's ``chat_template`` — newer exports move the template out of
    tokenizer_config.json into the first two, so they win.
    """
    listed = tokenizer_config.get("chat_template")
    named = {t.get("name"): t.get("template") for t in listed} if isinstance(listed, list) else {}
    if name is not None:
        path = model_dir / Path(name).expanduser()
        if path.is_file():
            return path.read_text()
        if name in named:
            return named[name]
        raise FileNotFoundError(f"chat template {name!r}: no such file in {model_dir} and no "
                                "such named template in tokenizer_config.json")
    jinja, as_json = (model_dir / f for f in _TEMPLATE_FILES)
    if jinja.is_file():
        return jinja.read_text()
    if as_json.is_file():
        return json.loads(as_json.read_text())["chat_template"]
    if isinstance(listed, str):
        return listed
    # A list of named templates: Hugging Face uses the one named "default".
    return named.get("default") or next(iter(named.values()), None)


def end_of_turn(template: ChatTemplate, special_tokens: list[str]) -> str | None:
    """The special token the template closes an assistant turn with (``<|im_end|>``,
    ``<|eot_id|>``, ``<end_of_turn>``), found by rendering a finished turn; None if the turn
    ends in plain text or the template will not render one."""
    marker = "\x00FERRY-END-OF-TURN\x00"
    try:
        text = template.render([{"role": "user", "content": "Hi"},
                                {"role": "assistant", "content": marker}],
                               add_generation_prompt=False)
    except InvalidRequest:
        return None
    _, found, after = text.partition(marker)
    if not found:
        return None
    after = after.lstrip()
    matches = [t for t in special_tokens if t and after.startswith(t)]
    return max(matches, key=len, default=None)
