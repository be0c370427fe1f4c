"""Chat templates: the model's own Jinja template, rendered in a sandbox.

Shared by every backend whose engine has no template renderer of its own (llama.cpp's
Python binding has one but only for its server; ExLlamaV2 has none). Templates come from the
model (GGUF metadata, ``tokenizer_config.json``) and are untrusted input: they run in an
immutable sandbox, and ``raise_exception`` inside a template becomes a 400.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from config.errors import InvalidRequest


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
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
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
