"""Events a backend yields and a worker publishes; the web process turns them into HTTP.

Per generation request the order is: ``Started`` (once), then ``Delta``s and one ``Finish``
per choice, then exactly one terminal event: ``Done`` (with usage) or ``Failed``. An
embedding request has ``Started`` then one terminal event, ``Embedded`` or ``Failed``. A
reader may rely on that: every request ends with a ``TERMINAL`` event, and nothing follows it.

On the wire a message is a batch: ``{"s": <seq of the first event>, "e": [event, ...]}``;
sequence numbers let the reader detect a gap (a lost message) instead of guessing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Union

FinishReason = Literal["stop", "length", "tool_calls", "cancelled"]


@dataclass(frozen=True)
class Started:
    worker: str
    prompt_tokens: int
    t: Literal["started"] = "started"


@dataclass(frozen=True)
class Delta:
    index: int
    text: str
    tokens: int = 1
    logprobs: list[dict[str, Any]] | None = None
    t: Literal["delta"] = "delta"


@dataclass(frozen=True)
class Finish:
    index: int
    finish_reason: FinishReason
    completion_tokens: int
    t: Literal["finish"] = "finish"


@dataclass(frozen=True)
class Done:
    prompt_tokens: int
    completion_tokens: int
    t: Literal["done"] = "done"


@dataclass(frozen=True)
class Failed:
    status: int
    error: dict[str, Any] = field(default_factory=dict)
    t: Literal["failed"] = "failed"


@dataclass(frozen=True)
class Embedded:
    """An embedding job's vectors: ``count`` rows of ``dimensions``, as base64 of
    little-endian float32 (``models/vectors.py``): exact, and a third the size of JSON."""

    data: str
    count: int
    dimensions: int
    prompt_tokens: int
    t: Literal["embedded"] = "embedded"


Event = Union[Started, Delta, Finish, Done, Embedded, Failed]
_TYPES = {cls.t: cls for cls in (Started, Delta, Finish, Done, Embedded, Failed)}
TERMINAL = (Done, Embedded, Failed)


def encode(first_seq: int, events: list[Event]) -> str:
    return json.dumps({"s": first_seq, "e": [asdict(e) for e in events]}, separators=(",", ":"))


def decode(data: str | bytes) -> tuple[int, list[Event]]:
    msg = json.loads(data)
    return msg["s"], [_TYPES[e["t"]](**e) for e in msg["e"]]


def failed(err) -> Failed:
    """A ``Failed`` event from a ``config.errors.FerryError``."""
    return Failed(status=err.status, error=err.to_dict())
