"""Micro-batching: concurrent embedding requests share one forward pass.

Request threads call ``MicroBatcher.embed`` and block until their rows are ready. One thread
takes the waiting requests (after the oldest has waited ``max_wait``, or as soon as enough
inputs are waiting), runs the model once over all their inputs, and hands each request its
rows. Interactive requests are taken before bulk ones (the Batch API), so a batch job fills
the gaps between interactive requests instead of queueing in front of them.

"Enough" is ``max_inputs`` (one forward pass) while an interactive request waits, so it is
answered after one pass; when only bulk work waits it is ``max_bulk_inputs``, which the
backend sorts by length into passes: less padding, more throughput, as in
``SentenceTransformer.encode``. A request larger than the limit runs alone.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

Embed = Callable[[Sequence[list[int]]], np.ndarray]
# Called after each pass with (requests, inputs) it served.
OnBatch = Callable[[int, int], None]


@dataclass(order=True)
class _Pending:
    bulk: bool
    seq: int
    tokens: list[list[int]] = field(compare=False)
    arrived: float = field(compare=False)
    done: threading.Event = field(default_factory=threading.Event, compare=False)
    rows: np.ndarray | None = field(default=None, compare=False)
    error: Exception | None = field(default=None, compare=False)


class MicroBatcher:
    def __init__(self, embed: Embed, *, max_inputs: int, max_wait: float,
                 max_bulk_inputs: int | None = None, on_batch: OnBatch | None = None):
        self._embed, self.max_inputs, self.max_wait = embed, max_inputs, max_wait
        self.max_bulk_inputs = max(max_bulk_inputs or max_inputs, max_inputs)
        self._on_batch = on_batch
        self._pending: list[_Pending] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        threading.Thread(target=self._run, name="ferry-batcher", daemon=True).start()

    def embed(self, tokens: list[list[int]], *, bulk: bool = False) -> np.ndarray:
        """The rows for ``tokens``, computed together with whatever else is waiting."""
        item = _Pending(bulk, next(self._seq), tokens, time.monotonic())
        with self._cond:
            self._pending.append(item)
            self._cond.notify()
        item.done.wait()
        if item.error is not None:
            raise item.error
        return item.rows

    def _take(self) -> list[_Pending]:
        with self._cond:
            while not self._pending:
                self._cond.wait()
            while sum(len(p.tokens) for p in self._pending) < self._limit():
                oldest = min(p.arrived for p in self._pending)
                left = oldest + self.max_wait - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            self._pending.sort()
            limit, taken, n = self._limit(), [], 0
            while self._pending and (not taken or n + len(self._pending[0].tokens) <= limit):
                item = self._pending.pop(0)
                taken.append(item)
                n += len(item.tokens)
            return taken

    def _limit(self) -> int:
        bulk_only = all(p.bulk for p in self._pending)
        return self.max_bulk_inputs if bulk_only else self.max_inputs

    def _run(self) -> None:
        while True:
            batch = self._take()
            tokens = [t for item in batch for t in item.tokens]
            started = time.perf_counter()
            try:
                rows = self._embed(tokens)
            except Exception as e:  # every waiting request must be released
                log.exception("embedding pass over %d inputs failed", len(tokens))
                for item in batch:
                    item.error = e
                    item.done.set()
                continue
            start = 0
            for item in batch:
                item.rows = rows[start:start + len(item.tokens)]
                start += len(item.tokens)
                item.done.set()
            log.info("pass: %d requests, %d inputs in %.0f ms", len(batch), len(tokens),
                     (time.perf_counter() - started) * 1000)
            if self._on_batch is not None:
                try:
                    self._on_batch(len(batch), len(tokens))
                except Exception:
                    log.exception("on_batch callback failed")
