"""Output constraints (``models.constraints``) as formatron grammars for ExLlamaV2.

Below the GPU line: nothing here imports exllamav2. ``grammar_for`` turns a job's
``Constraint`` into a ``Grammar`` (plain data, checked in the task thread so a schema
formatron cannot enforce is a 400 before anything is queued); ``build_formatter`` makes the
formatron ``Formatter`` of one job from it; ``GrammarFilterLogic`` is the ExLlamaV2 filter
that wraps formatron's ``FormatterFilter`` (engine.py mixes it with ``ExLlamaV2Filter``).

Written against formatron 0.5.0 (pinned), whose JSON schema support differs from the
llama.cpp converter's, so schemas are prepared for it:

- ``$id`` and ``$schema`` are added (formatron resolves ``$ref`` against ``$id``);
- annotations are dropped (formatron allows nothing beside ``anyOf``);
- every declared property is made required: formatron's object rule always writes every
  key and only makes an optional property's *value* optional, so ``"key":`` followed by
  nothing would be allowed. Writing all of them keeps the output valid JSON that validates;
- ``oneOf`` and ``allOf`` (silently unenforced by formatron), ``anyOf`` beside other
  keywords, value schemas in ``additionalProperties`` of objects without ``properties``
  (formatron would allow any values) and top levels other than objects and arrays are
  refused with a 400 naming the place;
- a top-level ``anyOf`` (one call to one of several tools) becomes formatron's ``choose``
  of one JSON schema per alternative.
"""

from __future__ import annotations

import json
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from config.errors import InvalidRequest
from models.constraints import ANNOTATIONS, Constraint

SCHEMA_ID = "https://ferry.invalid/schema.json"
DIALECT = "https://json-schema.org/draft/2020-12/schema"

_UNENFORCED = {"oneOf": "oneOf", "allOf": "allOf"}
# Enforced by llguidance on the CPU backend (models.guidance), not by formatron 0.5.0: refused
# here rather than silently unenforced.
_CPU_ONLY = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
             "minProperties", "maxProperties", "patternProperties")
# Schema plumbing kept for formatron; every other annotation is dropped.
_KEPT = {"$defs", "$id", "$schema"}
_DROPPED = ANNOTATIONS - _KEPT


@dataclass(frozen=True)
class Grammar:
    """What one constrained reply must be: ``open``, then JSON matching one of
    ``alternatives`` (prepared schemas as JSON text), then ``close``. With ``text_allowed``
    (tool_choice auto) the reply may instead be plain text that does not open like a call."""

    alternatives: tuple[str, ...]
    open: str = ""
    close: str = ""
    text_allowed: bool = False
    is_tool_call: bool = False

    @property
    def param(self) -> str:
        return "tools" if self.is_tool_call else "response_format"

    @property
    def first(self) -> str:
        """The character a call (or the JSON) starts with."""
        return (self.open or "{")[0]


def grammar_for(constraint: Constraint | None) -> Grammar | None:
    if constraint is None:
        return None
    param = "tools" if constraint.is_tool_call else "response_format"
    for literal in (constraint.open, constraint.close):
        if "$" in literal:  # formatron reads ${...} in literals as a reference
            raise InvalidRequest("The tool call format cannot be expressed for this model.",
                                 param=param)
    alternatives = tuple(json.dumps(prepare_schema(s, param), sort_keys=False)
                         for s in split_alternatives(constraint.schema))
    return Grammar(alternatives, constraint.open, constraint.close, constraint.text_allowed,
                   constraint.is_tool_call)


def split_alternatives(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """A top-level ``anyOf`` as one schema per branch, each with the root's ``$defs``."""
    rest = {k for k in schema if k not in _DROPPED and k != "$defs"}
    if rest != {"anyOf"} or not isinstance(schema["anyOf"], list):
        return [schema]
    defs = schema.get("$defs")
    return [{**branch, "$defs": defs} if defs else dict(branch) for branch in schema["anyOf"]]


def prepare_schema(schema: dict[str, Any], param: str) -> dict[str, Any]:
    body = _prepare(schema, "", param)
    top = body.get("type")
    types = set(top) if isinstance(top, list) else {top}
    if "$ref" not in body and (top is None or not types <= {"object", "array"}):
        raise InvalidRequest("With this model the JSON schema's top level must be an object or "
                             "an array (\"type\": \"object\" or \"array\").", param=param)
    return {"$id": SCHEMA_ID, "$schema": DIALECT, **body}


def _refuse(where: str, why: str, param: str):
    raise InvalidRequest(f"The JSON schema at '{where or '/'}' cannot be enforced by this model's "
                         f"grammar engine: {why}.", param=param)


def _prepare(node: Any, path: str, param: str) -> Any:
    if isinstance(node, list):
        return [_prepare(x, f"{path}/{i}", param) for i, x in enumerate(node)]
    if not isinstance(node, dict):
        return node
    for key in _UNENFORCED:
        if key in node:
            _refuse(f"{path}/{key}", f"'{key}' is not supported (use anyOf)", param)
    for key in _CPU_ONLY:
        if key in node:
            _refuse(f"{path}/{key}", f"'{key}' is not supported", param)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED:
            continue
        if key in ("properties", "$defs") and isinstance(value, dict):
            out[key] = {k: _prepare(v, f"{path}/{key}/{k}", param) for k, v in value.items()}
        elif key in ("items", "additionalProperties", "anyOf", "prefixItems"):
            out[key] = _prepare(value, f"{path}/{key}", param)
        else:
            out[key] = value
    if "anyOf" in out and set(out) - {"anyOf", "$defs"}:
        _refuse(path, "anyOf must be the only keyword of its schema", param)
    extra = out.get("additionalProperties")
    if "properties" not in out and extra not in (None, True, False, {}):
        _refuse(f"{path}/additionalProperties", "a schema for additional properties is only "
                "enforced beside 'properties'", param)
    if isinstance(out.get("properties"), dict):
        out["required"] = list(out["properties"])
        # formatron never writes undeclared properties; say so, so the schema agrees.
        out.pop("additionalProperties", None)
    return out


# --- formatron ------------------------------------------------------------------------------

_FORMATRON_TYPING = ("Any", "Literal", "Mapping", "Type", "Union", "get_args", "get_origin")


def import_formatron() -> tuple[Any, Callable[[dict[str, Any]], Any]]:
    """(FormatterBuilder, json_schema.create_schema).

    formatron 0.5.0 reads these stdlib ``typing`` names through ``pydantic.typing``, a v1
    compatibility module that pydantic >= 2.12 no longer fills (formatron issue #35: import
    fails with "module 'pydantic.typing' has no attribute 'Type'"). They are put back before
    formatron is imported; nothing else reads them there.
    """
    import pydantic.typing as legacy

    for name in _FORMATRON_TYPING:
        if name not in vars(legacy):
            setattr(legacy, name, getattr(typing, name))
    from formatron.formatter import FormatterBuilder
    from formatron.schemas import json_schema

    return FormatterBuilder, json_schema.create_schema


def build_formatter(grammar: Grammar, vocabulary: Any, decode: Callable[[list[int]], str],
                    builder: Any = None, create_schema: Any = None) -> Any:
    """A fresh formatron ``Formatter`` for one job (formatters hold parse state).

    ``builder``/``create_schema``: formatron's, unless a test passes its own."""
    if builder is None or create_schema is None:
        builder_cls, create_schema = import_formatron()
        builder = builder_cls()
    try:
        parts = [builder.json(create_schema(json.loads(s))) for s in grammar.alternatives]
        body = parts[0] if len(parts) == 1 else builder.choose(*parts)
        builder.append_str(f"{grammar.open}{body}{grammar.close}")
        return builder.build(vocabulary, decode)
    except InvalidRequest:
        raise
    except Exception as e:  # formatron and kbnf raise ValueError, AssertionError, TypeError...
        raise InvalidRequest(f"The JSON schema cannot be turned into a grammar for this model: "
                             f"{str(e)[:300]}", param=grammar.param) from None


# --- the ExLlamaV2 filter -----------------------------------------------------------------


@dataclass(frozen=True)
class FirstTokens:
    """For tool_choice auto: token ids that may open a reply. ``call``: those whose text
    starts with the call's first character (formatron decides which of them fit the
    grammar); ``text``: those that start plain text (not whitespace only, not opening like a
    call once leading whitespace is skipped, never a stop token)."""

    call: frozenset[int]
    text: tuple[int, ...]

    @classmethod
    def of(cls, pieces: Sequence[str], first: str, stop_ids: Iterable[int]) -> "FirstTokens":
        stops = set(stop_ids)
        call = frozenset(i for i, p in enumerate(pieces) if p.startswith(first) and i not in stops)
        text = tuple(i for i, p in enumerate(pieces)
                     if p.strip() and not p.lstrip().startswith(first) and i not in stops)
        return cls(call, text)


class GrammarFilterLogic:
    """An ExLlamaV2 filter around formatron's ``FormatterFilter`` (``inner``).

    Mixed with ``exllamav2.generator.filters.ExLlamaV2Filter`` in engine.py; the generator
    (0.3.2) calls ``begin``, ``feed``, ``next`` or, when ``can_mask_logits``,
    ``prepare_logit_mask``/``mask_logits``. Two things on top of formatron's filter:

    - Stop tokens are refused until the grammar is complete. formatron's vocabulary holds
      control tokens by their text, so ``<|im_end|>`` is "valid" inside a JSON string and
      would end the job with half a JSON value.
    - tool_choice auto: until the first token the reply may be a call (formatron's choice
      among ``first.call``) or plain text (``first.text``); once it is text the filter
      constrains nothing (``next`` returns no allowed set). Stop tokens are never among the
      first choices: with ``filter_prefer_eos`` the sampler would pick one at once.
    """

    def __init__(self, model: Any, tokenizer: Any, inner: Any, stop_ids: Iterable[int],
                 first: FirstTokens | None = None):
        super().__init__(model, tokenizer)
        self.inner = inner
        self.stop_ids = sorted(set(stop_ids))
        self._stop_set = frozenset(self.stop_ids)
        self.first = first
        self.mode = "call"

    def begin(self, prefix_str: str) -> None:
        self.mode = "start" if self.first is not None else "call"
        self.inner.begin(prefix_str)

    def feed(self, token: Any) -> None:
        if self.mode == "start":
            self.mode = "call" if int(token) in self.first.call else "text"
        if self.mode == "call":
            self.inner.feed(token)

    def next(self):
        if self.mode == "text":
            return None, None
        allowed, end = self.inner.next()
        if self.mode == "start":
            calls = [t for t in allowed if t in self.first.call]
            return sorted({*calls, *self.first.text}), []
        if not self.inner.is_completed():
            allowed = [t for t in allowed if t not in self._stop_set]
        return allowed, end

    def use_background_worker(self) -> bool:
        return self.mode != "text" and self.inner.use_background_worker()

    def can_mask_logits(self) -> bool:
        return self.mode == "call" and self.inner.can_mask_logits()

    def prepare_logit_mask(self) -> bool:
        return self.inner.prepare_logit_mask()

    def mask_logits(self, logits: Any) -> Any:
        masked = self.inner.mask_logits(logits)
        if not self.inner.is_completed() and self.stop_ids:
            masked[self.stop_ids] = float("-inf")
        return masked

    def is_completed(self) -> bool:
        return self.inner.is_completed()
