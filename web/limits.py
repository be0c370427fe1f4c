"""Admission control: per-model in-flight limits and per-key request rates, both in Redis so
they hold across web processes.

In-flight requests of a model are a sorted set (member = job id, score = admission time),
joined in the same script that records the job (``JobStore.create``); a request leaves it
when its subscription closes. Entries older than any request can live
(the queue timeout plus an hour of generation) are swept, so a crashed web process cannot
leak capacity for long.
"""

from __future__ import annotations

import hashlib
import time

import redis as redis_lib

from config.errors import FerryError, RateLimited, ServiceUnavailable
from config.settings import ModelEntry, Settings
from tasks.jobs.store import InFlight, Refused
from tasks.protocol import pending_key

STALE_AFTER = 3600.0


def pending(redis, queue: str) -> int:
    return int(redis.zcard(pending_key(queue)))


def in_flight(settings: Settings, entry: ModelEntry) -> InFlight:
    """The model's in-flight limit, applied when the job is recorded (``JobStore.create``)."""
    return InFlight(pending_key(entry.queue), entry.max_pending,
                    time.time() - settings.queue_timeout - STALE_AFTER)


def refusal(entry: ModelEntry, refused: Refused) -> FerryError:
    """The error a client gets for a job ``JobStore.create`` refused."""
    if refused.reason == "full":
        return RateLimited(f"The model '{entry.name}' has {refused.count} requests in flight, "
                           "its limit; retry shortly.", retry_after=2)
    return ServiceUnavailable(f"No worker is serving the model '{entry.name}' right now.")


def release(redis, entry_queue: str, job_id: str) -> None:
    try:
        redis.zrem(pending_key(entry_queue), job_id)
    except redis_lib.RedisError:
        pass  # swept later


def check_rate(redis, settings: Settings, api_key: str) -> None:
    """Fixed one-minute windows per key; the key itself is never stored, only a digest."""
    if not settings.rate_limit_rpm:
        return
    now = time.time()
    window = int(now // 60)
    digest = hashlib.sha256(api_key.encode()).hexdigest()[:20]
    key = f"ferry:rate:{digest}:{window}"
    try:
        pipe = redis.pipeline(transaction=False)
        pipe.incr(key)
        pipe.expire(key, 120)
        count, _ = pipe.execute()
    except redis_lib.RedisError as e:
        raise ServiceUnavailable(f"Redis is unreachable: {e}") from None
    if count > settings.rate_limit_rpm:
        raise RateLimited(f"Rate limit of {settings.rate_limit_rpm} requests per minute "
                          "reached for this API key.", retry_after=max(1, int(60 - now % 60)))
