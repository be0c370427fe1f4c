"""Batch jobs (the Batch API) in Redis: the batch object, its plan and its chunk results.

One hash per batch holds the object's changing fields; status changes are conditional (a
Lua check-and-set), so a cancel and a worker finishing cannot overwrite each other. Each
chunk's results are written once, with its counts, in one Lua script: ``SET NX`` on the
chunk key, and only if that wrote, the counters move. A chunk run twice (its worker died
after writing, before acknowledging) therefore changes nothing the second time.

A batch's owner (``config/tenants.py``) is a field of its hash; ``get``, ``list`` and
``cancel`` take the owner and find nothing of anyone else's. Each owner has its own index.

Every batch not yet ended is in ``ACTIVE``, scored by its last sign of progress (created, a
chunk written, a chunk still running: ``touch``). A batch whose score falls a visibility
timeout behind is stalled: its unwritten work was lost (``BatchRunner.resume_stalled``).
An ended batch is kept ``batch_retention`` seconds, then its record goes (``EXPIRING``).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

import redis as redis_lib
from pydantic import BaseModel, Field

from config.errors import InvalidRequest, NotFound
from config.tenants import ANONYMOUS, ANY_OWNER

Status = Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired",
                 "cancelling", "cancelled"]
FINAL = ("failed", "completed", "expired", "cancelled")
TIMESTAMP_OF = {"in_progress": "in_progress_at", "finalizing": "finalizing_at",
                "completed": "completed_at", "failed": "failed_at", "expired": "expired_at",
                "cancelling": "cancelling_at", "cancelled": "cancelled_at"}
COMPLETION_WINDOW = 24 * 3600
INDEX = "ferry:batches"
ACTIVE = "ferry:batches:active"
# Ended batches ("<id> <owner>") by the time their record expires (the janitor drops them
# from their owner's index then).
EXPIRING = "ferry:batches:expiring"
# Chunk results outlive any batch (24 h window), then go, even if a batch never finalized.
CHUNK_TTL = 7 * 24 * 3600

_TRANSITION = """
local cur = redis.call('HGET', KEYS[1], 'status')
for i = 4, #ARGV do
  if cur == ARGV[i] then
    redis.call('HSET', KEYS[1], 'status', ARGV[1], ARGV[2], ARGV[3])
    return 1
  end
end
return 0
"""
_WRITE_CHUNK = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[4]) then
  redis.call('ZADD', KEYS[3], 'XX', ARGV[5], ARGV[6])
  redis.call('HINCRBY', KEYS[2], 'completed', ARGV[2])
  redis.call('HINCRBY', KEYS[2], 'failed', ARGV[3])
  return redis.call('HINCRBY', KEYS[2], 'chunks_done', 1)
end
return -1
"""
# Claims a stalled batch for one sweeper: moves its score to now if it is still below ARGV[1].
_CLAIM_STALLED = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[3])
if score and tonumber(score) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
  return 1
end
return 0
"""


class RequestCounts(BaseModel):
    total: int = 0
    completed: int = 0
    failed: int = 0


class BatchObject(BaseModel):
    """OpenAI's batch object."""

    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: dict[str, Any] | None = None
    input_file_id: str
    completion_window: str = "24h"
    status: Status
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts = RequestCounts()
    metadata: dict[str, str] | None = None
    # Whose batch it is (never shown): its lines run, and its output files are stored, as
    # theirs.
    owner: str = Field(default=ANONYMOUS, exclude=True)


class Chunk(BaseModel):
    """Lines ``first_line``... of the input file, between two byte offsets."""

    start: int
    end: int
    first_line: int


class ChunkResult(BaseModel):
    output: list[str] = []
    errors: list[str] = []


def _key(batch_id: str, part: str = "") -> str:
    return f"ferry:batch:{batch_id}{part}"


def _index(owner: str) -> str:
    # The anonymous owner's is the index every batch was in before owners existed.
    return INDEX if owner == ANONYMOUS else f"{INDEX}:{owner}"


class BatchStore:
    def __init__(self, redis: redis_lib.Redis, retention: float = 30 * 86400.0):
        # ``retention``: seconds an ended batch's record is kept (settings.batch_retention).
        self.redis, self.retention = redis, retention
        self._transition = redis.register_script(_TRANSITION)
        self._write_chunk = redis.register_script(_WRITE_CHUNK)
        self._claim_stalled = redis.register_script(_CLAIM_STALLED)

    def create(self, endpoint: str, input_file_id: str, metadata: dict[str, str] | None,
               owner: str) -> BatchObject:
        now = int(time.time())
        static = {"id": f"batch_{uuid.uuid4().hex}", "endpoint": endpoint,
                  "input_file_id": input_file_id, "created_at": now,
                  "expires_at": now + COMPLETION_WINDOW, "metadata": metadata}
        pipe = self.redis.pipeline()
        pipe.hset(_key(static["id"]), mapping={"static": json.dumps(static), "status": "validating",
                                               "owner": owner})
        pipe.zadd(_index(owner), {static["id"]: time.time()})
        pipe.zadd(ACTIVE, {static["id"]: time.time()})
        pipe.execute()
        return self.get(static["id"], owner=owner)

    def get(self, batch_id: str, *, owner: str | None) -> BatchObject:
        """The batch, if ``owner`` made it (``ANY_OWNER``: whoever did); else ``NotFound``."""
        h = {k.decode(): v.decode() for k, v in self.redis.hgetall(_key(batch_id)).items()}
        if not h or (owner is not ANY_OWNER and h.get("owner", ANONYMOUS) != owner):
            raise NotFound(f"No batch found with id '{batch_id}'.", param="batch_id")
        obj: dict[str, Any] = json.loads(h.pop("static"))
        obj["request_counts"] = {k: int(h.get(k, 0)) for k in ("total", "completed", "failed")}
        obj["errors"] = json.loads(h["errors"]) if "errors" in h else None
        obj["owner"] = h.get("owner", ANONYMOUS)
        for field in ("status", "output_file_id", "error_file_id", *TIMESTAMP_OF.values()):
            if field in h:
                obj[field] = h[field]
        return BatchObject.model_validate(obj)

    def list(self, owner: str, after: str | None, limit: int) -> tuple[list[BatchObject], bool]:
        """``owner``'s batches newest first, after the id ``after``."""
        ids = [i.decode() for i in self.redis.zrevrange(_index(owner), 0, -1)]
        if after is not None:
            ids = ids[ids.index(after) + 1:] if after in ids else []
        found = []
        for i in ids[:limit]:
            try:
                found.append(self.get(i, owner=owner))
            except NotFound:  # expired a moment ago; the janitor drops it from the index
                pass
        return found, len(ids) > limit

    def cancel(self, batch_id: str, *, owner: str) -> BatchObject:
        """Ask ``owner``'s batch to stop: it is ``cancelling`` until its running chunks end."""
        self.get(batch_id, owner=owner)
        if not self.transition(batch_id, "cancelling", "validating", "in_progress"):
            status = self.get(batch_id, owner=owner).status
            if status not in ("cancelling", "cancelled"):
                raise InvalidRequest(f"Cannot cancel a batch with status '{status}'.")
        return self.get(batch_id, owner=owner)

    def transition(self, batch_id: str, to: Status, *sources: Status) -> bool:
        """Move to ``to`` if the status is one of ``sources``; True if it moved."""
        return bool(self._transition(keys=[_key(batch_id)],
                                     args=[to, TIMESTAMP_OF[to], int(time.time()), *sources]))

    def fail(self, batch_id: str, errors: list[dict[str, Any]]) -> None:
        """End the batch as ``failed`` with ``errors`` (validation, or its input file gone
        while it ran)."""
        self.redis.hset(_key(batch_id), "errors", json.dumps({"object": "list", "data": errors}))
        if self.transition(batch_id, "failed", "validating", "cancelling", "in_progress"):
            self._ended(batch_id)

    def set_plan(self, batch_id: str, total: int, chunks: list[Chunk],
                 invalid: dict[int, str]) -> None:
        """What validation found: the chunks to run, and the lines that are errors already."""
        pipe = self.redis.pipeline()
        pipe.set(_key(batch_id, ":plan"), json.dumps([c.model_dump() for c in chunks]),
                 ex=CHUNK_TTL)
        if invalid:
            pipe.hset(_key(batch_id, ":invalid"), mapping={str(k): v for k, v in invalid.items()})
            pipe.expire(_key(batch_id, ":invalid"), CHUNK_TTL)
        pipe.hset(_key(batch_id), mapping={"total": total, "chunks": len(chunks)})
        pipe.execute()

    def plan(self, batch_id: str) -> list[Chunk]:
        raw = self.redis.get(_key(batch_id, ":plan"))
        return [Chunk.model_validate(c) for c in json.loads(raw)] if raw else []

    def invalid(self, batch_id: str, lines: range) -> dict[int, str]:
        """Validation errors (JSON) of the lines in ``lines`` that have one."""
        numbers = list(lines)
        if not numbers:
            return {}
        found = self.redis.hmget(_key(batch_id, ":invalid"), [str(n) for n in numbers])
        return {n: v.decode() for n, v in zip(numbers, found) if v is not None}

    def write_chunk(self, batch_id: str, index: int, result: ChunkResult) -> int | None:
        """Store a chunk's results once; the number of chunks done, or None if it was
        written before."""
        done = self._write_chunk(
            keys=[_key(batch_id, f":chunk:{index}"), _key(batch_id), ACTIVE],
            args=[result.model_dump_json(), len(result.output), len(result.errors), CHUNK_TTL,
                  time.time(), batch_id])
        return None if done == -1 else int(done)

    def chunk_written(self, batch_id: str, index: int) -> bool:
        return bool(self.redis.exists(_key(batch_id, f":chunk:{index}")))

    def chunk_result(self, batch_id: str, index: int) -> ChunkResult | None:
        raw = self.redis.get(_key(batch_id, f":chunk:{index}"))
        return ChunkResult.model_validate_json(raw) if raw else None

    def chunks_done(self, batch_id: str) -> tuple[int, int]:
        done, total = self.redis.hmget(_key(batch_id), ["chunks_done", "chunks"])
        return int(done or 0), int(total or 0)

    def finish(self, batch_id: str, status: Status, output_file_id: str | None,
               error_file_id: str | None) -> None:
        files = {k: v for k, v in (("output_file_id", output_file_id),
                                   ("error_file_id", error_file_id)) if v}
        if files:
            self.redis.hset(_key(batch_id), mapping=files)
        if self.transition(batch_id, status, "finalizing", "cancelling", "in_progress"):
            self._ended(batch_id)

    def _ended(self, batch_id: str) -> None:
        """Forget the batch's working state; keep its record ``retention`` seconds more."""
        n = self.chunks_done(batch_id)[1]
        owner = (self.redis.hget(_key(batch_id), "owner") or ANONYMOUS.encode()).decode()
        pipe = self.redis.pipeline()
        pipe.delete(_key(batch_id, ":plan"), _key(batch_id, ":invalid"),
                    *[_key(batch_id, f":chunk:{i}") for i in range(n)])
        pipe.zrem(ACTIVE, batch_id)
        pipe.expire(_key(batch_id), int(self.retention))
        # The member names the owner's index too: the record is gone when the sweep runs.
        pipe.zadd(EXPIRING, {f"{batch_id} {owner}": time.time() + self.retention})
        pipe.execute()

    # -- progress and expiry -----------------------------------------------------------------

    def touch(self, batch_id: str) -> None:
        """A sign of progress: one of the batch's chunks is running."""
        self.redis.zadd(ACTIVE, {batch_id: time.time()}, xx=True)

    def stalled(self, before: float, count: int = 100) -> list[str]:
        """Batches not ended whose last progress is older than ``before``."""
        return [i.decode() for i in self.redis.zrangebyscore(ACTIVE, "-inf", before,
                                                             start=0, num=count)]

    def claim_stalled(self, batch_id: str, before: float) -> bool:
        """Whether this caller is the one to resume a stalled batch (its score moves on)."""
        return bool(self._claim_stalled(keys=[ACTIVE], args=[before, time.time(), batch_id]))

    def forget(self, batch_id: str) -> None:
        self.redis.zrem(ACTIVE, batch_id)

    def sweep_expired(self) -> None:
        """Drop the records whose retention has passed from the list of batches."""
        due = self.redis.zrangebyscore(EXPIRING, "-inf", time.time(), start=0, num=500)
        if due:
            pipe = self.redis.pipeline()
            for member in due:
                batch_id, _, owner = member.decode().partition(" ")
                pipe.zrem(_index(owner or ANONYMOUS), batch_id)
                pipe.delete(_key(batch_id))
            pipe.zrem(EXPIRING, *due)
            pipe.execute()
