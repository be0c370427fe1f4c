"""The batching loop of the CPU backend: the one thread that owns the llama.cpp context.

A llama.cpp context is not thread-safe, so Celery's task threads never touch it: each hands
its choices to this loop (``submit``) and reads their events from the choice's ``out``
queue. The context holds ``slots`` sequences; every iteration the loop

1. takes new choices and cancels from its inbox, and expires choices that waited for a slot
   past their job's deadline;
2. gives waiting choices the free slots: the one whose cache shares the longest prefix with
   the prompt (``models.prefix``), whose tokens it keeps. A choice sharing a longer prefix
   with a busy slot follows that slot instead: it copies its cache once it holds the prefix
   (a shared system prompt is evaluated once), and one whose prompt is the same as one
   being evaluated (the ``n`` choices of a job) copies it at its end, with its logits;
3. evaluates prompts past their kept prefix, at most about ``n_batch`` tokens per iteration,
   each prompt in its own llama_decode call, in chunks of ``n_batch`` — exactly as if it ran
   alone — and samples its first token at once (so a new stream's first token waits for no
   step), and its same-prompt followers' from the same logits;
4. decodes the next token of every running choice in ONE llama_decode, then samples each
   with its own sampler chain.

Why prompts are not put in the decode step's batch: with one KV stream per sequence
llama.cpp splits a batch into micro-batches holding the same number of tokens of each
sequence, so a prompt next to one-token decodes is cut into one-token pieces. Measured here
(SmolLM2, 2 threads), separate calls cost no more: 8 short prompts took 445 ms one call
each and 390 ms in one call, while each stream's first token came after its own prompt
instead of after all eight.

Why a kept prefix changes no token: a sequence's cache holds, for each position, what that
token's evaluation wrote there, and a token's K and V depend only on the tokens before it.
A finished choice's sequence keeps its prompt and the tokens it generated (all but the last,
never decoded); the next choice keeps the common prefix, cuts the rest (``keep``) and
evaluates from there, writing the same cells in the same order as a cold evaluation would.
With ``reuse`` off, every released sequence is cleared and each prompt evaluated whole.

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
from models.events import Delta, Event, FinishReason, TokenLogprob
from models.llama_engine import Row
from models.llama_sampling import ChainSpec
from models.loop import InboxLoop
from models.output import ChoiceWriter
from models.prefix import MIN_SHARE, IdleSequences, longest_shared

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
    def keep(self, seq: int, n: int) -> int: ...
    def copy(self, src: int, dst: int) -> None: ...
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
    # Written by the loop, read by the task thread once the choice has finished: prompt
    # tokens taken from a cache (a kept prefix, or a copy of a sibling's) and evaluated.
    cached: int = 0
    evaluated: int = 0

    @property
    def scores_prompt(self) -> bool:
        """Echo with log probabilities: every prompt token needs its logits."""
        return self.echo is not None and self.top_logprobs is not None


@dataclass(eq=False)
class Slot:
    seq: int
    choice: Choice
    sampler: Any
    # Tokens of this sequence in the cache (len(tokens) == n_past).
    n_past: int = 0
    tokens: list[int] = field(default_factory=list)
    # A busy slot whose cache this one copies once it holds the ``share`` tokens they have
    # in common: all of a prompt they both have (then at its end, with its logits) or a
    # prefix (then this one evaluates the rest).
    leader: Slot | None = None
    share: int = 0
    # The token sampled last, to be decoded in the next step.
    pending: int | None = None
    echo: list[TokenLogprob] = field(default_factory=list)

    @property
    def prefilling(self) -> bool:
        return self.leader is None and self.n_past < len(self.choice.prompt)


class BatchLoop(InboxLoop):
    thread_name = "llama-loop"

    def __init__(self, engine: Engine, *, reuse: bool = True,
                 clock: Callable[[], float] = time.time, idle_wait: float = 0.5):
        super().__init__(idle_wait)
        self.engine, self.clock, self.reuse = engine, clock, reuse
        self.failures = 0
        self._waiting: deque[Choice] = deque()
        self._idle = IdleSequences(range(engine.slots), reuse)
        # By sequence id, in order of admission (prompts are evaluated in that order).
        self._slots: dict[int, Slot] = {}

    def submit_all(self, choices: Sequence[Choice]) -> None:
        """Submit a job's choices in one command, so that they are admitted together and
        the ones sharing a prompt follow the first instead of each evaluating it."""
        self._inbox.put(("submit_all", list(choices)))

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

    def _apply(self, op: str, arg: Any) -> None:
        if op == "submit":
            self._waiting.append(arg)
        elif op == "submit_all":
            self._waiting.extend(arg)
        else:
            self._cancel(arg)

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
            try:
                sampler = self.engine.new_chain(choice.chain)
            except Exception:
                log.exception("could not build a sampler chain")
                choice.out.put(GenerationFailed("The model could not start the request."))
                continue
            slot = self._place(choice, sampler)
            self._slots[slot.seq] = slot

    def _place(self, choice: Choice, sampler: Any) -> Slot:
        """An idle sequence for ``choice``, starting from the prefix it holds, or from a copy
        of a busy one's longer prefix (by MIN_SHARE tokens) once that one has it."""
        prompt = choice.prompt
        limit = 0 if choice.scores_prompt else len(prompt) - 1
        seq, kept = self._idle.best(prompt, limit)
        leader, share = self._leader_for(choice, limit)
        if leader is not None and (share == len(prompt) or share >= kept + MIN_SHARE):
            seq, kept = self._idle.best(prompt, 0)  # it will hold a copy: spare the caches
        else:
            leader, share = None, 0
        self._idle.remove(seq)
        slot = Slot(seq, choice, sampler, leader=leader, share=share)
        if leader is None:
            slot.n_past = choice.cached = self.engine.keep(seq, kept)
            slot.tokens = list(prompt[:slot.n_past])
        return slot

    def _leader_for(self, choice: Choice, limit: int) -> tuple[Slot | None, int]:
        """The busy slot sharing most of ``choice``'s prompt: first one still to evaluate
        this very prompt (its logits are shared too), else the longest prefix."""
        if not self.reuse or choice.scores_prompt:
            return None, 0
        prompt = choice.prompt
        leaders = [s for s in self._slots.values()
                   if s.leader is None and not s.choice.scores_prompt]
        same = next((s for s in leaders if s.prefilling and (s.choice.prompt is prompt
                                                             or s.choice.prompt == prompt)), None)
        if same is not None:
            return same, len(prompt)
        return longest_shared(((s, s.choice.prompt if s.prefilling else s.tokens)
                               for s in leaders), prompt, limit)

    def _prefill(self) -> None:
        for f in [s for s in self._slots.values() if s.leader is not None
                  and s.share < len(s.choice.prompt) and s.leader.n_past >= s.share]:
            self._join(f)
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
        slot.tokens.extend(chunk)
        c.evaluated += len(chunk)
        if c.scores_prompt:
            self._score_prompt(slot, start, len(chunk))
        if last:
            # Copies first: the leader's first token may end it and free its sequence.
            started = [slot, *self._copy_to_followers(slot)]
            for s in started:
                self._start(s, len(chunk) - 1)
        return len(chunk)

    def _copy_to_followers(self, leader: Slot) -> list[Slot]:
        """Join the followers of this whole prompt; those joined sample from its logits."""
        joined = []
        for f in [s for s in self._slots.values()
                  if s.leader is leader and s.share == len(s.choice.prompt)]:
            self._join(f)
            if not f.prefilling:
                joined.append(f)
        return joined

    def _join(self, f: Slot) -> None:
        """Copy the leader's cache into follower ``f``'s sequence, cut at what they share."""
        leader, f.leader = f.leader, None
        self.engine.copy(leader.seq, f.seq)
        f.n_past = f.choice.cached = self.engine.keep(f.seq, f.share)
        f.tokens = leader.tokens[:f.n_past]

    def _start(self, slot: Slot, i: int) -> None:
        """Open a choice whose prompt is in its cache, with row ``i`` its last's logits."""
        c = slot.choice
        self._open(c, slot.echo if c.scores_prompt else None)
        if c.max_tokens == 0:
            self._finish(slot, "length")
        else:
            self._sample(slot, i)

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
            s.tokens.append(s.pending)
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
        """Free ``slot``'s sequence, its cache kept for a later prompt (cleared if reuse
        is off). Its followers copy what they share if it is there, else evaluate it."""
        del self._slots[slot.seq]
        slot.sampler.close()
        for f in [s for s in self._slots.values() if s.leader is slot]:
            if f.share < len(f.choice.prompt) and f.share <= slot.n_past:
                self._join(f)  # the prefix is there (the copy is made before it changes)
            else:
                f.leader, f.share, f.tokens = None, 0, []
                f.n_past = f.choice.cached = self.engine.keep(f.seq, 0)
        if not self.reuse:
            self.engine.clear(slot.seq)
        self._idle.put(slot.seq, slot.tokens)

    @staticmethod
    def _send(choice: Choice, events: list[Event]) -> None:
        for e in events:
            choice.out.put(e)

    def _fail_running(self, error: FerryError) -> None:
        slots, self._slots = list(self._slots.values()), {}
        for s in slots:
            s.choice.out.put(error)
            s.sampler.close()
            self._idle.put(s.seq, [])
        self._idle.forget()
        try:
            self.engine.clear()
        except Exception:
            log.exception("could not clear the llama.cpp context")

    def _shutdown(self) -> None:
        error = GenerationFailed("The worker is shutting down.")
        self._fail_running(error)
        while self._waiting:
            self._waiting.popleft().out.put(error)
