"""From sampled tokens to one choice's events; shared by every backend.

A backend feeds each sampled token's bytes (and its log probability entry, when asked for);
``ChoiceWriter`` decodes UTF-8 across token boundaries (a character cut by the choice's end
is dropped), holds back text that may be the start of a stop string, splits tool calls from
text (``models.tools``), and releases each token's log probability with the text it
produced.
"""

from __future__ import annotations

import codecs
import queue
from collections.abc import Callable
from typing import Any

from config.errors import FerryError

from config.contract.events import Delta, Event, Finish, FinishReason, TokenLogprob, ToolCallDelta
from models.stops import StopMatcher
from models.tools import CallParser, CallPiece


class ChoiceWriter:
    def __init__(self, index: int, stops: list[str], calls: CallParser | None = None):
        self.index = index
        self.tokens = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._stops = StopMatcher(stops)
        self._calls = calls
        self._pending = 0
        self._logprobs: list[TokenLogprob] = []

    @property
    def stopped(self) -> bool:
        """A stop string was generated: the choice is over."""
        return self._stops.stopped

    def add(self, piece: bytes, logprob: TokenLogprob | None = None) -> list[Event]:
        self.tokens += 1
        self._pending += 1
        if logprob is not None:
            self._logprobs.append(logprob)
        return self._release(self._decoder.decode(piece), final=False)

    def add_text(self, text: str, tokens: int,
                 logprobs: list[TokenLogprob] | None = None) -> list[Event]:
        """Text an engine has decoded itself (ExLlamaV2 releases several tokens' text at once,
        and matches stop strings itself: give this writer no ``stops`` then)."""
        self.tokens += tokens
        self._pending += tokens
        self._logprobs.extend(logprobs or ())
        return self._release(text, final=False)

    def finish(self, reason: FinishReason) -> list[Event]:
        # The bytes of a character the choice stopped in the middle of (cut at max_tokens,
        # say) are dropped, not released as U+FFFD: the text ends with the last whole
        # character. Bytes that can never be UTF-8 were replaced as they came.
        self._decoder.reset()
        out = self._release("", final=True)
        if self._calls is not None and self._calls.called:
            self._logprobs = []  # log probabilities are reported for text, not for calls
        if self._pending:
            out.append(self._delta(""))
        if self._calls is not None and self._calls.called and reason == "stop":
            reason = "tool_calls"
        out.append(Finish(self.index, reason, self.tokens,
                          self._stops.matched if reason == "stop" else None))
        return out

    def _release(self, text: str, final: bool) -> list[Event]:
        if self._calls is None:
            parts: list[str | CallPiece] = [text]
        else:
            parts = self._calls.feed(text) + (self._calls.finish() if final else [])
        out: list[Event] = []
        released = ""
        for part in parts:
            if isinstance(part, CallPiece):
                out.append(ToolCallDelta(self.index, 0, part.arguments, part.id, part.name,
                                         tokens=self._pending))
                self._pending, self._logprobs = 0, []
            else:
                released += self._stops.feed(part)
        if final:
            released += self._stops.flush()
        if released:
            out.append(self._delta(released))
        return out

    def _delta(self, text: str) -> Delta:
        d = Delta(self.index, text, tokens=self._pending, logprobs=self._logprobs or None)
        self._pending, self._logprobs = 0, []
        return d


class Outbox(queue.Queue):
    """A job's events, from the thread of the loop that makes every job's tokens to the job's
    own (task) thread. With ``direct`` (``Backend.supports_direct``), each delta is handed to
    it on the loop's thread, as it is made, instead of being queued: the task thread is not
    woken for every token of every job (a batching GPU engine makes one per job per step:
    32 or 64 task threads woken each step, each taking the GIL in turn, cost 45–55 µs more
    CPU per token and slowed the loop's steps by 1–4%, ``bench/handover.py``); it wakes for
    the choices' finishes and errors. ``direct`` must not block."""

    def __init__(self, direct: Callable[[Event], None] | None = None):
        super().__init__()
        self.direct = direct

    def put(self, item, block: bool = True, timeout: float | None = None) -> None:
        direct = self.direct
        if direct is not None and (type(item) is Delta or type(item) is ToolCallDelta):
            direct(item)
        else:
            super().put(item, block, timeout)


# What a cancel puts in a job's outbox to wake its task thread (``follow_choices``).
_WAKE = object()
# How often a task thread woken by its cancel flag looks anyway.
WAKE_POLL = 5.0


def follow_choices(out: queue.Queue, open_: dict[int, Any], cancel: Callable[[Any], None],
                   cancelled: Callable[[], bool], poll: float):
    """Yield a job's choice events from ``out`` until every choice in ``open_`` (index ->
    the engine's handle) has finished; return the tokens generated.

    Shared by the batching backends, whose engine thread writes Deltas, ToolCallDeltas,
    Finishes or a ``FerryError`` to ``out`` (an ``Outbox``: with ``direct``, the deltas go
    there instead, and only finishes and errors come here). Once ``cancelled()``, every open
    choice is cancelled and only Finishes are passed on (nothing more reaches a client that has gone);
    an error in one choice, or the consumer closing us, cancels the others too.

    ``cancelled()`` is looked at every ``poll`` seconds while no event comes, or, when it is
    a ``models.base.CancelFlag``, when it is set (and every ``WAKE_POLL`` s, to be safe): a
    running choice whose deltas go ``direct`` sends nothing here until it finishes.
    """
    total, cancelling = 0, False
    on_set = getattr(cancelled, "on_set", None)
    if on_set is not None:
        on_set(lambda: out.put(_WAKE))
        poll = max(poll, WAKE_POLL)
    try:
        while open_:
            if not cancelling and cancelled():
                cancelling = True
                for handle in open_.values():
                    cancel(handle)
            try:
                item = out.get(timeout=poll)
            except queue.Empty:
                continue
            if item is _WAKE:
                continue
            if isinstance(item, FerryError):
                raise item
            if isinstance(item, Finish):
                del open_[item.index]
                total += item.completion_tokens
                yield item
            elif not cancelling:
                yield item
        return total
    finally:
        for handle in open_.values():
            cancel(handle)
