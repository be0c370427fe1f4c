"""Request validation with pydantic, failing as OpenAI does (400, naming the parameter)."""

from __future__ import annotations

from typing import TypeVar

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
