"""What a job's output is constrained to, as a JSON schema any grammar engine can take.

``for_job`` turns ``response_format`` and tool calls into one ``Constraint``. Schemas may
use only keywords that the grammar compiler (llguidance, ``models.guidance``) enforces
(``KEYWORDS``); anything else would
make "the output validates" a promise we could not keep, so ``check_schema`` rejects it
with a 400 naming the keyword, as OpenAI's strict mode does for what it cannot enforce.

A schema is also bounded (``SchemaLimits``): grammar compilers write a counted repetition
out in full (``maxLength: N`` becomes N nested optional characters) and llama.cpp's GBNF
parser recurses once per nesting level, so one unbounded schema crashed the worker with
every request it held. The bounds are checked before anything recursive sees the schema.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

import jsonschema

from config.errors import InvalidRequest
from models import tools as tool_format
from config.contract.job import GenerationJob
from models.tools import ToolFormat

# Enforced by grammar-constrained decoding (each one checked by tests/test_schema_keywords.py,
# which also keeps the README's list equal to this one).
ASSERTIONS = {
    "type", "properties", "required", "additionalProperties", "patternProperties",
    "minProperties", "maxProperties", "items", "prefixItems", "minItems", "maxItems", "enum",
    "const", "anyOf", "oneOf", "allOf", "$ref", "pattern", "minLength", "maxLength",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
}
# Schema plumbing and annotations, which constrain nothing. ``format`` is an annotation in
# JSON Schema 2020-12 (those llguidance knows are enforced all the same: models.guidance).
ANNOTATIONS = {
    "$defs", "definitions", "$schema", "$id", "$comment", "title", "description", "default",
    "examples", "format", "deprecated", "readOnly", "writeOnly", "strict", "discriminator",
}
KEYWORDS = ASSERTIONS | ANNOTATIONS
# Keywords whose value is a map of names to schemas, or a list of schemas.
_SCHEMA_MAPS = {"properties", "patternProperties", "$defs", "definitions"}
_SCHEMA_LISTS = {"anyOf", "oneOf", "allOf", "prefixItems"}
# Counted repetitions: each is written out that many times in the grammar.
_REPEATS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")


@dataclass(frozen=True)
class SchemaLimits:
    """What one JSON schema may ask (``FERRY_MAX_SCHEMA_*``, see ``config.settings``).

    ``max_bytes``: the schema as compact JSON. ``max_depth``: subschemas nested in one
    another (a ``$ref`` counts as one level into its target, so a chain of references is as
    deep as it reads), also groups nested in a ``pattern``. ``max_repeat``: each of
    ``minLength``, ``maxLength``, ``minItems``, ``maxItems``, and each counted repetition of a
    ``pattern`` (``a{0,N}``; nested ones multiplied). ``max_total_repeat``: all of those in
    the schema added up (a definition counted once per ``$ref`` string naming it), which
    bounds the grammar's size: llama.cpp parses it once per choice, on the loop thread that
    decodes every stream of the worker."""

    max_bytes: int = 32 * 1024
    max_depth: int = 32
    max_repeat: int = 1000
    max_total_repeat: int = 10000


@dataclass(frozen=True)
class Constraint:
    """The output is ``open``, then JSON that validates against ``schema``, then ``close``;
    or, when ``text_allowed`` (tool_choice auto), plain text that does not start with the
    first character of that (``{`` when ``open`` is empty)."""

    schema: dict[str, Any]
    text_allowed: bool = False
    is_tool_call: bool = False
    open: str = ""
    close: str = ""


def for_job(job: GenerationJob, fmt: ToolFormat = tool_format.FERRY) -> Constraint | None:
    """``fmt``: how the model's chat template writes tool calls."""
    if job.calls_tools:
        return Constraint(_call_schema(job), text_allowed=job.tool_choice == "auto",
                          is_tool_call=True, open=fmt.open, close=fmt.close)
    rf = job.response_format
    if rf is None:
        return None
    if rf.type == "json_object" or rf.json_schema is None:
        return Constraint({"type": "object"})
    body, defs = normalize(rf.json_schema, "ref", "response_format")
    return Constraint({**body, "$defs": defs} if defs else body)


def _call_schema(job: GenerationJob) -> dict[str, Any]:
    """One call to one of the chosen tools, each tool's definitions hoisted to the root."""
    envelope = tool_format.call_schema(job.tools, job.tool_choice)
    all_defs: dict[str, Any] = {}
    for i, alt in enumerate(envelope["anyOf"]):
        body, defs = normalize(alt["properties"]["arguments"], f"tool{i}",
                               f"tools[{i}].function.parameters")
        alt["properties"]["arguments"] = body
        all_defs.update(defs)
    return {**envelope, "$defs": all_defs} if all_defs else envelope


def _meta() -> dict[str, Any]:
    """What the keywords in ``KEYWORDS`` may hold, as in JSON Schema 2020-12's metaschema.
    That metaschema resolves ``$dynamicRef`` at every level: checking a 32 KiB schema
    against it took 0.6-1.5 s of the web's CPU, against this 0.1 s. Keywords outside
    ``KEYWORDS`` are refused before this runs (``_unsupported``)."""
    sub = {"$ref": "#/$defs/schema"}
    count = {"type": "integer", "minimum": 0}
    number = {"type": "number"}
    text, flag = {"type": "string"}, {"type": "boolean"}
    schemas = {"type": "object", "additionalProperties": sub}
    alternatives = {"type": "array", "minItems": 1, "items": sub}
    types = ["array", "boolean", "integer", "null", "number", "object", "string"]
    keywords = {
        "type": {"anyOf": [{"enum": types}, {"type": "array", "items": {"enum": types},
                                             "minItems": 1, "uniqueItems": True}]},
        "properties": schemas, "$defs": schemas, "definitions": schemas,
        "required": {"type": "array", "items": text, "uniqueItems": True},
        "additionalProperties": sub, "items": sub, "prefixItems": alternatives,
        "anyOf": alternatives, "oneOf": alternatives, "allOf": alternatives,
        "minItems": count, "maxItems": count, "minLength": count, "maxLength": count,
        "minProperties": count, "maxProperties": count, "patternProperties": schemas,
        "minimum": number, "maximum": number, "exclusiveMinimum": number,
        "exclusiveMaximum": number, "multipleOf": {"type": "number", "exclusiveMinimum": 0},
        "enum": {"type": "array"}, "examples": {"type": "array"},
        "deprecated": flag, "readOnly": flag, "writeOnly": flag,
        **{k: text for k in ("$ref", "pattern", "$schema", "$id", "$comment", "title",
                             "description", "format")},
    }
    return {"$ref": "#/$defs/schema",
            "$defs": {"schema": {"type": ["object", "boolean"], "properties": keywords}}}


_META = jsonschema.Draft202012Validator(_meta())


def check_schema(schema: Any, param: str, limits: SchemaLimits = SchemaLimits()) -> None:
    """A 400 for a schema that is not one, that asks more than ``limits``, or that uses
    keywords we cannot enforce. The limits come first: a metaschema check recurses several
    frames per level, so an unbounded schema would make it a 500 or hold the web process
    for seconds."""
    if not isinstance(schema, dict):
        raise InvalidRequest("A JSON schema must be an object.", param=param)
    check_limits(schema, param, limits)
    where = _unsupported(schema, "")
    if where is not None:
        raise InvalidRequest(
            f"The JSON schema keyword '{where}' cannot be enforced while generating; "
            f"supported keywords are {', '.join(sorted(ASSERTIONS))}.", param=param)
    error = jsonschema.exceptions.best_match(_META.iter_errors(schema))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path)
        raise InvalidRequest(f"Invalid JSON schema at '/{where}': {error.message}",
                             param=param)


def check_limits(schema: dict[str, Any], param: str, limits: SchemaLimits) -> None:
    size = len(json.dumps(schema, separators=(",", ":")))
    if size > limits.max_bytes:
        raise InvalidRequest(f"The JSON schema is {size} bytes; at most {limits.max_bytes} "
                             "are accepted (max_schema_bytes).", param=param)
    _Bounds(schema, param, limits).walk()


class _Bounds:
    """One pass over a schema's subschemas, with an explicit stack (no recursion), following
    each local ``$ref`` once into its target."""

    def __init__(self, root: dict[str, Any], param: str, limits: SchemaLimits):
        self.root, self.param, self.limits = root, param, limits
        self.seen: set[str] = set()
        self.total = 0

    def walk(self) -> None:
        """Definitions are walked where they are (bounding their depth) and again through
        each ``$ref`` to them, where their repetitions count: a grammar holds only what is
        referenced, once per reference string."""
        stack: list[tuple[Any, str, int, bool]] = [(self.root, "", 1, True)]
        while stack:
            node, path, depth, counted = stack.pop()
            if not isinstance(node, dict):
                continue
            if depth > self.limits.max_depth:
                self._refuse(f"The JSON schema nests subschemas (with their $ref targets) more "
                             f"than {self.limits.max_depth} deep, at '{path or '/'}' "
                             "(max_schema_depth).")
            repeats = self._repeats(node, path)
            if counted:
                self.total += repeats
                if self.total > self.limits.max_total_repeat:
                    self._refuse(f"The JSON schema's minLength, maxLength, minItems, maxItems "
                                 f"and pattern repetitions add up to more than "
                                 f"{self.limits.max_total_repeat} (max_schema_repeat_total), "
                                 f"at '{path or '/'}'.")
            stack.extend(self._children(node, path, depth, counted))

    def _repeats(self, node: dict[str, Any], path: str) -> int:
        """The node's counted repetitions, each checked against ``max_repeat``."""
        total = 0
        for key in _REPEATS:
            value = node.get(key)
            if isinstance(value, int):
                if value > self.limits.max_repeat:
                    self._refuse(f"'{key}' is {value} at '{path}/{key}'; at most "
                                 f"{self.limits.max_repeat} is accepted (max_schema_repeat).")
                total += max(value, 0)
        patterns = [node.get("pattern")]
        if isinstance(node.get("patternProperties"), dict):
            patterns += list(node["patternProperties"])
        for pattern in (p for p in patterns if isinstance(p, str)):
            repeat, depth = pattern_cost(pattern)
            if repeat > self.limits.max_repeat:
                self._refuse(f"'pattern' at '{path}/pattern' repeats {repeat} times; at most "
                             f"{self.limits.max_repeat} is accepted (max_schema_repeat).")
            if depth > self.limits.max_depth:
                self._refuse(f"'pattern' at '{path}/pattern' nests groups {depth} deep; at "
                             f"most {self.limits.max_depth} is accepted (max_schema_depth).")
            total += repeat
        return total

    def _children(self, node: dict[str, Any], path: str, depth: int, counted: bool):
        for key, value in node.items():
            here = f"{path}/{key}"
            if key in _SCHEMA_MAPS and isinstance(value, dict):
                inner = counted and key in ("properties", "patternProperties")
                yield from ((v, f"{here}/{k}", depth + 1, inner) for k, v in value.items())
            elif key in _SCHEMA_LISTS and isinstance(value, list):
                yield from ((v, f"{here}/{i}", depth + 1, counted) for i, v in enumerate(value))
            elif key in ("items", "additionalProperties"):
                yield value, here, depth + 1, counted
            elif key == "$ref" and isinstance(value, str) and value not in self.seen:
                self.seen.add(value)
                target = _pointer(self.root, value)
                if target is not None:
                    yield target, value[1:], depth + 1, True

    def _refuse(self, message: str) -> None:
        raise InvalidRequest(message, param=self.param)


def _pointer(root: Any, ref: str) -> Any:
    """A local reference's target, or None."""
    if not ref.startswith("#"):
        return None
    node = root
    for part in ref[1:].split("/")[1:]:
        part = part.replace("~1", "/").replace("~0", "~")
        try:
            node = node[int(part)] if isinstance(node, list) else node[part]
        except (KeyError, IndexError, ValueError, TypeError):
            return None
    return node


def pattern_cost(pattern: str) -> tuple[int, int]:
    """(the largest product of nested counted repetitions, the deepest group nesting) of a
    regular expression: ``(a{0,10}){2}`` is (20, 1). ``*``, ``+`` and ``?`` count once:
    grammars write them as loops, not copies."""
    # One frame per open group: [largest product inside it, weight of its last atom].
    frames: list[list[int]] = [[1, 1]]
    deepest, i, n = 0, 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            i, frames[-1][1] = i + 2, 1
            continue
        if c == "[":
            i, frames[-1][1] = _class_end(pattern, i), 1
            continue
        if c == "(":
            frames.append([1, 1])
            deepest = max(deepest, len(frames) - 1)
        elif c == ")" and len(frames) > 1:
            inner = frames.pop()[0]
            frames[-1][1] = inner
            frames[-1][0] = max(frames[-1][0], inner)
        elif c == "{":
            end = pattern.find("}", i)
            count = _count(pattern[i + 1:end]) if end > 0 else None
            if count is not None:
                weight = frames[-1][1] * count
                frames[-1][0] = max(frames[-1][0], weight)
                i = end + 1
                continue
            frames[-1][1] = 1
        elif c not in "*+?|":
            frames[-1][1] = 1
        i += 1
    return max(f[0] for f in frames), deepest


def _class_end(pattern: str, i: int) -> int:
    """The index after the character class opening at ``i``."""
    j = i + 1
    if j < len(pattern) and pattern[j] == "^":
        j += 1
    if j < len(pattern) and pattern[j] == "]":
        j += 1
    while j < len(pattern) and pattern[j] != "]":
        j += 2 if pattern[j] == "\\" else 1
    return j + 1


def _count(body: str) -> int | None:
    """The largest count of a ``{m}``, ``{m,}`` or ``{m,n}`` body, None if it is not one."""
    lo, sep, hi = body.partition(",")
    if not all(x == "" or (x.isascii() and x.isdigit()) for x in (lo, hi)) or not (lo or hi):
        return None
    return max(int(lo or 0), int(hi or 0))


def _unsupported(schema: Any, path: str) -> str | None:
    if not isinstance(schema, dict):
        return None
    for key, value in schema.items():
        here = f"{path}/{key}"
        if key not in KEYWORDS:
            return here
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            found = next((w for k, v in value.items() if (w := _unsupported(v, f"{here}/{k}"))),
                         None)
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            found = next((w for i, v in enumerate(value) if (w := _unsupported(v, f"{here}/{i}"))),
                         None)
        elif key in ("items", "additionalProperties"):
            found = _unsupported(value, here)
        else:
            found = None
        if found:
            return found
    return None


def normalize(schema: dict[str, Any], prefix: str, param: str
              ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The schema with every local ``$ref`` pointing into one root ``$defs`` under a unique
    name (``<prefix>--<n>``), and those definitions. Grammar compilers name rules after the
    last part of a reference; two ``Item``s from two tools, or a definition named like a
    property, would otherwise share a rule."""
    names: dict[str, str] = {}
    defs: dict[str, Any] = {}

    def target(ref: str) -> Any:
        node: Any = schema
        for part in ref[1:].split("/")[1:] if ref != "#" else []:
            part = part.replace("~1", "/").replace("~0", "~")
            try:
                node = node[int(part)] if isinstance(node, list) else node[part]
            except (KeyError, IndexError, ValueError, TypeError):
                raise InvalidRequest(f"The JSON schema reference '{ref}' points nowhere.",
                                     param=param) from None
        return node

    def visit(node: Any) -> Any:
        if isinstance(node, list):
            return [visit(x) for x in node]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref")
        if isinstance(ref, str):
            if not ref.startswith("#"):
                raise InvalidRequest(f"Only local JSON schema references are supported, not "
                                     f"'{ref}'.", param=param)
            if ref not in names:
                names[ref] = f"{prefix}--{len(names)}"
                defs[names[ref]] = visit(copy.deepcopy(target(ref)))
            return {"$ref": f"#/$defs/{names[ref]}"}
        return {k: visit(v) for k, v in node.items() if k not in ("$defs", "definitions")}

    return visit(schema), defs
