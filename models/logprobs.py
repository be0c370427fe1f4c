"""Log probabilities from raw logits, in the shape ``config.contract.events.TokenLogprob`` documents.

Backend-neutral: a backend hands over one row of logits (a numpy array; a torch tensor
becomes one with ``.float().cpu().numpy()``) and a way to spell a token id as bytes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from config.contract.events import TokenLogprob, TopLogprob

Piece = Callable[[int], bytes]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Along the last axis, in float64: float32 loses the small probabilities' digits."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


def spell(piece: bytes) -> tuple[str, list[int]]:
    """A token's text and bytes; bytes that are not UTF-8 on their own (one part of a
    multi-byte character) are written ``\\xNN``, as OpenAI does."""
    return piece.decode("utf-8", "backslashreplace"), list(piece)


def top(row: np.ndarray, k: int) -> list[int]:
    """The ``k`` most likely token ids, most likely first (ties: lower id first, as argmax)."""
    if k <= 0:
        return []
    k = min(k, row.shape[-1])
    ids = np.argpartition(-row, k - 1)[:k]
    return sorted(ids.tolist(), key=lambda i: (-row[i], i))


def entry(row: np.ndarray | None, token: int, top_n: int, piece: Piece) -> TokenLogprob:
    """The entry for ``token`` given the log-probability ``row`` that predicted it (None for a
    prompt's first token, which nothing predicts)."""
    text, raw = spell(piece(token))
    if row is None:
        return TokenLogprob(token=text, logprob=None, bytes=raw, top_logprobs=[])
    alternatives = []
    for i in top(row, top_n):
        alt_text, alt_raw = spell(piece(i))
        alternatives.append(TopLogprob(token=alt_text, logprob=float(row[i]), bytes=alt_raw))
    return TokenLogprob(token=text, logprob=float(row[token]), bytes=raw,
                        top_logprobs=alternatives)
