"""Events a backend yields and a worker publishes; the web process turns them into HTTP.

Per generation request the order is: ``Started`` (once), then ``Delta``s / ``ToolCallDelta``s
and one ``Finish`` per choice, then exactly one terminal event: ``Done`` (with usage) or
``Failed``. An embedding request has ``Started`` then one terminal event, ``Embedded`` or
``Failed``. A reader may rely on that: every request ends with a ``TERMINAL`` event, and
nothing follows it.

On the wire a message is a batch: ``{"s": <seq of the first event>, "e": [event, ...]}``, an
event being its fields and ``t`` (its type), less any field that holds its default (a
delta's ``tokens``, ``logprobs``, ``prompt``): a reader fills those in, as ``decode`` does;
sequence numbers let the reader detect a gap (a lost message) instead of guessing. A web
process's own channel carries several jobs' batches in one message, a line each
(``encode_routed``), so one PUBLISH and one read serve every stream of that process a worker
had events for: ``<job id> <seq> <events>``, the events as in a batch, or for a batch that is
one delta of text and nothing else (most of them) ``<job id> <seq> <index> <tokens>
<text as a JSON string>``, read as a ``WireText``: its JSON string goes into the stream's
chunk as it came, the web never decoding it (``web/generation.py``). Job ids hold no space.

A worker may ``coalesce`` a job's consecutive deltas into one before numbering them: the
text, token counts and logprobs of the merged delta are those of its parts, in order.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal, NamedTuple, TypedDict, Union

FinishReason = Literal["stop", "length", "tool_calls", "cancelled"]


class TopLogprob(TypedDict):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TypedDict):
    """One token's log probability, in OpenAI's chat shape (plain JSON floats).

    ``token`` is the token's text (bytes that are not valid UTF-8 on their own are written
    as ``\\xNN``); ``bytes`` are its exact UTF-8 bytes. ``logprob`` is the log-softmax of
    the model's raw logits (before penalties, bias, grammar or temperature), and None only
    for the first token of an echoed prompt, which nothing predicts. ``top_logprobs`` holds
    the job's ``top_logprobs`` most likely alternatives, most likely first.
    """

    token: str
    logprob: float | None
    bytes: list[int]
    top_logprobs: list[TopLogprob]


@dataclass(frozen=True)
class Started:
    worker: str
    prompt_tokens: int
    t: Literal["started"] = "started"


@dataclass(frozen=True)
class Delta:
    """Text of choice ``index``. ``tokens`` is how many completion tokens it holds;
    ``logprobs`` (when the job asks for them) has one entry per token whose text is released
    here, so joining the entries' ``token`` gives the choice's text up to a stop string.
    ``prompt`` marks the echo of the prompt (completions' ``echo``): its tokens are not
    completion tokens."""

    index: int
    text: str
    tokens: int = 1
    logprobs: list[TokenLogprob] | None = None
    prompt: bool = False
    t: Literal["delta"] = "delta"


@dataclass(frozen=True)
class ToolCallDelta:
    """Part of tool call ``call`` (0, 1, ...) of choice ``index``.

    The first delta of a call carries its ``id`` and ``name``; later ones carry only
    fragments of ``arguments``, whose concatenation is the arguments' JSON text. A choice
    with tool calls finishes with ``finish_reason="tool_calls"`` (or ``"length"`` if it was
    cut off, in which case the arguments may be incomplete JSON)."""

    index: int
    call: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None
    tokens: int = 0
    t: Literal["tool_call"] = "tool_call"


@dataclass(frozen=True)
class Finish:
    """``stop_sequence``: the job's stop string that ended the choice (``finish_reason``
    "stop"), where the backend matches stop strings itself; None for the end-of-turn token
    or a backend whose engine matches them (ExLlamaV2)."""

    index: int
    finish_reason: FinishReason
    completion_tokens: int
    stop_sequence: str | None = None
    t: Literal["finish"] = "finish"


@dataclass(frozen=True)
class Done:
    """A generation job's usage. ``cached_tokens``: prompt tokens the backend read from a
    cache instead of evaluating (OpenAI's ``prompt_tokens_details.cached_tokens``; with
    ``n`` choices, those of the choice that reused least). ``evaluated_tokens``: prompt
    tokens it evaluated, all choices together (``n`` choices sharing one evaluation count
    it once); None where a backend does not count them apart from ``cached_tokens``."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    evaluated_tokens: int | None = None
    t: Literal["done"] = "done"

    @property
    def prompt_evaluated(self) -> int:
        if self.evaluated_tokens is not None:
            return self.evaluated_tokens
        return self.prompt_tokens - self.cached_tokens


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


@dataclass(frozen=True)
class EmbeddedParts:
    """An ``EmbeddingPartsJob``'s results, one per part in order: the fields of an
    ``Embedded``, or the ``status`` and ``error`` of a ``Failed`` for a part that failed alone."""

    parts: list[dict[str, Any]]
    prompt_tokens: int
    t: Literal["embedded_parts"] = "embedded_parts"


Event = Union[Started, Delta, ToolCallDelta, Finish, Done, Embedded, EmbeddedParts, Failed]
_TYPES = {cls.t: cls for cls in (Started, Delta, ToolCallDelta, Finish, Done, Embedded,
                                 EmbeddedParts, Failed)}
_FIELDS = {cls: {f.name for f in fields(cls)} for cls in _TYPES.values()}
# Fields with a plain default (not a factory's: each event needs its own of those).
_DEFAULTS = {cls: {f.name: f.default for f in fields(cls) if f.default is not MISSING}
             for cls in _TYPES.values()}
# The last event of a job that succeeded: it carries (or closes) the job's result.
RESULTS = (Done, Embedded, EmbeddedParts)
TERMINAL = (*RESULTS, Failed)


_ENCODER = json.JSONEncoder(separators=(",", ":"))
_string = json.encoder.encode_basestring_ascii  # a JSON string, as _ENCODER writes it


def _delta(e: Delta) -> str:
    """A delta's JSON without its fields that hold their defaults (decoding fills them in):
    the one event sent per token, spelled by hand at an eighth of the encoder's cost."""
    out = '{"index":%d,"text":%s' % (e.index, _string(e.text))
    if e.tokens != 1:
        out += ',"tokens":%d' % e.tokens
    if e.logprobs is not None:
        out += ',"logprobs":' + _ENCODER.encode(e.logprobs)
    if e.prompt:
        out += ',"prompt":true'
    return out + ',"t":"delta"}'


def _json(e: Event) -> str:
    # An event's __dict__ is its fields (their values are plain JSON already): asdict's
    # recursive deep copy cost more than the JSON itself.
    return _delta(e) if type(e) is Delta else _ENCODER.encode(vars(e))


def encode(first_seq: int, events: list[Event]) -> str:
    """A batch, as ``decode`` reads it. A field may be left out where it holds its default."""
    return '{"s":%d,"e":[%s]}' % (first_seq, ",".join(map(_json, events)))


def routed(job_id: str, first_seq: int, evs: list[Event], message: str) -> str:
    """The job's line in a message for a web process's channel (``encode_routed``), from
    the batch's ``message`` (``encode(first_seq, evs)``: each batch is encoded once, for
    the job's replay buffer and for this). Ferry's job ids (a prefix and a uuid) hold no
    space; one that did would make the line unreadable, failing its web's streams."""
    if len(evs) == 1:
        ev = evs[0]
        if type(ev) is Delta and ev.text and ev.logprobs is None and not ev.prompt:
            return "%s %d %d %d %s" % (job_id, first_seq, ev.index, ev.tokens, _string(ev.text))
    return "%s %d %s" % (job_id, first_seq, message[message.index("["):-1])


def encode_routed(lines: list[str]) -> str:
    """One message for a web process's channel: its jobs' ``routed`` lines."""
    return "\n".join(lines)


class WireText(NamedTuple):
    """A batch of one ``Delta`` that is only text, as a web process's channel carries it:
    ``text`` is the text as a JSON string (ASCII, quotes included), as the stream's chunk
    holds it."""

    index: int
    tokens: int
    text: bytes

    def events(self) -> list[Event]:
        return [Delta(self.index, json.loads(self.text), self.tokens)]


def _events(raw: list[dict]) -> list[Event]:
    return [_decoded(e) for e in raw]


def _decoded(e: dict) -> Event:
    cls = _TYPES[e["t"]]
    d = {**_DEFAULTS[cls], **e}
    if d.keys() == _FIELDS[cls]:
        # Every field there and no other (those left out hold plain defaults): the dict
        # becomes the event's own, without a call to its __init__ (once per token on the web).
        ev = object.__new__(cls)
        object.__setattr__(ev, "__dict__", d)
        return ev
    return cls(**e)  # a field missing or unknown: the constructor says which


def decode(data: str | bytes) -> tuple[int, list[Event]]:
    msg = json.loads(data)
    return msg["s"], _events(msg["e"])


def decode_routed(data: str | bytes) -> list[tuple[str, int, "list[Event] | WireText"]]:
    """``(job id, first seq, events or WireText)`` per line of ``encode_routed``; also a
    message of the JSON form before it (``[{"j": ..., "s": ..., "e": [...]}, ...]``, which
    no job id starts like), sent by a worker not yet upgraded."""
    if isinstance(data, str):
        data = data.encode()
    if data[:1] == b"[":
        return [(m["j"], m["s"], _events(m["e"])) for m in json.loads(data)]
    out = []
    for line in data.split(b"\n"):
        job_id, seq, body = line.split(b" ", 2)
        if body[0] == 0x5B:  # [: the batch's events
            out.append((job_id.decode(), int(seq), _events(json.loads(body))))
        else:
            index, tokens, text = body.split(b" ", 2)
            if text[0] != 0x22:  # "
                raise ValueError("a routed text is not a JSON string")
            out.append((job_id.decode(), int(seq), WireText(int(index), int(tokens), text)))
    return out


def _merge(a: Event, b: Event) -> Event | None:
    """``a`` and ``b`` as one event, or None if they cannot be one."""
    if type(a) is not type(b) or a.index != b.index:
        return None
    if isinstance(a, Delta):
        if a.prompt != b.prompt or (a.logprobs is None) != (b.logprobs is None):
            return None
        return Delta(a.index, a.text + b.text, a.tokens + b.tokens,
                     None if a.logprobs is None else a.logprobs + b.logprobs, a.prompt)
    if isinstance(a, ToolCallDelta):
        if a.call != b.call or b.id is not None or b.name is not None:
            return None
        return ToolCallDelta(a.index, a.call, a.arguments + b.arguments, a.id, a.name,
                             a.tokens + b.tokens)
    return None


def coalesce(evs: list[Event]) -> list[Event]:
    """Consecutive deltas of one choice (text, or one tool call's argument fragments)
    merged into one; every other event kept as it is, in order."""
    out: list[Event] = []
    for ev in evs:
        merged = _merge(out[-1], ev) if out and isinstance(ev, (Delta, ToolCallDelta)) else None
        if merged is None:
            out.append(ev)
        else:
            out[-1] = merged
    return out


def failed(err) -> Failed:
    """A ``Failed`` event from a ``config.errors.FerryError``."""
    return Failed(status=err.status, error=err.to_dict())
