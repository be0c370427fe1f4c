"""OpenAI response bodies and stream chunks, assembled from a job's events.

Used by the web (streaming and collecting a synchronous reply) and by the worker runtime
(the result of a job), so that ``GET /v1/jobs/{id}`` shows exactly the body the synchronous
endpoint returned or would have returned.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict

import numpy as np

from config.contract import events
from config.contract.events import TokenLogprob
from models.vectors import from_base64, to_base64

Endpoint = Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]


def now() -> int:
    return int(time.time())


def usage_of(done: events.Done) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": done.cached_tokens}}


def public_reason(reason: str) -> str:
    # OpenAI has no "cancelled"; a cancelled choice simply stopped.
    return "stop" if reason == "cancelled" else reason


@dataclass
class ChoiceResult:
    """One choice's whole result, gathered from its events (``add`` runs once per token in
    the worker: it does no more than it must)."""

    # The text's pieces, joined when read (``text``): appending is O(1) per token.
    pieces: list[str] = field(default_factory=list, repr=False)
    # Every token's entry, the echoed prompt's first.
    logprobs: list[TokenLogprob] = field(default_factory=list)
    # Log probabilities of the generated tokens only (to rank best_of candidates).
    completion_logprobs: list[float] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    cancelled: bool = False

    @property
    def text(self) -> str:
        if len(self.pieces) > 1:
            self.pieces[:] = ["".join(self.pieces)]
        return self.pieces[0] if self.pieces else ""

    def add(self, ev: events.Event) -> None:
        kind = type(ev)
        if kind is events.Delta:
            self.pieces.append(ev.text)
            if ev.logprobs:
                self.logprobs.extend(ev.logprobs)
                if not ev.prompt:
                    self.completion_logprobs.extend(
                        e["logprob"] for e in ev.logprobs if e["logprob"] is not None)
        elif kind is events.ToolCallDelta:
            if ev.call == len(self.tool_calls):
                self.tool_calls.append({"id": ev.id, "type": "function",
                                        "function": {"name": ev.name, "arguments": ""}})
            self.tool_calls[ev.call]["function"]["arguments"] += ev.arguments
        elif kind is events.Finish:
            self.cancelled = ev.finish_reason == "cancelled"
            self.finish_reason = public_reason(ev.finish_reason)

    @property
    def mean_logprob(self) -> float:
        lps = self.completion_logprobs
        return sum(lps) / len(lps) if lps else float("-inf")


_CHOICE_EVENTS = frozenset((events.Delta, events.ToolCallDelta, events.Finish))


class Outcome:
    """A job's events folded into what its final body needs."""

    def __init__(self):
        self.choices: dict[int, ChoiceResult] = {}
        self.usage: dict | None = None
        self.embedded: events.Embedded | None = None
        self.parts: list[dict] | None = None

    def add(self, ev: events.Event) -> None:
        if type(ev) in _CHOICE_EVENTS:
            choice = self.choices.get(ev.index)
            if choice is None:
                choice = self.choices[ev.index] = ChoiceResult()
            choice.add(ev)
        elif isinstance(ev, events.Done):
            self.usage = usage_of(ev)
        elif isinstance(ev, events.Embedded):
            self.embedded = ev
            self.usage = {"prompt_tokens": ev.prompt_tokens, "total_tokens": ev.prompt_tokens}
        elif isinstance(ev, events.EmbeddedParts):
            self.parts = ev.parts
            self.usage = {"prompt_tokens": ev.prompt_tokens, "total_tokens": ev.prompt_tokens}

    @property
    def cancelled(self) -> bool:
        return any(c.cancelled for c in self.choices.values())

    def body(self, shape: "Shape") -> dict:
        """The final body; only once the job's ``Done`` (or ``Embedded``) was added."""
        assert self.usage is not None, "body() before the job's last event"
        return shape.body(self)


class Shape(Protocol):
    """How one endpoint spells its responses (see ``ShapeBase``)."""

    def chunk(self, index: int, ev: events.Event | None) -> dict | None:
        """A stream chunk for a Delta, ToolCallDelta or Finish (None: nothing to send);
        with ``ev=None``, the choice's opening chunk (None if the endpoint has none)."""

    def usage_chunk(self, usage: dict) -> dict: ...
    def body(self, outcome: Outcome) -> dict: ...


class ShapeBase:
    """What every response of one request shares: id, object, created, model."""

    object = ""

    def __init__(self, job_id: str, model: str, created: int | None = None):
        self.base = {"id": job_id, "object": self.object,
                     "created": now() if created is None else created, "model": model,
                     "system_fingerprint": None}

    def _chunk(self, choices: list[dict]) -> dict:
        return {**self.base, "choices": choices}

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._chunk([]), "usage": usage}

    def body(self, outcome: Outcome) -> dict:
        return self.response(outcome.choices, outcome.usage)

    def response(self, choices: dict[int, ChoiceResult], usage: dict) -> dict:
        raise NotImplementedError


class _NotStreamed:
    """Embedding responses: a body, never stream chunks."""

    def chunk(self, index: int, ev: events.Event | None) -> dict | None:
        return None

    def usage_chunk(self, usage: dict) -> dict:
        return {"usage": usage}


class EmbeddingShape(_NotStreamed):
    """``/v1/embeddings``: a list of vectors, as floats or base64 (little-endian float32)."""

    def __init__(self, model: str, encoding_format: str):
        self.model, self.encoding_format = model, encoding_format

    def body(self, outcome: Outcome) -> dict:
        return self.vectors(outcome.embedded)

    def vectors(self, ev: events.Embedded) -> dict:
        vectors = from_base64(ev.data, ev.dimensions)
        if self.encoding_format == "base64":
            rows = [to_base64(v) for v in vectors]
        else:  # float32 values, written exactly (a float64 holds every float32)
            rows = vectors.astype(np.float64).tolist()
        return {"object": "list",
                "data": [{"object": "embedding", "index": i, "embedding": row}
                         for i, row in enumerate(rows)],
                "model": self.model,
                "usage": {"prompt_tokens": ev.prompt_tokens, "total_tokens": ev.prompt_tokens}}


class EmbeddingPartsShape(_NotStreamed):
    """An ``EmbeddingPartsJob``: per part, the status and body ``/v1/embeddings`` would have
    answered that request with, each in its own ``encoding_format``."""

    def __init__(self, model: str, formats: list[str]):
        self.model, self.formats = model, formats

    def body(self, outcome: Outcome) -> dict:
        return {"object": "list", "model": self.model, "usage": outcome.usage,
                "data": [self.part(p, fmt) for p, fmt in zip(outcome.parts, self.formats)]}

    def part(self, part: dict, encoding_format: str) -> dict:
        if "error" in part:
            return {"status": part["status"], "body": {"error": part["error"]}}
        shape = EmbeddingShape(self.model, encoding_format)
        return {"status": 200, "body": shape.vectors(events.Embedded(**part))}


def tool_call_delta(ev: events.ToolCallDelta) -> dict:
    """OpenAI's streaming shape: id, type and name first, then argument fragments."""
    if ev.id is not None:
        return {"index": ev.call, "id": ev.id, "type": "function",
                "function": {"name": ev.name, "arguments": ev.arguments}}
    return {"index": ev.call, "function": {"arguments": ev.arguments}}


class ChatShape(ShapeBase):
    object = "chat.completion.chunk"

    def __init__(self, job_id: str, model: str, created: int | None = None,
                 logprobs: bool = False):
        super().__init__(job_id, model, created)
        self.logprobs = logprobs

    def chunk(self, index: int, ev: events.Event | None) -> dict:
        logprobs = None
        if ev is None:
            delta, reason = {"role": "assistant", "content": ""}, None
        elif isinstance(ev, events.Delta):
            delta, reason = {"content": ev.text}, None
            logprobs = self._logprobs(ev.logprobs or [])
        elif isinstance(ev, events.ToolCallDelta):
            delta, reason = {"tool_calls": [tool_call_delta(ev)]}, None
        else:
            delta, reason = {}, public_reason(ev.finish_reason)
        return self._chunk([{"index": index, "delta": delta, "logprobs": logprobs,
                             "finish_reason": reason}])

    def _logprobs(self, entries: list) -> dict | None:
        return {"content": entries, "refusal": None} if self.logprobs else None

    def response(self, choices: dict[int, ChoiceResult], usage: dict) -> dict:
        out = []
        for i in sorted(choices):
            c = choices[i]
            message = {"role": "assistant", "content": c.text or (None if c.tool_calls else ""),
                       "refusal": None}
            if c.tool_calls:
                message["tool_calls"] = c.tool_calls
            out.append({"index": i, "message": message, "logprobs": self._logprobs(c.logprobs),
                        "finish_reason": c.finish_reason or "stop"})
        return {**self.base, "object": "chat.completion", "choices": out, "usage": usage}


def legacy_logprobs(entries: list[TokenLogprob], offset: int) -> dict:
    """OpenAI's completions shape; ``offset``: where the first token starts in the text."""
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        out["tokens"].append(e["token"])
        out["token_logprobs"].append(e["logprob"])
        out["top_logprobs"].append(
            None if e["logprob"] is None else {t["token"]: t["logprob"] for t in e["top_logprobs"]})
        out["text_offset"].append(offset)
        offset += len(e["token"])
    return out


class CompletionShape(ShapeBase):
    object = "text_completion"

    def __init__(self, job_id: str, model: str, created: int | None = None,
                 logprobs: bool = False, n: int = 1, candidates: int = 1):
        super().__init__(job_id, model, created)
        self.logprobs, self.n, self.candidates = logprobs, n, candidates
        self._offsets: dict[int, int] = {}

    def chunk(self, index: int, ev: events.Event | None) -> dict | None:
        if ev is None:
            return None
        logprobs = None
        if isinstance(ev, events.Delta):
            text, reason = ev.text, None
            if self.logprobs:
                logprobs = legacy_logprobs(ev.logprobs or [], self._offsets.get(index, 0))
                self._offsets[index] = self._offsets.get(index, 0) + \
                    sum(len(t) for t in logprobs["tokens"])
        elif isinstance(ev, events.Finish):
            text, reason = "", public_reason(ev.finish_reason)
        else:
            return None
        return self._chunk([{"text": text, "index": index, "logprobs": logprobs,
                             "finish_reason": reason}])

    def response(self, choices: dict[int, ChoiceResult], usage: dict) -> dict:
        out = [{"text": c.text, "index": i,
                "logprobs": legacy_logprobs(c.logprobs, 0) if self.logprobs else None,
                "finish_reason": c.finish_reason or "stop"}
               for i, c in enumerate(self._best(choices))]
        return {**self.base, "choices": out, "usage": usage}

    def _best(self, choices: dict[int, ChoiceResult]) -> list[ChoiceResult]:
        """Per prompt, the ``n`` candidates of highest mean log probability (best_of), in
        that order; without best_of, every choice in index order."""
        if self.candidates == self.n:
            return [choices[i] for i in sorted(choices)]
        best = []
        for first in range(0, len(choices), self.candidates):
            group = [choices[i] for i in range(first, first + self.candidates) if i in choices]
            best.extend(sorted(group, key=lambda c: c.mean_logprob, reverse=True)[:self.n])
        return best


class ResponseSpec(BaseModel):
    """What, beyond the events, a job's responses depend on; stored with the job so that the
    worker can spell the result as the endpoint would have."""

    model_config = ConfigDict(frozen=True)

    endpoint: Endpoint
    # Chat: logprobs asked for; completions: the legacy ``logprobs`` was given.
    logprobs: bool = False
    # Completions: choices returned per prompt, and candidates generated (best_of).
    n: int = 1
    candidates: int = 1
    # Embeddings: "float" or "base64"; for an EmbeddingPartsJob, one per part.
    encoding_format: str = "float"
    part_formats: list[str] | None = None

    def shape(self, job_id: str, model: str, created: int | None = None) -> Shape:
        if self.endpoint == "/v1/chat/completions":
            return ChatShape(job_id, model, created, self.logprobs)
        if self.endpoint == "/v1/completions":
            return CompletionShape(job_id, model, created, self.logprobs, self.n,
                                   self.candidates)
        if self.endpoint == "/v1/embeddings" and self.part_formats is not None:
            return EmbeddingPartsShape(model, self.part_formats)
        if self.endpoint == "/v1/embeddings":
            return EmbeddingShape(model, self.encoding_format)
        raise ValueError(f"no response shape for {self.endpoint}")
