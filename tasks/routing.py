"""Prefix affinity: send a chat job to the worker that most likely holds its prompt's prefix
in its cache, when that worker is live and has a free thread; otherwise to the model's
shared queue, as without routing.

The web does not tokenize, so a prefix is named by what both sides have: the digest of the
job's messages in their template form (``prefix_digest``). A conversation's next turn starts
with this turn's messages and this turn's reply, so a worker that finishes a chat job
records two names in Redis, each pointing at itself for ``affinity_ttl``: the request's own
prefix and the whole conversation including each choice's reply (``Served``). The web looks
up the incoming request's prefix, i.e. its messages up to and including the last assistant
message (``Router``). A wrong guess costs a cache miss, never a wrong answer.

Each model worker also consumes a queue of its own, ``<queue>.<worker name>``. Its messages
exist nowhere else (model queues ack on receipt), so a worker that dies with messages there
would strand them. Two things prevent that. The web process waiting for a routed job sends it
to the shared queue once the worker's heartbeat lapses before the job started
(``web/relay.py``): that also covers a message the worker's pending BRPOP took into a cut
link. And every web process's janitor moves the messages left in a lapsed worker's own queue
to the head of the shared queue's line, in order (``rescue``), which covers jobs nobody
waits for (``/v1/jobs``). A move is one Lua script, so a message is either taken by its
worker or moved, never both; of two messages of one job, the job's record lets one start it
(``JobStore.start``), so nothing runs twice.

Imports neither ``web`` nor Celery: both sides use it.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any, Literal

from config.contract.job import GenerationJob
from config.contract.protocol import workers_key

# Kombu's Redis transport keeps one list per priority step: the plain name for 0, else
# ``<queue>\x06\x16<step>`` (kombu.transport.redis: PRIORITY_STEPS, Channel.sep).
_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")

# hit: routed. Otherwise why not: no worker named (miss), it is gone (dead) or has no free
# thread (busy), one worker only (single), routing off, nothing to name (unkeyed), or a
# Redis error while choosing (error).
Reason = Literal["hit", "miss", "dead", "busy", "single", "off", "unkeyed", "error"]


def worker_queue(queue: str, worker: str) -> str:
    """The Celery queue only ``worker`` consumes, beside the model's shared ``queue``."""
    return f"{queue}.{worker}"


def affinity_key(queue: str, digest: str) -> str:
    return f"ferry:affinity:{queue}:{digest}"


def load_key(queue: str, worker: str) -> str:
    """A worker's hash: ``active`` jobs and ``slots`` (its pool's threads). Its presence says
    the worker consumes its own queue; it expires with the worker's heartbeat."""
    return f"ferry:load:{queue}:{worker}"


def routes_key(queue: str) -> str:
    """Workers the web sent jobs to (score: last time, ms): the own queues the janitor
    watches."""
    return f"ferry:routes:{queue}"


# -- naming prefixes -------------------------------------------------------------------------

def _canonical(message: dict[str, Any]) -> dict[str, Any]:
    """What of a message a chat template renders, without the ids a client or the worker
    makes up (tool call ids); the same for a client's message and a worker's reply."""
    out: dict[str, Any] = {"role": message.get("role"), "content": message.get("content") or ""}
    calls = message.get("tool_calls")
    if calls:
        out["tool_calls"] = [[c["function"]["name"], c["function"]["arguments"]] for c in calls]
    for key in ("name", "tool_call_id"):
        if message.get(key) is not None:
            out[key] = message[key]
    return out


def digest(job: GenerationJob, messages: list[dict[str, Any]]) -> str:
    """The name of a rendered conversation prefix: model, tools and messages, canonical JSON,
    sha256. Images are named by their index only (a collision is a cache miss)."""
    body = {"model": job.model, "tools": [t.model_dump(mode="json") for t in job.tools],
            "messages": [_canonical(m) for m in messages]}
    raw = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(raw.encode()).hexdigest()


def prefix_end(messages: list[dict[str, Any]]) -> int:
    """How many of ``messages`` a worker may already hold: up to and including the last
    assistant message (the end of the previous turn); with none, the leading system
    messages."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "assistant":
            return i + 1
    n = 0
    while n < len(messages) and messages[n].get("role") == "system":
        n += 1
    return n


def prefix_digest(job: GenerationJob) -> str | None:
    """The digest of the part of a chat job another turn may have left in a cache; None for
    a completion or a conversation with nothing before its last turn."""
    if not job.messages:
        return None
    end = prefix_end(job.messages)
    return digest(job, job.messages[:end]) if end else None


def reply_message(text: str, tool_calls: list[dict[str, Any]]) -> dict[str, Any]:
    """A choice's reply as the client sends it back next turn (arguments parsed, as
    ``for_template`` does)."""
    msg: dict[str, Any] = {"role": "assistant", "content": text}
    if tool_calls:
        calls = []
        for c in tool_calls:
            try:
                arguments = json.loads(c["function"]["arguments"] or "{}")
            except ValueError:
                arguments = c["function"]["arguments"]
            calls.append({"function": {"name": c["function"]["name"], "arguments": arguments}})
        msg["tool_calls"] = calls
    return msg


# -- the worker's side -----------------------------------------------------------------------

class Served:
    """What a model worker tells the routers: its load, and the prefixes it now holds."""

    def __init__(self, redis, queue: str, worker: str, slots: int, ttl: float,
                 alive_for: float):
        self.redis, self.queue, self.worker, self.slots = redis, queue, worker, slots
        self.ttl_ms, self.alive_ms = int(ttl * 1000), int(alive_for * 1000)
        self.key = load_key(queue, worker)

    def beat(self, pipe, active: int) -> None:
        """Queued on the heartbeat's pipeline: the load hash lives as long as the worker,
        and its count of ``active`` jobs is set right again every beat (after an outage
        that let the hash expire, say; between beats ``busy`` moves it)."""
        pipe.hset(self.key, mapping={"slots": self.slots, "active": active})
        pipe.pexpire(self.key, self.alive_ms)

    def busy(self, delta: int, pipe=None) -> None:
        """A job started (+1) or ended (-1) here; queued on ``pipe`` if given (sent with the
        job's start, ``JobStore.start``), else sent now."""
        own = pipe is None
        pipe = self.redis.pipeline(transaction=False) if own else pipe
        pipe.hincrby(self.key, "active", delta)
        pipe.pexpire(self.key, self.alive_ms)
        if own:
            pipe.execute()

    def ended(self, job: GenerationJob | None, replies: list[tuple[str, list[dict]]],
              pipe=None) -> None:
        """A job ended here (before its terminal event; on ``pipe`` as for ``busy``, sent
        with the job's end, ``JobStore.finish``): one job less, and for a chat ``job`` that
        ended with ``replies`` (one per choice), its prefix and each continuation now point
        here."""
        names = []
        if job is not None and job.messages:
            names = [digest(job, job.messages + [reply_message(text, calls)])
                     for text, calls in replies]
            own = prefix_digest(job)
            if own is not None:
                names.append(own)
        own = pipe is None
        pipe = self.redis.pipeline(transaction=False) if own else pipe
        for name in names:
            pipe.set(affinity_key(self.queue, name), self.worker, px=self.ttl_ms)
        self.busy(-1, pipe)
        if own:
            pipe.execute()

    def forget(self) -> None:
        self.redis.delete(self.key)


# -- the web's side --------------------------------------------------------------------------

# KEYS: affinity key, live workers, routes. ARGV: now (ms), own queues' prefix, extra
# queued jobs allowed, load keys' prefix (the workers' keys are named from what it finds).
# Returns {reason} or {'hit', worker}.
_CHOOSE = """
local w = redis.call('GET', KEYS[1])
if not w then return {'miss'} end
local alive = redis.call('ZSCORE', KEYS[2], w)
if not alive or tonumber(alive) < tonumber(ARGV[1]) then return {'dead'} end
if redis.call('ZCOUNT', KEYS[2], ARGV[1], '+inf') < 2 then return {'single'} end
local load = redis.call('HMGET', ARGV[4] .. w, 'active', 'slots')
if not load[2] then return {'dead'} end
local active = math.max(0, tonumber(load[1] or '0'))
local waiting = redis.call('LLEN', ARGV[2] .. w)
if active + waiting >= tonumber(load[2]) + tonumber(ARGV[3]) then return {'busy'} end
redis.call('ZADD', KEYS[3], ARGV[1], w)
return {'hit', w}
"""

# KEYS: routes, live workers. ARGV: now (ms), shared queue, forget routes older than (ms),
# own queues' prefix, then the priority suffixes. Moves every message of a lapsed worker's
# own queue onto the shared queue, to the head of its line in their order; returns how many.
_RESCUE = """
local moved = 0
for _, w in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local alive = redis.call('ZSCORE', KEYS[2], w)
  if not alive or tonumber(alive) < tonumber(ARGV[1]) then
    for i = 5, #ARGV do
      local src = ARGV[4] .. w .. ARGV[i]
      local dst = ARGV[2] .. ARGV[i]
      local msg = redis.call('LPOP', src)
      while msg do
        redis.call('RPUSH', dst, msg)
        moved = moved + 1
        msg = redis.call('LPOP', src)
      end
    end
    if tonumber(redis.call('ZSCORE', KEYS[1], w)) < tonumber(ARGV[3]) then
      redis.call('ZREM', KEYS[1], w)
    end
  end
end
return moved
"""


@dataclass(frozen=True)
class Route:
    queue: str
    reason: Reason
    worker: str | None = None


class Router:
    """The web's choice of queue for a job, one Redis round trip (``choose``), and the
    janitor's rescue of stranded own queues (``rescue``)."""

    def __init__(self, redis, *, enabled: bool, max_queued: int, forget_after: float):
        self.redis, self.enabled, self.max_queued = redis, enabled, max_queued
        self.forget_ms = int(forget_after * 1000)
        self._choose = redis.register_script(_CHOOSE)
        self._rescue = redis.register_script(_RESCUE)

    def choose(self, queue: str, job) -> Route:
        if not self.enabled:
            return Route(queue, "off")
        name = prefix_digest(job) if isinstance(job, GenerationJob) else None
        if name is None:
            return Route(queue, "unkeyed")
        found = self._choose(keys=[affinity_key(queue, name), workers_key(queue),
                                   routes_key(queue)],
                             args=[_now_ms(), worker_queue(queue, ""), self.max_queued,
                                   load_key(queue, "")])
        reason = found[0].decode()
        if reason != "hit":
            return Route(queue, reason)
        worker = found[1].decode()
        return Route(worker_queue(queue, worker), "hit", worker)

    def rescue(self, queue: str) -> int:
        """Move the messages of every routed-to worker that is no longer live onto ``queue``;
        how many were moved."""
        now = _now_ms()
        return int(self._rescue(keys=[routes_key(queue), workers_key(queue)],
                                args=[now, queue, now - self.forget_ms,
                                      worker_queue(queue, ""), *_PRIORITY_SUFFIXES]))


def _now_ms() -> int:
    return int(time.time() * 1000)
