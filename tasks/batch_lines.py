"""Batch input lines: reading, validating, running one, and the JSONL records they produce.

A line runs through the request core the HTTP routes use (``tasks.core.endpoints.answer``),
so it gets exactly the response, or the OpenAI error, that the same request would get over
HTTP: the same validation, the same queue, the same events. It runs as bulk work, behind
interactive requests in the model's queue (``tasks/core/generation.py``).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from pydantic import BaseModel, ValidationError

from tasks.batchstore import Chunk
from tasks.core.endpoints import FAMILIES
from tasks.core.validation import param_of

ENDPOINTS: dict[str, type[BaseModel]] = {path: f.Request for path, f in FAMILIES.items()}


@dataclass(frozen=True)
class LineError:
    code: str
    message: str
    param: str | None = None

    def to_dict(self, line: int) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param, "line": line}


@dataclass(frozen=True)
class Line:
    number: int  # in the file, from 1
    custom_id: str | None
    body: dict[str, Any] | None = None
    error: LineError | None = None


def read_lines(f: BinaryIO, start: int, end: int, first_line: int) -> Iterator[tuple[int, bytes]]:
    """(line number, content) of the non-blank lines between two byte offsets."""
    f.seek(start)
    number = first_line
    while f.tell() < end:
        raw = f.readline()
        if not raw:
            return
        if raw.strip():
            yield number, raw
        number += 1


def parse(number: int, raw: bytes, endpoint: str) -> Line:
    """A line as OpenAI's Batch API defines it, its body checked against the endpoint's
    request schema; a line that is not is returned with its ``error``."""
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return Line(number, None, error=LineError("invalid_json_line", "This line is not valid JSON."))
    except RecursionError:  # ~1000 levels deep: it would fail the whole batch's validation
        return Line(number, None, error=LineError("invalid_json_line",
                                                  "This line nests JSON too deeply."))
    if not isinstance(obj, dict):
        return Line(number, None, error=LineError("invalid_json_line", "A line must be a JSON object."))
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid:
        return Line(number, None, error=LineError(
            "invalid_custom_id", "custom_id must be a non-empty string.", "custom_id"))
    error = _check_request(obj, endpoint)
    return Line(number, cid, obj.get("body"), error)


def _check_request(obj: dict[str, Any], endpoint: str) -> LineError | None:
    if obj.get("method") != "POST":
        return LineError("invalid_method", "method must be POST.", "method")
    if obj.get("url") != endpoint:
        return LineError("invalid_url", f"url must be this batch's endpoint, {endpoint}.", "url")
    body = obj.get("body")
    if not isinstance(body, dict):
        return LineError("invalid_body", "body must be a JSON object.", "body")
    if body.get("stream"):
        return LineError("invalid_body", "Batch requests cannot stream.", "body.stream")
    try:
        ENDPOINTS[endpoint].model_validate(body)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        param = param_of(err["loc"], body, err["type"] == "missing")
        return LineError("invalid_body", err["msg"], f"body.{param}" if param else "body")
    return None


def record_id(batch_id: str, number: int) -> str:
    """The same id every time a line is run, so a rerun chunk writes identical records."""
    return f"batch_req_{uuid.uuid5(uuid.NAMESPACE_URL, f'{batch_id}/{number}').hex}"


def response_record(batch_id: str, line: Line, status: int, request_id: str | None,
                    body: Any) -> str:
    return json.dumps({"id": record_id(batch_id, line.number), "custom_id": line.custom_id,
                       "response": {"status_code": status, "request_id": request_id,
                                    "body": body},
                       "error": None}, separators=(",", ":"))


def error_record(batch_id: str, line: Line, error: LineError) -> str:
    return json.dumps({"id": record_id(batch_id, line.number), "custom_id": line.custom_id,
                       "response": None,
                       "error": {"code": error.code, "message": error.message}},
                      separators=(",", ":"))


class TooManyLines(Exception):
    """The input file has more than ``limit`` requests; ``line`` is where reading stopped."""

    def __init__(self, limit: int, line: int):
        super().__init__(f"more than {limit} requests")
        self.limit, self.line = limit, line


def scan(f: BinaryIO, endpoint: str, chunk_lines: int,
         max_lines: int) -> tuple[list[Chunk], dict[int, Line], int]:
    """Validate a whole input file, one line at a time: its chunks (``chunk_lines`` non-blank
    lines each), the lines that are errors (by line number) and the number of requests.
    What it keeps grows with the requests, so past ``max_lines`` of them it stops reading
    and raises ``TooManyLines``."""
    chunks: list[Chunk] = []
    invalid: dict[int, Line] = {}
    seen: set[str] = set()
    offset = start = first = in_chunk = total = 0
    for number, raw in enumerate(f, start=1):
        end = offset + len(raw)
        if raw.strip():
            if total == max_lines:
                raise TooManyLines(max_lines, number)
            if in_chunk == 0:
                start, first = offset, number
            line = parse(number, raw, endpoint)
            if line.error is None and line.custom_id in seen:
                line = Line(number, line.custom_id, error=LineError(
                    "duplicate_custom_id", f"custom_id {line.custom_id!r} is used twice.",
                    "custom_id"))
            if line.custom_id:
                seen.add(line.custom_id)
            if line.error is not None:
                invalid[number] = line
            total += 1
            in_chunk += 1
            if in_chunk == chunk_lines:
                chunks.append(Chunk(start=start, end=end, first_line=first))
                in_chunk = 0
        offset = end
    if in_chunk:
        chunks.append(Chunk(start=start, end=offset, first_line=first))
    return chunks, invalid, total


def invalid_to_json(line: Line) -> str:
    return json.dumps({"custom_id": line.custom_id, **line.error.to_dict(line.number)})


def invalid_from_json(number: int, raw: str) -> Line:
    d = json.loads(raw)
    return Line(number, d["custom_id"], error=LineError(d["code"], d["message"], d["param"]))
