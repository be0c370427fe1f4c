"""One choice's whole result, gathered from its events for a non-streaming response."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from models import events
from models.events import TokenLogprob


@dataclass
class ChoiceResult:
    text: str = ""
    # Every token's entry, the echoed prompt's first.
    logprobs: list[TokenLogprob] = field(default_factory=list)
    # Log probabilities of the generated tokens only (to rank best_of candidates).
    completion_logprobs: list[float] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, ev: events.Event) -> None:
        if isinstance(ev, events.Delta):
            self.text += ev.text
            self.logprobs.extend(ev.logprobs or ())
            if not ev.prompt:
                self.completion_logprobs.extend(
                    e["logprob"] for e in ev.logprobs or () if e["logprob"] is not None)
        elif isinstance(ev, events.ToolCallDelta):
            if ev.call == len(self.tool_calls):
                self.tool_calls.append({"id": ev.id, "type": "function",
                                        "function": {"name": ev.name, "arguments": ""}})
            self.tool_calls[ev.call]["function"]["arguments"] += ev.arguments
        elif isinstance(ev, events.Finish):
            self.finish_reason = "stop" if ev.finish_reason == "cancelled" else ev.finish_reason

    @property
    def mean_logprob(self) -> float:
        lps = self.completion_logprobs
        return sum(lps) / len(lps) if lps else float("-inf")
