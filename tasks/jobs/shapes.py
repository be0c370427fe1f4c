"""OpenAI response bodies and stream chunks, assembled from a job's events.

Used by the web (streaming and collecting a synchronous reply) and by the worker runtime
(the result of a job), so that ``GET /v1/jobs/{id}`` shows exactly the body the synchronous
endpoint returned or would have returned.
"""

from __future__ import annotations

import time
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict

from models import events

Endpoint = Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]


def now() -> int:
    return int(time.time())


def usage_of(done: events.Done) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def public_reason(reason: str) -> str:
    # OpenAI has no "cancelled"; a cancelled choice simply stopped.
    return "stop" if reason == "cancelled" else reason


class Outcome:
    """A job's events folded into what its final body needs: text and finish per choice."""

    def __init__(self):
        self.texts: dict[int, str] = {}
        self.finishes: dict[int, str] = {}
        self.usage: dict | None = None

    def add(self, ev: events.Event) -> None:
        if isinstance(ev, events.Delta):
            self.texts[ev.index] = self.texts.get(ev.index, "") + ev.text
        elif isinstance(ev, events.Finish):
            self.finishes[ev.index] = ev.finish_reason
        elif isinstance(ev, events.Done):
            self.usage = usage_of(ev)

    @property
    def cancelled(self) -> bool:
        return "cancelled" in self.finishes.values()

    def body(self, shape: "Shape") -> dict:
        """The final body; only once ``Done`` was added (backends end every job with it)."""
        assert self.usage is not None, "body() before Done"
        finishes = {i: public_reason(r) for i, r in self.finishes.items()}
        return shape.response(self.texts, finishes, self.usage)


class Shape(Protocol):
    """How one endpoint spells its responses (see ``ShapeBase``)."""

    def chunk(self, index: int, ev: events.Event | None) -> dict | None:
        """A stream chunk for a Delta or Finish; with ``ev=None``, the choice's opening chunk
        (None if the endpoint has none)."""

    def usage_chunk(self, usage: dict) -> dict: ...
    def response(self, texts: dict[int, str], finishes: dict[int, str], usage: dict) -> dict: ...


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


class ChatShape(ShapeBase):
    object = "chat.completion.chunk"

    def chunk(self, index: int, ev: events.Event | None) -> dict:
        if ev is None:
            delta, reason = {"role": "assistant", "content": ""}, None
        elif isinstance(ev, events.Delta):
            delta, reason = {"content": ev.text}, None
        else:
            delta, reason = {}, public_reason(ev.finish_reason)
        return self._chunk([{"index": index, "delta": delta, "logprobs": None,
                             "finish_reason": reason}])

    def response(self, texts: dict[int, str], finishes: dict[int, str], usage: dict) -> dict:
        choices = [{"index": i,
                    "message": {"role": "assistant", "content": texts.get(i, ""), "refusal": None},
                    "logprobs": None, "finish_reason": finishes.get(i, "stop")}
                   for i in sorted(finishes)]
        return {**self.base, "object": "chat.completion", "choices": choices, "usage": usage}


class CompletionShape(ShapeBase):
    object = "text_completion"

    def __init__(self, job_id: str, model: str, created: int | None = None,
                 echo: str | None = None):
        super().__init__(job_id, model, created)
        self.echo = echo

    def chunk(self, index: int, ev: events.Event | None) -> dict | None:
        if ev is None:
            if not self.echo:
                return None
            text, reason = self.echo, None
        elif isinstance(ev, events.Delta):
            text, reason = ev.text, None
        else:
            text, reason = "", public_reason(ev.finish_reason)
        return self._chunk([{"text": text, "index": index, "logprobs": None,
                             "finish_reason": reason}])

    def response(self, texts: dict[int, str], finishes: dict[int, str], usage: dict) -> dict:
        choices = [{"text": (self.echo or "") + texts.get(i, ""), "index": i, "logprobs": None,
                    "finish_reason": finishes.get(i, "stop")} for i in sorted(finishes)]
        return {**self.base, "choices": choices, "usage": usage}


class ResponseSpec(BaseModel):
    """What, beyond the events, a job's responses depend on; stored with the job so that the
    worker can spell the result as the endpoint would have."""

    model_config = ConfigDict(frozen=True)

    endpoint: Endpoint
    # /v1/completions with ``echo``: the prompt, repeated before the completion.
    echo: str | None = None

    def shape(self, job_id: str, model: str, created: int) -> Shape:
        if self.endpoint == "/v1/chat/completions":
            return ChatShape(job_id, model, created)
        if self.endpoint == "/v1/completions":
            return CompletionShape(job_id, model, created, self.echo)
        raise ValueError(f"no response shape for {self.endpoint}")
