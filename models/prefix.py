"""Prompt prefix reuse in the CPU backend: which idle llama.cpp sequence a new choice takes.

A finished choice leaves its tokens (its prompt, then the tokens it generated and decoded) in
its sequence's KV cache. Chat traffic resends the whole conversation every turn, so the next
turn's prompt starts with those tokens: the choice that takes that sequence keeps the common
prefix, drops the rest and evaluates only its own suffix.

The policy: the idle sequence with the longest common token prefix, among those of which
the choice keeps at least half (an empty one included); among equals, the least recently
used. When none qualifies, the least recently used sequence is evicted (what it shares with
the prompt is still kept). The half rule keeps a short match (the chat template's opening
tokens, a common first word) from evicting another conversation's cache, while a long
shared system prompt is still taken wherever it is. The prefix is exact (the same token ids
at the same positions), and at least the prompt's last token is always evaluated: its
logits give the first sampled token.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import TypeVar

K = TypeVar("K")

# Prompt tokens a busy sequence must share beyond what an idle one holds before a new choice
# waits to copy them: below that, evaluating them is about as cheap as the wait and the copy.
MIN_SHARE = 16


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def longest_shared(candidates: Iterable[tuple[K, Sequence[int]]], prompt: Sequence[int],
                   limit: int) -> tuple[K | None, int]:
    """Of ``(key, tokens)`` pairs, the one sharing the longest prefix with ``prompt`` (at most
    ``limit`` tokens), the first among equals; ``(None, 0)`` if none shares any."""
    best, shared = None, 0
    for key, tokens in candidates:
        n = min(common_prefix(tokens, prompt), limit)
        if n > shared:
            best, shared = key, n
    return best, shared


class IdleSequences:
    """The sequences no choice holds, least recently used first, each with the tokens its
    cache holds. With ``reuse`` off, a choice takes the lowest free id and every released
    sequence is forgotten (llama.cpp decodes a run of consecutive ids in one micro-batch,
    which is all a cold policy can optimise)."""

    def __init__(self, seqs: Iterable[int], reuse: bool = True):
        self.reuse = reuse
        self._idle: OrderedDict[int, list[int]] = OrderedDict((s, []) for s in seqs)

    def __len__(self) -> int:
        return len(self._idle)

    def tokens(self, seq: int) -> list[int]:
        return self._idle[seq]

    def take(self, prompt: Sequence[int], limit: int) -> tuple[int, int]:
        """Remove and return the sequence for ``prompt`` and how many of its cached tokens
        the choice keeps (at most ``limit``: the prompt's length less one, or 0 for a choice
        that must evaluate its whole prompt, or whose cache will be a copy)."""
        seq, kept = self.best(prompt, limit)
        self.remove(seq)
        return seq, kept

    def remove(self, seq: int) -> None:
        del self._idle[seq]

    def best(self, prompt: Sequence[int], limit: int) -> tuple[int, int]:
        """What ``take`` would return, leaving it idle."""
        if not self.reuse:
            return min(self._idle), 0
        best, kept = None, -1
        for seq, tokens in self._idle.items():  # oldest first: ties go to the oldest
            n = min(common_prefix(tokens, prompt), limit)
            if 2 * n >= len(tokens) and n > kept:
                best, kept = seq, n
        if best is None:
            best = next(iter(self._idle))
            kept = min(common_prefix(self._idle[best], prompt), limit)
        return best, kept

    def put(self, seq: int, tokens: list[int]) -> None:
        """``seq`` is free again, its cache holding ``tokens`` (most recently used)."""
        self._idle[seq] = tokens if self.reuse else []
        self._idle.move_to_end(seq)

    def forget(self) -> None:
        """The context was cleared: no idle sequence holds anything."""
        for seq in self._idle:
            self._idle[seq] = []
