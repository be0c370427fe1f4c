"""Request bodies: JSON parsing, then the core's validation (``tasks/core/validation.py``)."""

from __future__ import annotations

import json
import re
from typing import TypeVar

from flask import request
from pydantic import BaseModel

from config.errors import InvalidRequest
from tasks.core.validation import validate

__all__ = ["parse_body", "validate"]

M = TypeVar("M", bound=BaseModel)


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
