"""A scripted token source: a test and benchmark instrument, never a served model.

The prompt (or the last message) is a JSON script, so tests can drive the whole pipeline
(queue, pub/sub, SSE, cancel, dead workers) without a real model's timing:
``{"tokens": ["a", "b"], "delay": 0.01, "fail": "msg", "crash": true, "hang": true,
"count": 100, "rate": 50, "pad": 0}``. ``count``/``rate`` produce ``count`` tokens at ``rate`` per
second, each followed by ``pad`` x's (long tokens, to fill a slow reader's socket);
``"silent": true`` paces and counts them but sends none (what pacing alone costs a worker);
``"lockstep": true`` paces them on a clock shared by every job (each token at the next
multiple of 1/rate s), as a batching engine's step yields a token for all its jobs at once.
Registry option ``threads`` (default 1): run that many jobs at once in a Celery threads
pool, as batching GPU backends do, so the pool's plumbing is tested without a GPU.
Option ``batching`` (default false): the tokens of paced scripts (``rate`` or ``delay``; not
``fail``, ``crash``, ``hang``, an echo or images, which run as above) are made by one loop
thread for all the worker's jobs, each at its own pace, and handed over as they are made
(``supports_direct``), as the llama.cpp and ExLlamaV2 backends' loops do: the relay
benchmark's stand-in for a GPU host's engine, whose task threads sleep until their
choices finish.

A test double of a vision model when its registry entry says ``vision = true``: it accepts
image parts, and ``{"describe_images": true}`` makes it reply with what reached it — the
number of images and the sha256 of each one's bytes — so tests can follow image bytes from
the HTTP request into the worker's job. It looks at nothing else in them.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import itertools
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

from config.errors import GenerationFailed, InvalidRequest
from config.settings import ModelEntry
from models.base import Backend, Cancelled
from models.loop import InboxLoop
from models.output import Outbox, follow_choices
from config.contract.events import Delta, Done, Event, Finish, Started
from config.contract.job import GenerationJob
from models.stops import StopMatcher
from models.templates import flatten_content

log = logging.getLogger(__name__)


class SyntheticBackend(Backend):
    supports_echo = True

    def __init__(self, entry: ModelEntry):
        super().__init__(entry)
        self.supports_vision = entry.vision
        self.loop = _PaceLoop().start() if entry.options.get("batching") else None
        self.supports_direct = self.loop is not None

    def close(self) -> None:
        if self.loop is not None:
            self.loop.close()

    @classmethod
    def worker_pool(cls, entry: ModelEntry) -> tuple[str, int]:
        threads = int(entry.options.get("threads", 1))
        return ("threads", threads) if threads > 1 else ("solo", 1)

    def _script(self, job: GenerationJob) -> dict:
        if job.messages is not None:
            text = flatten_content(job.messages[-1].get("content")) if job.messages else ""
        else:
            text = job.prompt if isinstance(job.prompt, str) else ""
        try:
            script = json.loads(text)
        except ValueError:
            script = None
        if not isinstance(script, dict):
            raise InvalidRequest("The synthetic backend takes a JSON script as its prompt.",
                                 param="messages" if job.messages is not None else "prompt")
        return script

    def count_prompt(self, job: GenerationJob) -> int:
        return int(self._script(job).get("prompt_tokens", 1))

    def generate(self, job: GenerationJob, cancelled: Cancelled,
                 direct: Callable[[Event], None] | None = None) -> Iterator[Event]:
        script = self._script(job)
        tokens = script.get("tokens")
        if script.get("describe_images"):
            tokens = [f"{len(job.images)} images"] + [
                " " + hashlib.sha256(base64.b64decode(img)).hexdigest() for img in job.images]
        if tokens is None:
            pad = "x" * int(script.get("pad", 0))
            tokens = [f"t{i} {pad}" for i in range(int(script.get("count", 8)))]
        delay = 1.0 / script["rate"] if script.get("rate") else float(script.get("delay", 0))
        limit = job.max_tokens if job.max_tokens is not None else len(tokens)
        lockstep = bool(script.get("lockstep"))
        yield Started(worker="", prompt_tokens=int(script.get("prompt_tokens", 1)))
        if self.loop is not None and delay and not job.echo and not any(
                script.get(k) for k in ("fail", "crash", "hang", "describe_images")):
            out = Outbox(direct)
            paced = {i: _Paced(i, tokens, limit, delay, lockstep, bool(script.get("silent")),
                               job.stop, out) for i in range(job.n)}
            for p in paced.values():
                self.loop.submit(p)
            total = yield from follow_choices(out, paced, self.loop.cancel, cancelled, 0.05)
            yield Done(prompt_tokens=int(script.get("prompt_tokens", 1)),
                       completion_tokens=total)
            return
        total = 0
        for index in range(job.n):
            if job.echo:
                yield Delta(index, job.prompt if isinstance(job.prompt, str) else "", tokens=0,
                            prompt=True)
            p = _Paced(index, tokens, limit, delay, lockstep, bool(script.get("silent")),
                       job.stop)
            reason = p.ended_at_once()
            while reason is None:
                if cancelled():
                    reason = "cancelled"
                    break
                if delay:
                    time.sleep(delay - time.monotonic() % delay if lockstep else delay)
                evs, reason = p.make()
                yield from evs
            if script.get("fail"):
                raise GenerationFailed(str(script["fail"]))
            if script.get("crash"):
                os.kill(os.getpid(), signal.SIGKILL)
            while script.get("hang") and not cancelled():
                time.sleep(0.01)
            total += p.n
            yield from p.end(reason, "cancelled" if cancelled() else reason)
        yield Done(prompt_tokens=int(script.get("prompt_tokens", 1)), completion_tokens=total)


class _Paced:
    """One choice of a script: its tokens' events, made one at a time (``make``), on its
    task thread or by the loop (``_PaceLoop``: ``out``, ``due``, ``cancelled`` and ``done``
    are the loop's)."""

    __slots__ = ("index", "tokens", "limit", "delay", "lockstep", "silent", "stops", "out",
                 "n", "due", "cancelled", "done")

    def __init__(self, index: int, tokens: list[str], limit: int, delay: float,
                 lockstep: bool, silent: bool, stop: list[str], out: Outbox | None = None):
        self.index, self.tokens, self.limit, self.delay = index, tokens, limit, delay
        self.lockstep, self.silent, self.out = lockstep, silent, out
        self.stops = StopMatcher(stop)
        self.n, self.due, self.cancelled, self.done = 0, 0.0, False, False

    def ended_at_once(self) -> str | None:
        """Why the choice ends before its first token (no tokens, no room for one), if so."""
        if not self.tokens:
            return "stop"
        return "length" if self.limit <= 0 else None

    def make(self) -> tuple[list[Event], str | None]:
        """The next token's events, and why the choice ends with it (None: it goes on)."""
        piece = self.tokens[self.n]
        self.n += 1
        out: list[Event] = []
        if not self.silent:  # paced and counted, not sent: the pacing's own cost (bench)
            text = self.stops.feed(piece)
            if text:
                out.append(Delta(self.index, text))
            if self.stops.stopped:
                return out, "stop"
        if self.n == len(self.tokens):
            return out, "stop"
        return out, "length" if self.n >= self.limit else None

    def end(self, reason: str, reported: str) -> list[Event]:
        """The text held back for a stop string, and the finish (``reported`` as its
        reason; its stop string if ``reason`` is a stop)."""
        self.done = True
        tail = self.stops.flush()
        out: list[Event] = [Delta(self.index, tail, tokens=0)] if tail else []
        out.append(Finish(self.index, reported, self.n,
                          self.stops.matched if reason == "stop" else None))
        return out

    def next_due(self, now: float) -> float:
        if self.lockstep:  # the next multiple of delay, as every job's step
            return now + self.delay - now % self.delay
        return max(self.due + self.delay, now) if self.due else now + self.delay


class _PaceLoop(InboxLoop):
    """Every job's paced tokens, made on one thread: it sleeps until the next one is due
    (or a command comes), then makes each token due by then. A token's delta goes to its
    choice's outbox (handed over directly where the job's runtime gave ``direct``); a
    choice's finish wakes its task thread."""

    thread_name = "synthetic-loop"

    def __init__(self):
        super().__init__(idle_wait=1.0)
        self._heap: list[tuple[float, int, _Paced]] = []
        self._seq = itertools.count()

    def _run(self) -> None:
        heap = self._heap
        while True:
            wait = heap[0][0] - time.monotonic() if heap else None
            if not self._drain(block=wait is None or wait > 0, timeout=wait):
                return
            now = time.monotonic()
            while heap and heap[0][0] <= now:
                p = heapq.heappop(heap)[2]
                if p.done:
                    continue
                try:
                    self._make(p, now)
                except Exception:  # that choice fails; the loop goes on with the others
                    log.exception("synthetic loop: a choice failed")
                    p.done = True
                    p.out.put(GenerationFailed("The synthetic source failed."))

    def _make(self, p: _Paced, now: float) -> None:
        if p.cancelled:
            return self._end(p, "cancelled")
        evs, reason = p.make()
        for ev in evs:
            p.out.put(ev)
        if reason is not None:
            return self._end(p, reason)
        p.due = p.next_due(now)
        heapq.heappush(self._heap, (p.due, next(self._seq), p))

    @staticmethod
    def _end(p: _Paced, reason: str) -> None:
        for ev in p.end(reason, reason):
            p.out.put(ev)

    def _apply(self, op: str, arg: Any) -> None:
        if op == "submit":
            reason = arg.ended_at_once()
            if reason is not None:
                return self._end(arg, reason)
            arg.due = arg.next_due(time.monotonic())
        else:  # cancel: finished at once
            arg.cancelled, arg.due = True, 0.0
        heapq.heappush(self._heap, (arg.due, next(self._seq), arg))

    def _shutdown(self) -> None:
        for _, _, p in self._heap:
            if not p.done:
                self._end(p, "cancelled")
