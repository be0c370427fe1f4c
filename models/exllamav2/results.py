"""ExLlamaV2 result dicts of one job, as the Delta and Finish events of one choice.

The keys are those of exllamav2 0.3.2's ``ExLlamaV2DynamicGenerator.iterate()``. A
``streaming`` result may carry several tokens (text held back while a stop string or a
multi-byte character was unresolved is released at once) or none (while text is held).
A reply that may be a tool call goes through the ``ChoiceWriter`` every backend shares, so
calls come out as the same ``ToolCallDelta``s as from llama.cpp.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from config.contract.events import Delta, Event, Finish
from models.output import ChoiceWriter
from models.tools import CallParser

# log(0) for tokens the sampler truncated away: JSON has no -inf. OpenAI uses -9999.
FLOOR_LOGPROB = -9999.0


def _logprob(p: float) -> float:
    return math.log(p) if p > 0 else FLOOR_LOGPROB


class ChoiceStream:
    """Events of choice ``index``. ``piece`` maps a token id to its text as exllamav2 decodes
    it (special tokens not decoded); ``logprobs``: the results carry probabilities;
    ``calls``: the reply may be (or must be) a tool call in that parser's format."""

    def __init__(self, index: int, piece: Callable[[int], str] | None = None,
                 logprobs: bool = False, calls: CallParser | None = None):
        self.index = index
        self.piece = piece
        self.logprobs = logprobs
        self.tokens = 0  # tokens seen in results so far
        # Prompt tokens the generator found in its cache (pages of earlier jobs), at the end.
        self.cached = 0
        # Stop strings are matched by exllamav2 itself: the writer only splits calls off.
        self.writer = ChoiceWriter(index, [], calls) if calls is not None else None

    def feed(self, r: dict[str, Any]) -> list[Event]:
        if r["stage"] != "streaming":
            return []
        ids = r.get("token_ids")
        ids = [] if ids is None else ids[0].tolist()
        self.tokens += len(ids)
        events: list[Event] = []
        text = r.get("text", "")
        if r["eos"] and r.get("eos_reason") == "max_new_tokens" and text.endswith("\ufffd"):
            # Cut inside a character: exllamav2 releases the pieces it held for it, each a
            # U+FFFD. The reply ends before that character, as the llama.cpp backend's does.
            text = text.rstrip("\ufffd")
        if text or ids:
            events += self._emit(text, len(ids), self._logprobs(r, ids))
        if r["eos"]:
            held = self._held_before_stop_token(r)
            if held:
                events += self._emit(*held)
            events += self._finish(r)
        return events

    def _emit(self, text: str, tokens: int, logprobs: list | None = None) -> list[Event]:
        if self.writer is None:
            return [Delta(self.index, text, tokens=tokens, logprobs=logprobs)]
        return self.writer.add_text(text, tokens, logprobs)

    def cancelled(self) -> Finish:
        return Finish(self.index, "cancelled", self.tokens)

    def cut(self) -> list[Event]:
        """The end of a choice stopped by its job's time budget: "length", as at max_tokens."""
        if self.writer is None:
            return [Finish(self.index, "length", self.tokens)]
        *events, last = self.writer.finish("length")
        return [*events, Finish(self.index, last.finish_reason, self.tokens)]

    def _finish(self, r: dict[str, Any]) -> list[Event]:
        self.cached = r.get("cached_tokens") or 0
        reason = r["eos_reason"]
        generated = r["new_tokens"]
        if reason == "stop_token":
            # exllamav2 counts the stop token it sampled; it is not part of the completion
            # (the llama.cpp backend does not count its end-of-generation token either).
            generated -= 1
        finish = "length" if reason == "max_new_tokens" else "stop"
        if self.writer is None:
            return [Finish(self.index, finish, generated)]
        # The writer releases what it held back and says "tool_calls" for a finished call.
        *events, last = self.writer.finish(finish)
        return [*events, Finish(self.index, last.finish_reason, generated)]

    def _held_before_stop_token(self, r: dict[str, Any]) -> tuple[str, int] | None:
        """Text exllamav2 was holding back (a possible stop string's start, or half a UTF-8
        character) when a stop token came: it drops it, though it is output like any other;
        the llama.cpp backend returns it too. The held text ends with the stop token's own
        piece, which is not output."""
        held = r.get("held") or {}
        if r.get("eos_reason") != "stop_token" or not held.get("text") or self.piece is None:
            return None
        ids = held["token_ids"][0].tolist() if held.get("token_ids") is not None else []
        text, stop = held["text"], self.piece(r["eos_triggering_token_id"])
        if stop and text.endswith(stop):
            text = text[: -len(stop)]
        count = max(len(ids) - 1, 0)
        self.tokens += count
        return (text, count) if text else None

    def _logprobs(self, r: dict[str, Any], ids: list[int]) -> list[dict[str, Any]] | None:
        if not self.logprobs or self.piece is None or "token_probs" not in r or not ids:
            return None
        probs = r["token_probs"][0].tolist()
        top_ids = r["top_k_tokens"][0].tolist() if "top_k_tokens" in r else [[] for _ in ids]
        top_probs = r["top_k_probs"][0].tolist() if "top_k_probs" in r else [[] for _ in ids]
        return [{**self._entry(tok, p),
                 "top_logprobs": [self._entry(t, q) for t, q in zip(alt_ids, alt_probs)]}
                for tok, p, alt_ids, alt_probs in zip(ids, probs, top_ids, top_probs)]

    def _entry(self, token: int, p: float) -> dict[str, Any]:
        text = self.piece(token)
        return {"token": text, "logprob": _logprob(p), "bytes": list(text.encode())}
