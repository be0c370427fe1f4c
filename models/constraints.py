"""What a job's output is constrained to, as a JSON schema any grammar engine can take.

``for_job`` turns ``response_format`` and tool calls into one ``Constraint``. Schemas may
use only keywords that the grammar compilers enforce (``KEYWORDS``); anything else would
make "the output validates" a promise we could not keep, so ``check_schema`` rejects it
with a 400 naming the keyword, as OpenAI's strict mode does for what it cannot enforce.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import jsonschema

from config.errors import InvalidRequest
from models import tools as tool_format
from models.job import GenerationJob
from models.tools import ToolFormat

# Enforced by grammar-constrained decoding.
ASSERTIONS = {
    "type", "properties", "required", "additionalProperties", "items", "prefixItems",
    "minItems", "maxItems", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "pattern",
    "minLength", "maxLength",
}
# Schema plumbing and annotations, which constrain nothing. ``format`` is an annotation in
# JSON Schema 2020-12 (date, time, date-time and uuid are enforced all the same).
ANNOTATIONS = {
    "$defs", "definitions", "$schema", "$id", "$comment", "title", "description", "default",
    "examples", "format", "deprecated", "readOnly", "writeOnly", "strict", "discriminator",
}
KEYWORDS = ASSERTIONS | ANNOTATIONS
# Keywords whose value is a map of names to schemas, or a list of schemas.
_SCHEMA_MAPS = {"properties", "$defs", "definitions"}
_SCHEMA_LISTS = {"anyOf", "oneOf", "allOf", "prefixItems"}


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


def check_schema(schema: Any, param: str) -> None:
    """A 400 for a schema that is not one, or that uses keywords we cannot enforce."""
    if not isinstance(schema, dict):
        raise InvalidRequest("A JSON schema must be an object.", param=param)
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        raise InvalidRequest(f"Invalid JSON schema: {e.message}", param=param) from None
    where = _unsupported(schema, "")
    if where is not None:
        raise InvalidRequest(
            f"The JSON schema keyword '{where}' cannot be enforced while generating; "
            f"supported keywords are {', '.join(sorted(ASSERTIONS))}.", param=param)


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
