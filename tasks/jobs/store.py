"""Job state in Redis: one hash per job, changed only by atomic transitions.

    queued ──start──> in_progress ──finish──> completed | failed | cancelled
       │                   └──(its worker died, or lost its end; the web's janitor)──> failed
       └──cancel──> cancelled,  └──(not started by its deadline)──> expired

Each transition is one Lua script that checks the status it leaves, so a cancel racing a
worker's start, or two janitors racing each other, change a job exactly once; whoever ended
it calls ``on_end`` (which queues the webhook). A transition that ends a job its worker will
never report on (cancelled or expired before starting, worker dead) also writes the job's
terminal ``Failed`` event to the replay buffer and the channel, numbered after the last event
there, so every job's event stream still ends with Done or Failed.

The record expires at its ``retained_until``, ``job_ttl`` after creation (an absolute
PEXPIREAT, so the promise and the deletion cannot drift apart by a round trip; later writes
keep that expiry). A result larger than ``job_result_max_bytes`` is not kept: the record
says so in ``result_omitted`` (the synchronous reply, built from the events, is whole).

Queued jobs are also kept, per queue and lane (interactive or bulk, Celery's priority lists),
in a sorted set by creation time: ``position`` is one ZCOUNT there, never a scan of Celery's
list. The lane's key is stored on the job, and every transition out of ``queued`` removes
the job from it in the same script (single-instance Redis: the scripts touch that key by name).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import redis as redis_lib

from config.errors import FerryError, JobCancelled, JobExpired, JobLost, WorkerLost
from config.settings import Settings
from config.tenants import ANY_OWNER
from tasks.jobs.record import JobRecord, JobStatus
from tasks.jobs.shapes import ResponseSpec
from tasks.routing import routes_key, worker_queue
from config.contract import events
from config.contract.protocol import (PENDING_JOBS, RUNNING_JOBS, cancel_key, celery_list,
                                      events_channel, events_log, job_key, owner_jobs_key,
                                      owner_pending_key, pending_key, queued_key,
                                      request_cancel, worker_jobs_key, workers_key)


@dataclass(frozen=True)
class InFlight:
    """A model's in-flight limit, as ``create`` applies it (``tasks/core/limits.py`` builds it)."""

    key: str
    limit: int
    # Entries admitted before this (Unix time) are leftovers of a crashed web process.
    stale_before: float


class Refused(Exception):
    """``create`` recorded nothing: ``reason`` is "full" (``count`` in flight), "owner_full"
    (the owner's limit) or "no_worker"."""

    def __init__(self, reason: str, count: int = 0):
        super().__init__(reason)
        self.reason, self.count = reason, count


# Records a new job, after the checks that may refuse it, in one round trip.
# KEYS: job, pending jobs, the model's in-flight set, the model's live workers, the owner's
# in-flight set, the lane, the owner's jobs. ARGV: job id, deadline, expiry (Unix ms), now, now (ms), model
# in-flight limit (0: none), stale before, check workers (1/0), owner in-flight limit (0:
# none), owner stale before, created before this are gone (lane), then the record's
# field/value pairs. Both limits are checked before either set is joined, so a refused job
# holds no place in either.
_CREATE = """
if ARGV[8] == '1' and redis.call('ZCOUNT', KEYS[4], ARGV[5], '+inf') == 0 then
  return {'no_worker'}
end
local sets = {{KEYS[3], tonumber(ARGV[6]), ARGV[7], 'full'},
              {KEYS[5], tonumber(ARGV[9]), ARGV[10], 'owner_full'}}
for _, s in ipairs(sets) do
  if s[2] > 0 then
    redis.call('ZREMRANGEBYSCORE', s[1], 0, s[3])
    local n = redis.call('ZCARD', s[1])
    if n >= s[2] then return {s[4], n} end
  end
end
for _, s in ipairs(sets) do
  if s[2] > 0 then redis.call('ZADD', s[1], ARGV[4], ARGV[1]) end
end
redis.call('HSET', KEYS[1], 'lane', KEYS[6], unpack(ARGV, 12))
redis.call('PEXPIREAT', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', ARGV[11])
redis.call('ZADD', KEYS[6], ARGV[4], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[7], '-inf', ARGV[11])
redis.call('ZADD', KEYS[7], ARGV[4], ARGV[1])
redis.call('PEXPIREAT', KEYS[7], ARGV[3])
return {'ok'}
"""

# KEYS: job, pending, running, cancel flag. ARGV: worker, now, job id.
# Returns {status found} if the job must not start ('late': queued past its deadline), else
# {'in_progress', cancel requested (0/1), the record's fields}: one round trip. A start the
# same worker already made (a retry whose first reply was lost) is answered as a start.
_START = """
local st = redis.call('HGET', KEYS[1], 'status')
if st == 'in_progress' and redis.call('HGET', KEYS[1], 'worker') == ARGV[1] then
  -- this worker's own start, retried after its reply was lost
  return {'in_progress', redis.call('EXISTS', KEYS[4]), redis.call('HGETALL', KEYS[1])}
end
if st ~= 'queued' then return {st or ''} end
local deadline = tonumber(redis.call('HGET', KEYS[1], 'deadline'))
if deadline and tonumber(ARGV[2]) > deadline then return {'late'} end
redis.call('HSET', KEYS[1], 'status', 'in_progress', 'started', ARGV[2], 'worker', ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[3])
local lane = redis.call('HGET', KEYS[1], 'lane')
if lane then redis.call('ZREM', lane, ARGV[3]) end
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[3])
return {'in_progress', redis.call('EXISTS', KEYS[4]), redis.call('HGETALL', KEYS[1])}
"""

# The end of a script that ended a job: its place in the model's and its owner's in-flight
# limits (``tasks/core/limits.py``) is free again, whichever way it ended (an expired Celery
# task never reaches a worker). Returns 2 if the job has a webhook (``JobStore.on_end``
# then reads the record), else 1. Placeholders: the job id and the two keys' prefixes.
_RELEASE = """
local ended = redis.call('HMGET', KEYS[1], 'queue', 'owner', 'webhook')
if ended[1] then redis.call('ZREM', {pending} .. ended[1], {id}) end
if ended[2] then redis.call('ZREM', {owner_pending} .. ended[2], {id}) end
if ended[3] then return 2 end
return 1
"""

# KEYS: job, running. ARGV: status, now, result json or '', error json or '', job id,
# why the result is not kept or '', the in-flight keys' prefixes.
_FINISH = """
if redis.call('HGET', KEYS[1], 'status') ~= 'in_progress' then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'finished', ARGV[2])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'result', ARGV[3]) end
if ARGV[6] ~= '' then redis.call('HSET', KEYS[1], 'result_omitted', ARGV[6]) end
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[4]) end
redis.call('ZREM', KEYS[2], ARGV[5])
""" + _RELEASE.format(id="ARGV[5]", pending="ARGV[7]", owner_pending="ARGV[8]")

# Ends a job nobody else will report on. KEYS: job, index (pending or running), events log,
# channel (and the web process's reply channel the job names, if any). ARGV: from status, to
# status, now, error json or '', terminal event json, events log max length, events log ttl
# (ms), job id, worker ('' = any), the in-flight keys' prefixes.
_END = """
if redis.call('HGET', KEYS[1], 'status') ~= ARGV[1] then return 0 end
if ARGV[9] ~= '' and redis.call('HGET', KEYS[1], 'worker') ~= ARGV[9] then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'finished', ARGV[3])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[4]) end
redis.call('ZREM', KEYS[2], ARGV[8])
local lane = redis.call('HGET', KEYS[1], 'lane')
if lane then redis.call('ZREM', lane, ARGV[8]) end
local seq = 0
local last = redis.call('LINDEX', KEYS[3], -1)
if last then
  local msg = cjson.decode(last)
  seq = msg['s'] + #msg['e']
end
local out = '{"s":' .. seq .. ',"e":[' .. ARGV[5] .. ']}'
local max = tonumber(ARGV[6])
if redis.call('RPUSH', KEYS[3], out) > max then redis.call('LTRIM', KEYS[3], -max, -1) end
redis.call('PEXPIRE', KEYS[3], ARGV[7])
redis.call('PUBLISH', KEYS[4], out)
local reply = redis.call('HGET', KEYS[1], 'reply_to')
if reply then
  redis.call('PUBLISH', reply, ARGV[8] .. ' ' .. seq .. ' [' .. ARGV[5] .. ']')
end
""" + _RELEASE.format(id="ARGV[8]", pending="ARGV[10]", owner_pending="ARGV[11]")
# The queued jobs of a lane created before ARGV[1] whose Celery message is not in the lane's
# list, nor in the lane's list of any worker jobs were routed to (KEYS: lane, list, routed-to
# workers; ARGV: created before, worker-queue prefix, lane suffix). The list is read from its oldest end (kombu pops from the right),
# where old jobs' messages are, and only until every one is found: O(old jobs) when nothing
# is lost. A message's task id is its envelope's first "id" key (Celery's headers).
_MISSING = """
local old = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 100)
if #old == 0 then return {} end
local missing, left = {}, #old
for _, id in ipairs(old) do missing[id] = true end
local lists = {KEYS[2]}
for _, w in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
  table.insert(lists, ARGV[2] .. w .. ARGV[3])
end
for _, list in ipairs(lists) do
  local n, page = redis.call('LLEN', list), 200
  local i = 0
  while i < n and left > 0 do
    local msgs = redis.call('LRANGE', list, -(i + page), -(i + 1))
    for _, m in ipairs(msgs) do
      local id = string.match(m, '"id": ?"([^"]+)"')
      if id and missing[id] then missing[id] = nil; left = left - 1 end
    end
    i = i + page
  end
end
local out = {}
for _, id in ipairs(old) do if missing[id] then table.insert(out, id) end end
return out
"""
# Running jobs started a worker timeout ago whose worker died, or is alive but no longer
# lists them (see ``sweep``); those that ended meanwhile leave the running index. KEYS: the
# running index. ARGV: started before, now (ms: a worker is live while its heartbeat's
# score is ahead of it), and the key prefixes of jobs, of a queue's workers and of a
# worker's job list. Returns {job id, worker, "1" if the worker is alive} per job to fail.
# Run in Redis: the web read every such job's status, queue and worker each second, in
# every web process, which cost more CPU than the tokens it streamed meanwhile.
_STALE_RUNNING = """
local out, live, listed = {}, {}, {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])) do
  local h = redis.call('HMGET', ARGV[3] .. id, 'status', 'queue', 'worker')
  if h[1] ~= 'in_progress' then
    redis.call('ZREM', KEYS[1], id)
  else
    local queue, worker = h[2] or '', h[3] or ''
    local key = queue .. ' ' .. worker
    if live[key] == nil then
      local score = redis.call('ZSCORE', ARGV[4] .. queue, worker)
      live[key] = score ~= false and tonumber(score) >= tonumber(ARGV[2])
    end
    if not live[key] then
      table.insert(out, id); table.insert(out, worker); table.insert(out, '0')
    else
      if listed[worker] == nil then
        local raw = redis.call('GET', ARGV[5] .. worker)
        listed[worker] = raw and (' ' .. raw .. ' ') or false
      end
      if listed[worker] and not string.find(listed[worker], ' ' .. id .. ' ', 1, true) then
        table.insert(out, id); table.insert(out, worker); table.insert(out, '1')
      end
    end
  end
end
return out
"""
# Jobs ahead of a queued one (see ``position``). KEYS: job, the queue's interactive lane.
# ARGV: job id. -1: the job has no lane (not queued).
_POSITION = """
local lane = redis.call('HGET', KEYS[1], 'lane')
if not lane then return -1 end
local score = redis.call('ZSCORE', lane, ARGV[1])
if not score then return 0 end
local ahead = redis.call('ZCOUNT', lane, '-inf', '(' .. score)
if lane ~= KEYS[2] then ahead = ahead + redis.call('ZCARD', KEYS[2]) end
return ahead
"""


class JobStore:
    def __init__(self, redis, settings: Settings,
                 on_end: Callable[[JobRecord], None] | None = None):
        self.redis, self.settings, self.on_end = redis, settings, on_end
        self._start = redis.register_script(_START)
        self._create = redis.register_script(_CREATE)
        self._finish = redis.register_script(_FINISH)
        self._end = redis.register_script(_END)
        self._position = redis.register_script(_POSITION)
        self._missing = redis.register_script(_MISSING)
        self._stale_running = redis.register_script(_STALE_RUNNING)
        self.events_ttl_ms = int(min(settings.job_events_ttl, settings.job_ttl) * 1000)

    # -- reading ----------------------------------------------------------------------------

    def get(self, job_id: str, *, owner: str | None) -> JobRecord | None:
        """The job, if ``owner`` made it (``ANY_OWNER``: whoever did); None otherwise, as
        if it did not exist."""
        raw = self.redis.hgetall(job_key(job_id))
        record = JobRecord.from_hash(raw) if raw else None
        if record is None or (owner is not ANY_OWNER and record.owner != owner):
            return None
        return record

    def list(self, owner: str, *, after: str | None,
             limit: int) -> tuple[list[JobRecord], bool]:
        """``owner``'s jobs newest first, those after the job ``after`` (none if that job is
        no longer listed); and whether more follow. Two round trips: the page of ids from the
        owner's index, then their records. A record gone (its TTL passed a moment before the
        index was pruned) is left out."""
        index, start = owner_jobs_key(owner), 0
        if after is not None:
            rank = self.redis.zrevrank(index, after)
            if rank is None:
                return [], False
            start = rank + 1
        ids = self.redis.zrevrange(index, start, start + limit)
        pipe = self.redis.pipeline(transaction=False)
        for raw in ids[:limit]:
            pipe.hgetall(job_key(raw.decode()))
        found = [JobRecord.from_hash(h) for h in pipe.execute() if h]
        return [r for r in found if r.owner == owner], len(ids) > limit

    def position(self, record: JobRecord) -> int | None:
        """Jobs ahead of a queued one: those of its lane created before it and not yet
        started, and for a bulk job every queued interactive one too (Celery takes those
        first). Approximate: order of creation stands for order of enqueueing, and a job
        a worker has taken but not yet marked started still counts. O(log n), one round
        trip. None unless queued."""
        if record.status != "queued":
            return None
        ahead = self._position(keys=[job_key(record.id), queued_key(record.queue, bulk=False)],
                               args=[record.id])
        return None if ahead < 0 else int(ahead)

    def replay(self, job_id: str, after: int = -1) -> Iterator[tuple[int, events.Event]]:
        """The job's events kept in its replay buffer with a sequence number above ``after``,
        each once: a drain its worker sent again (its reply lost with a connection) is in the
        buffer twice.

        The buffer is read whole, in one LRANGE: its writers trim it from its oldest end, so
        a list read in pages by index would skip as many messages as were trimmed between
        two pages (a stream's entry ids did not move). It is capped (``job_events_max``
        messages, and a sixteenth more), and every reader reads on to its end anyway."""
        for message in self.redis.lrange(events_log(job_id), 0, -1):
            first, evs = events.decode(message)
            for i, ev in enumerate(evs):
                if first + i > after:
                    after = first + i
                    yield after, ev

    # -- transitions ------------------------------------------------------------------------

    def create(self, *, job_id: str, endpoint: str, model: str, queue: str, spec: ResponseSpec,
               deadline: float, owner: str, webhook: str | None = None,
               in_flight: InFlight | None = None, owner_in_flight: InFlight | None = None,
               live_workers: str | None = None, bulk: bool = False,
               reply_to: str | None = None) -> JobRecord:
        """Record a queued job of ``owner``. ``in_flight``: count it against the model's
        in-flight limit (``Refused("full")`` at the limit); ``owner_in_flight``: against its
        owner's (``Refused("owner_full")``); ``live_workers``: the model's heartbeat set,
        ``Refused("no_worker")`` if no worker in it is live; ``bulk``: its lane (see the
        module docstring); ``reply_to``: the web process's channel its events also go to
        (where an end reported here goes too). One round trip in all."""
        now = time.time()
        record = JobRecord(id=job_id, endpoint=endpoint, model=model, queue=queue,
                           status="queued", spec=spec, created=now, deadline=deadline,
                           retained_until=now + self.settings.job_ttl, webhook=webhook,
                           owner=owner)
        fields = [x for kv in record.to_hash().items() for x in kv]
        if reply_to:
            fields += ["reply_to", reply_to]
        unused = job_key(job_id)
        found = self._create(
            keys=[job_key(job_id), PENDING_JOBS, in_flight.key if in_flight else unused,
                  live_workers or unused,
                  owner_in_flight.key if owner_in_flight else unused, queued_key(queue, bulk),
                  owner_jobs_key(owner)],
            args=[job_id, deadline, int(record.retained_until * 1000), now, int(now * 1000),
                  in_flight.limit if in_flight else 0,
                  in_flight.stale_before if in_flight else 0, 1 if live_workers else 0,
                  owner_in_flight.limit if owner_in_flight else 0,
                  owner_in_flight.stale_before if owner_in_flight else 0,
                  now - self.settings.job_ttl, *fields])
        if found[0] != b"ok":
            raise Refused(found[0].decode(), int(found[1]) if len(found) > 1 else 0)
        return record

    def discard(self, job_id: str) -> None:
        """Forget a job that could not be enqueued (its submitter got an error instead)."""
        lane, owner = self.redis.hmget(job_key(job_id), "lane", "owner")
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(job_key(job_id))
        pipe.zrem(PENDING_JOBS, job_id)
        if lane is not None:
            pipe.zrem(lane.decode(), job_id)
        if owner is not None:
            pipe.zrem(owner_jobs_key(owner.decode()), job_id)
        pipe.execute()

    def start(self, job_id: str, worker: str, also: Also | None = None
              ) -> tuple[JobRecord, bool] | None:
        """A worker takes the job: its record and whether a cancel was already asked for, or
        None if it must not run (cancelled, expired — now or before — or unknown).
        ``also(pipe)``: commands of the caller's own sent in the same round trip."""
        found = _with(self.redis, self._start, also,
                      keys=[job_key(job_id), PENDING_JOBS, RUNNING_JOBS, cancel_key(job_id)],
                      args=[worker, time.time(), job_id])
        if found[0] == b"late":
            self.expire(job_id)
        if found[0] != b"in_progress":
            return None
        fields = found[2]
        record = JobRecord.from_hash(dict(zip(fields[::2], fields[1::2])))
        return record, bool(found[1])

    def finish(self, job_id: str, status: JobStatus, *, result: dict | None = None,
               error: dict | None = None, also: Also | None = None) -> bool:
        """The worker ends a job it ran (the only way out of ``in_progress`` but a dead worker).
        A result over ``job_result_max_bytes`` is replaced by a note in ``result_omitted``.
        True if this ended it, which frees its in-flight places too (``_RELEASE``); ``also``
        as for ``start``."""
        stored, omitted = _json(result), ""
        limit = self.settings.job_result_max_bytes
        if len(stored) > limit:
            stored, omitted = "", (
                f"The result ({len(stored)} bytes) is larger than the {limit} bytes kept per "
                "job (FERRY_JOB_RESULT_MAX_BYTES): it went to the synchronous client and the "
                "job's event stream only.")
        done = _with(self.redis, self._finish, also, keys=[job_key(job_id), RUNNING_JOBS], args=[
            status, time.time(), stored, _json(error), job_id, omitted, pending_key(""),
            owner_pending_key("")])
        return self._ended(job_id, done)

    def cancel(self, job_id: str, *, owner: str | None) -> JobRecord | None:
        """A queued job is cancelled at once and never runs; a running one is asked to stop
        (its worker ends it, within one decode step, as ``cancelled`` with its partial
        output). None if there is no such job of ``owner``."""
        record = self.get(job_id, owner=owner)
        if record is None or record.done:
            return record
        # Tell the workers in any case: the job may start between the read and the script.
        request_cancel(self.redis, job_id)
        if record.status == "queued":
            self._end_unreported(job_id, "queued", "cancelled", PENDING_JOBS,
                                 JobCancelled("The job was cancelled before it started."),
                                 keep_error=False)
        return self.get(job_id, owner=owner)

    def expire(self, job_id: str) -> bool:
        return self._end_unreported(
            job_id, "queued", "expired", PENDING_JOBS,
            JobExpired("The job was not started before its deadline."), keep_error=True)

    def fail_lost(self, job_id: str, worker: str, *, alive: bool = False) -> bool:
        err = WorkerLost(
            f"The worker running this job ({worker}) no longer runs it: its end was "
            "lost (Redis restarted)." if alive else
            f"The worker running this job ({worker}) stopped responding.")
        return self._end_unreported(job_id, "in_progress", "failed", RUNNING_JOBS, err,
                                    keep_error=True, worker=worker)

    def missing(self, queue: str, bulk: bool, created_before: float) -> list[str]:
        """Queued jobs of a lane, created before ``created_before``, whose Celery message is
        in no queue: lost with Redis's last writes before a restart, or with a worker killed
        between taking a message and starting its job. A worker may be in that window right
        now, so the caller confirms with a second look before ``fail_lost_message``."""
        # Besides the model's list, the own lists of the workers jobs were routed to
        # (``tasks/routing.py``): a routed job waits there until its worker takes it.
        found = self._missing(keys=[queued_key(queue, bulk), celery_list(queue, bulk),
                                    routes_key(queue)],
                              args=[created_before, worker_queue(queue, ""),
                                    celery_list("", bulk)])
        return [raw.decode() for raw in found]

    def fail_lost_message(self, job_id: str) -> bool:
        """End a queued job whose message is gone (see ``missing``) as ``failed``,
        ``job_lost``. Exactly once against a worker's start: if one took the message after
        all, its start finds the job failed and skips it."""
        return self._end_unreported(
            job_id, "queued", "failed", PENDING_JOBS,
            JobLost("The job's queued message was lost (Redis restarted, or a worker died "
                    "as it took it); it was not run."), keep_error=True)

    def sweep(self) -> None:
        """Expire queued jobs past their deadline; fail running jobs whose worker died, or
        is alive but no longer lists them (their end was lost: a write Redis dropped in a
        restart). Called periodically by every web process (the transitions make that safe).
        A running job is looked at once it started a worker timeout ago: a heartbeat since
        has listed it if its worker runs it."""
        now = time.time()
        for raw in self.redis.zrangebyscore(PENDING_JOBS, "-inf", now, start=0, num=100):
            if not self.expire(raw.decode()):
                self.redis.zrem(PENDING_JOBS, raw)  # started, cancelled, or deleted by TTL
        found = self._stale_running(
            keys=[RUNNING_JOBS],
            args=[now - self.settings.worker_timeout, int(now * 1000), job_key(""),
                  workers_key(""), worker_jobs_key("")])
        for i in range(0, len(found), 3):
            job_id, worker, alive = (raw.decode() for raw in found[i:i + 3])
            self.fail_lost(job_id, worker, alive=alive == "1")

    # -- internals --------------------------------------------------------------------------

    def _end_unreported(self, job_id: str, frm: str, to: str, index: str, err: FerryError, *,
                        keep_error: bool, worker: str = "") -> bool:
        event = json.dumps(dataclasses.asdict(events.failed(err)), separators=(",", ":"))
        done = self._end(
            keys=[job_key(job_id), index, events_log(job_id), events_channel(job_id)],
            args=[frm, to, time.time(), _json(err.to_dict()) if keep_error else "", event,
                  self.settings.job_events_max, self.events_ttl_ms, job_id, worker,
                  pending_key(""), owner_pending_key("")])
        return self._ended(job_id, done)

    def _ended(self, job_id: str, done) -> bool:
        """After a script that ended a job (``_RELEASE``'s reply): its webhook, if any."""
        if not done:
            return False
        if done == 2 and self.on_end is not None:
            record = self.get(job_id, owner=ANY_OWNER)
            if record is not None:
                self.on_end(record)
        return True


# Queues a caller's own commands on a pipeline (``JobStore.start``, ``finish``).
Also = Callable[[Any], None]


def _with(redis, script, also: Also | None, *, keys: list, args: list):
    """``script``'s reply; with ``also``, the script and the commands ``also(pipe)`` queues go
    in one round trip (a worker's job start or end and its load, ``tasks/routing.py``)."""
    if also is None:
        return script(keys=keys, args=args)
    pipe = redis.pipeline(transaction=False)
    # By its SHA1, as ``script`` sends itself: a pipeline given the script object would ask
    # Redis whether it knows the script first, a round trip more every time.
    pipe.evalsha(script.sha, len(keys), *keys, *args)
    also(pipe)
    replies = pipe.execute(raise_on_error=False)
    if isinstance(replies[0], redis_lib.exceptions.NoScriptError):
        # Redis restarted and forgot it: the script alone, loaded again (``also`` went).
        replies[0] = script(keys=keys, args=args)
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies[0]


def _json(value) -> str:
    return "" if value is None else json.dumps(value, separators=(",", ":"))
