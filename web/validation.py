"""Request bodies: JSON parsing and pydantic validation, failing as OpenAI does (400, param)."""

from __future__ import annotations

import json
import re
from typing import TypeVar

from flask import request
from pydantic import BaseModel, ValidationError

from config.errors import InvalidRequest

M = TypeVar("M", bound=BaseModel)


def param_of(loc: tuple, data: object, missing: bool) -> str | None:
    """pydantic's error location as OpenAI spells a parameter (``messages[0].role``).

    The location also names union members tried ("str", "list[str]"); only the parts that
    exist in the request (or, for a missing field, the field itself) are kept.
    """
    out, node = "", data
    for i, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            out += ("." if out else "") + str(part)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            out += f"[{part}]"
            node = node[part]
        elif missing and i == len(loc) - 1:
            out += ("." if out else "") + str(part)
    return out or None


def validate(model: type[M], data: object) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        # In a union, "not a string" says less than "a list of at most 4": prefer the latter.
        err = next((x for x in errors if not x["type"].endswith("_type")), errors[0])
        param = param_of(err["loc"], data, err["type"] == "missing")
        where = f" ('{param}')" if param else ""
        raise InvalidRequest(f"Invalid request{where}: {err['msg']}", param=param) from None


def parse_body(model: type[M]) -> M:
    raw = request.get_data(cache=False)
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("The request body is not valid JSON.") from None
    except RecursionError:
        # Python's parser stops at ~1000 levels; no request field is anywhere near that deep.
        raise InvalidRequest("The request body nests JSON arrays or objects too deeply.",
                             param=_too_deep(raw)) from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return validate(model, data)


_SPACE = re.compile(r"[ \t\n\r]*")


def _too_deep(raw: bytes) -> str | None:
    """The top-level field whose value is nested too deeply to parse, found by parsing the
    body's top-level values one by one (each in C, as ``json.loads`` would)."""
    decoder = json.JSONDecoder()
    try:
        text = raw.decode()
        i = _SPACE.match(text).end()
        if text[i:i + 1] != "{":
            return None
        i += 1
        while True:
            key, i = decoder.raw_decode(text, _SPACE.match(text, i).end())
            i = _SPACE.match(text, i).end()
            if text[i:i + 1] != ":":
                return None
            try:
                _, i = decoder.raw_decode(text, _SPACE.match(text, i + 1).end())
            except RecursionError:
                return key if isinstance(key, str) else None
            i = _SPACE.match(text, i).end()
            if text[i:i + 1] != ",":
                return None
            i += 1
    except (ValueError, UnicodeDecodeError):
        return None
