"""The cluster as the console's Workers page shows it: per model, its live workers and their
load, its queued and in-flight jobs, and the tokens it generated in each second of the last
minute.

What is read here is counts, model names and worker names (a job's ``started`` event
already names its worker to the job's owner): never a job id, a prompt, an owner or a key,
so any tenant may see it.

Tokens per second: each worker adds up the tokens it generates (``TokenMeter.add``) and its
heartbeat writes the sum onto the second it writes in (one INCRBY per beat with tokens,
none when idle), a key per model and second that expires after two windows. So a token is
counted up to one heartbeat late (1 s by default), and every worker of a model adds to the
same keys.
"""

from __future__ import annotations

import collections
import time
from dataclasses import asdict, dataclass

from config.contract.events import Delta, Event, ToolCallDelta
from config.contract.protocol import pending_key, queued_key, workers_key
from tasks.routing import load_key

# Seconds of tokens-per-second history kept and shown.
WINDOW = 60


def tokens_key(queue: str, second: int) -> str:
    return f"ferry:tokens:{queue}:{second}"


class TokenMeter:
    """A worker's generated tokens since its last heartbeat. Thread-safe without a lock (it
    is called once per token): jobs append counts to a deque, the heartbeat takes them (a
    deque's append and popleft are atomic)."""

    def __init__(self, queue: str):
        self.queue = queue
        self._counts: collections.deque[int] = collections.deque()

    def add(self, event: Event) -> None:
        kind = type(event)
        if kind is Delta:
            if not event.prompt:
                self._counts.append(event.tokens)
        elif kind is ToolCallDelta:
            self._counts.append(event.tokens)

    def take(self) -> int:
        """The tokens added since the last ``take``."""
        counts, count = self._counts, 0
        for _ in range(len(counts)):
            count += counts.popleft()
        return count

    def beat(self, pipe, now: float) -> None:
        """Queued on the heartbeat's pipeline. Taken before the write: a beat whose write
        fails loses that beat's count, it is not added twice."""
        count = self.take()
        if count:
            key = tokens_key(self.queue, int(now))
            pipe.incrby(key, count)
            pipe.expire(key, 2 * WINDOW)


@dataclass(frozen=True)
class WorkerLoad:
    name: str
    # Jobs it runs now, and how many it can run at once.
    active: int
    slots: int


@dataclass(frozen=True)
class ModelLoad:
    model: str
    # "chat" (generation) or "embedding": which models the playground offers.
    kind: str
    workers: list[WorkerLoad]
    # Waiting for a worker (interactive and batch lanes), and queued or running (the model's
    # in-flight count, what its ``max_pending`` limits).
    queued: int
    in_flight: int
    # Tokens generated in each of the last ``WINDOW`` whole seconds, oldest first (the
    # second now running is not in it).
    tokens: list[int]

    def public(self) -> dict:
        out = asdict(self)
        out["running"] = sum(w.active for w in self.workers)
        out["tokens_per_second"] = round(sum(self.tokens) / WINDOW, 2)
        return out


def snapshot(redis, entries, now: float | None = None) -> list[ModelLoad]:
    """Every model of ``entries`` (registry entries: ``name``, ``queue``, ``kind``): two
    round trips."""
    now = time.time() if now is None else now
    last = int(now) - 1
    seconds = range(last - WINDOW + 1, last + 1)
    entries = list(entries)
    pipe = redis.pipeline(transaction=False)
    for e in entries:
        pipe.zrangebyscore(workers_key(e.queue), int(now * 1000), "+inf")
        pipe.zcard(queued_key(e.queue, False))
        pipe.zcard(queued_key(e.queue, True))
        pipe.zcard(pending_key(e.queue))
        pipe.mget([tokens_key(e.queue, s) for s in seconds])
    found = pipe.execute()
    pipe = redis.pipeline(transaction=False)
    names: list[list[str]] = []
    for i, e in enumerate(entries):
        names.append(sorted(w.decode() for w in found[5 * i]))
        for w in names[-1]:
            pipe.hmget(load_key(e.queue, w), "active", "slots")
    loads = iter(pipe.execute())
    out = []
    for i, e in enumerate(entries):
        workers = [WorkerLoad(w, *(int(x or 0) for x in next(loads))) for w in names[i]]
        _, interactive, bulk, in_flight, tokens = found[5 * i:5 * i + 5]
        out.append(ModelLoad(e.name, e.kind, workers, interactive + bulk, in_flight,
                             [int(t or 0) for t in tokens]))
    return out
