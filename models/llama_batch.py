"""The batching loop of the CPU backend: the one thread that owns the llama.cpp context.

A llama.cpp context is not thread-safe, so Celery's task threads never touch it: each hands
its choices to this loop (``submit``) and reads their events from the choice's ``out``
queue. The context holds ``slots`` sequences; every iteration the loop

1. takes new choices and cancels from its inbox, and expires choices that waited for a slot
   past their job's deadline;
2. gives waiting choices the free slots, lowest sequence id first;
3. evaluates prompts, at most about ``n_batch`` tokens per iteration, each prompt in its own
   llama_decode call, in chunks of ``n_batch`` from its start — exactly as if it ran alone —
   and samples its first token at once (so a new stream's first token waits for no step);
4. decodes the next token of every running choice in ONE llama_decode, then samples each
   with its own sampler chain.

Why prompts are not put in the decode step's batch: with one KV stream per sequence
llama.cpp splits a batch into micro-batches holding the same number of tokens of each
sequence, so a prompt next to one-token decodes is cut into one-token pieces. Measured here
(SmolLM2, 2 threads), separate calls cost no more: 8 short prompts took 445 ms one call
each and 390 ms in one call, while each stream's first token came after its own prompt
instead of after all eight.

Guarantees to a choice's reader: its events in order (the echoed prompt if asked, Deltas,
ToolCallDeltas), then exactly one final item — a ``Finish`` (reason ``cancelled`` after a
cancel) or a ``FerryError``. An exception while decoding fails every choice holding a slot
and clears the context; one while sampling or writing a choice fails that choice only;
waiting choices are not affected.
"""

from __future__ import annotations

import logging
import queue
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from config.errors import FerryError, GenerationFailed, RequestExpired
from models import logprobs
from config.contract.events import Delta, Event, FinishReason, TokenLogprob
from models.llama_engine import Row
from models.llama_sampling import ChainSpec
from models.loop import InboxLoop
from models.output import ChoiceWriter

log = logging.getLogger(__name__)


class Engine(Protocol):
    """What the loop needs of ``models.llama_engine.LlamaEngine`` (or a test double)."""

    slots: int
    n_batch: int

    def new_chain(self, spec: ChainSpec) -> Any: ...
    def decode(self, rows: Sequence[Row]) -> None: ...
    def logits(self, i: int) -> np.ndarray: ...
    def sample(self, chain: Any, i: int) -> int: ...
    def clear(self, seq: int | None = None) -> None: ...
    def piece(self, tok: int) -> bytes: ...
    def text_piece(self, tok: int) -> bytes: ...
    def is_eog(self, tok: int) -> bool: ...


@dataclass(eq=False)
class Choice:
    """One choice of one job, from the task thread that submitted it to the loop and back.
    After ``submit`` only the loop touches it (its writer included); the task thread reads
    ``out``."""

    index: int
    prompt: Sequence[int]
    max_tokens: int
    chain: ChainSpec
    writer: ChoiceWriter
    top_logprobs: int | None = None
    # The prompt's text when the choice opens with it (completions' echo).
    echo: str | None = None
    # Unix time: a choice not given a slot by then fails with 408.
    deadline: float | None = None
    # Unix time: the job's time budget (``max_job_seconds``) ends; the choice then ends with
    # finish_reason "length", as at max_tokens, whether it is running or still waiting.
    stop_by: float | None = None
    # Delta | ToolCallDelta | Finish | FerryError, in order.
    out: queue.Queue = field(default_factory=queue.Queue)

    @property
    def scores_prompt(self) -> bool:
        """Echo with log probabilities: every prompt token needs its logits."""
        return self.echo is not None and self.top_logprobs is not None


@dataclass(eq=False)
class Slot:
    seq: int
    choice: Choice
    sampler: Any
    # Tokens of this sequence in the cache.
    n_past: int = 0
    # The token sampled last, to be decoded in the next step.
    pending: int | None = None
    echo: list[TokenLogprob] = field(default_factory=list)

    @property
    def prefilling(self) -> bool:
        return self.n_past < len(self.choice.prompt)


class BatchLoop(InboxLoop):
    thread_name = "llama-loop"

    def __init__(self, engine: Engine, *, clock: Callable[[], float] = time.time,
                 idle_wait: float = 0.5):
        super().__init__(idle_wait)
        self.engine, self.clock = engine, clock
        self.failures = 0
        self._waiting: deque[Choice] = deque()
        # By sequence id, in order of admission (prompts are evaluated in that order).
        self._slots: dict[int, Slot] = {}

    # --- the loop thread ----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                if not self._drain(block=not (self._slots or self._waiting)):
                    return
                self._expire()
                self._admit()
                self._prefill()
                self._step()
            except Exception:
                log.exception("llama.cpp failed while generating; failing the %d choices "
                              "holding a slot and clearing the context", len(self._slots))
                self.failures += 1
                self._fail_running(GenerationFailed("The model failed while generating."))

    def _apply(self, op: str, choice: Choice) -> None:
        if op == "submit":
            self._waiting.append(choice)
        else:
            self._cancel(choice)

    def _cancel(self, choice: Choice) -> None:
        if choice in self._waiting:
            self._waiting.remove(choice)
            self._send(choice, choice.writer.finish("cancelled"))
            return
        slot = next((s for s in self._slots.values() if s.choice is choice), None)
        if slot is not None:  # else it finished (or failed) before the cancel got here
            self._finish(slot, "cancelled")

    def _expire(self) -> None:
        now = self.clock()
        for c in [c for c in self._waiting if c.deadline is not None and now > c.deadline]:
            self._waiting.remove(c)
            c.out.put(RequestExpired("The request expired before the model could start it."))
        for c in [c for c in self._waiting if c.stop_by is not None and now > c.stop_by]:
            self._waiting.remove(c)
            self._open(c, None)
            self._send(c, c.writer.finish("length"))

    def _admit(self) -> None:
        while self._waiting and len(self._slots) < self.engine.slots:
            choice = self._waiting.popleft()
            if choice.max_tokens == 0 and not choice.scores_prompt:
                self._open(choice, None)
                self._send(choice, choice.writer.finish("length"))
                continue
            seq = min(set(range(self.engine.slots)) - self._slots.keys())
            try:
                sampler = self.engine.new_chain(choice.chain)
            except Exception:
                log.exception("could not build a sampler chain")
                choice.out.put(GenerationFailed("The model could not start the request."))
                continue
            # Lowest free id first: llama.cpp decodes a run of consecutive sequence ids in
            # one micro-batch, so gaps between running sequences cost extra passes.
            self._slots[seq] = Slot(seq, choice, sampler)

    def _prefill(self) -> None:
        budget = self.engine.n_batch
        for slot in [s for s in self._slots.values() if s.prefilling]:
            if budget <= 0:
                return
            budget -= self._prefill_chunk(slot)

    def _prefill_chunk(self, slot: Slot) -> int:
        c, start = slot.choice, slot.n_past
        chunk = c.prompt[start:start + self.engine.n_batch]
        last = start + len(chunk) == len(c.prompt)
        self.engine.decode([Row(t, start + j, slot.seq,
                                c.scores_prompt or (last and j == len(chunk) - 1))
                            for j, t in enumerate(chunk)])
        slot.n_past += len(chunk)
        if c.scores_prompt:
            self._score_prompt(slot, start, len(chunk))
        if last:
            self._open(c, slot.echo if c.scores_prompt else None)
            if c.max_tokens == 0:
                self._finish(slot, "length")
            else:
                self._sample(slot, len(chunk) - 1)
        return len(chunk)

    def _score_prompt(self, slot: Slot, start: int, n: int) -> None:
        """Each prompt token's entry, from the row before it (the first has none)."""
        prompt, top = slot.choice.prompt, slot.choice.top_logprobs
        if start == 0:
            slot.echo.append(logprobs.entry(None, prompt[0], top, self.engine.piece))
        for i in range(n):
            if start + i + 1 < len(prompt):
                row = logprobs.log_softmax(self.engine.logits(i))
                slot.echo.append(logprobs.entry(row, prompt[start + i + 1], top,
                                                self.engine.piece))

    def _open(self, choice: Choice, echo: list[TokenLogprob] | None) -> None:
        if choice.echo is not None:
            choice.out.put(Delta(choice.index, choice.echo, tokens=0, logprobs=echo,
                                 prompt=True))

    def _step(self) -> None:
        running = sorted((s for s in self._slots.values() if s.pending is not None),
                         key=lambda s: s.seq)
        if not running:
            return
        self.engine.decode([Row(s.pending, s.n_past, s.seq, True) for s in running])
        for i, s in enumerate(running):
            s.n_past += 1
            s.pending = None
            self._sample(s, i)

    def _sample(self, slot: Slot, i: int) -> None:
        try:
            self._next_token(slot, i)
        except Exception:
            log.exception("sampling failed; failing that choice")
            if self._slots.get(slot.seq) is slot:
                self._release(slot)
            slot.choice.out.put(GenerationFailed("The model failed while generating."))

    def _next_token(self, slot: Slot, i: int) -> None:
        """Sample slot's next token from output row ``i`` of the last decode."""
        c = slot.choice
        tok = self.engine.sample(slot.sampler, i)
        if self.engine.is_eog(tok):
            return self._finish(slot, "stop")
        lp = None
        if c.top_logprobs is not None:
            lp = logprobs.entry(logprobs.log_softmax(self.engine.logits(i)), tok,
                                c.top_logprobs, self.engine.piece)
        self._send(c, c.writer.add(self.engine.text_piece(tok), lp))
        if c.writer.stopped:
            self._finish(slot, "stop")
        elif c.writer.tokens >= c.max_tokens or (c.stop_by is not None
                                                  and self.clock() > c.stop_by):
            self._finish(slot, "length")
        else:
            slot.pending = tok

    def _finish(self, slot: Slot, reason: FinishReason) -> None:
        self._release(slot)
        self._send(slot.choice, slot.choice.writer.finish(reason))

    def _release(self, slot: Slot) -> None:
        del self._slots[slot.seq]
        slot.sampler.close()
        self.engine.clear(slot.seq)

    @staticmethod
    def _send(choice: Choice, events: list[Event]) -> None:
        for e in events:
            choice.out.put(e)

    def _fail_running(self, error: FerryError) -> None:
        slots, self._slots = list(self._slots.values()), {}
        for s in slots:
            s.choice.out.put(error)
            s.sampler.close()
        try:
            self.engine.clear()
        except Exception:
            log.exception("could not clear the llama.cpp context")

    def _shutdown(self) -> None:
        error = GenerationFailed("The worker is shutting down.")
        self._fail_running(error)
        while self._waiting:
            self._waiting.popleft().out.put(error)
