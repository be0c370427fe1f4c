"""Admission control: per-model and per-key in-flight limits, per-key request rates and
per-address wrong-key counts, all in Redis so they hold across web processes.

In-flight requests of a model (and of a key) are a sorted set (member = job id, score =
admission time), joined in the same script that records the job (``JobStore.create``); a
request leaves it when its subscription closes or its job ends. Entries older than any
request can live (the queue timeout plus an hour of generation) are swept, so a crashed web
process cannot leak capacity for long.
"""

from __future__ import annotations

import time

import redis as redis_lib

from config.errors import FerryError, RateLimited, ServiceUnavailable
from config.settings import ModelEntry, Settings
from config.tenants import Tenant
from tasks.jobs.store import InFlight, Refused
from config.contract.protocol import owner_pending_key, pending_key

STALE_AFTER = 3600.0


def pending(redis, queue: str) -> int:
    return int(redis.zcard(pending_key(queue)))


def in_flight(settings: Settings, entry: ModelEntry) -> InFlight:
    """The model's in-flight limit, applied when the job is recorded (``JobStore.create``)."""
    return InFlight(pending_key(entry.queue), entry.max_pending,
                    time.time() - settings.queue_timeout - STALE_AFTER)


def refusal(entry: ModelEntry, refused: Refused, tenant: Tenant) -> FerryError:
    """The error a client gets for a job ``JobStore.create`` refused."""
    if refused.reason == "full":
        return RateLimited(f"The model '{entry.name}' has {refused.count} requests in flight, "
                           "its limit; retry shortly.", retry_after=2)
    if refused.reason == "owner_full":
        return RateLimited(f"The API key {tenant.label} has {refused.count} jobs queued or "
                           "running, its limit (max_in_flight); retry when one has ended.",
                           retry_after=2, code="too_many_jobs_in_flight")
    return ServiceUnavailable(f"No worker is serving the model '{entry.name}' right now.")


def release(redis, entry_queue: str, job_id: str, owner: str) -> None:
    try:
        pipe = redis.pipeline(transaction=False)
        pipe.zrem(pending_key(entry_queue), job_id)
        pipe.zrem(owner_pending_key(owner), job_id)
        pipe.execute()
    except redis_lib.RedisError:
        pass  # swept later


def _window_count(redis, key: str) -> int:
    try:
        pipe = redis.pipeline(transaction=False)
        pipe.incr(key)
        pipe.expire(key, 120)
        count, _ = pipe.execute()
    except redis_lib.RedisError as e:
        raise ServiceUnavailable(f"Redis is unreachable: {e}") from None
    return int(count)


def _retry_after(now: float) -> int:
    return max(1, int(60 - now % 60))


def check_rate(redis, tenant: Tenant) -> None:
    """Fixed one-minute windows per key, counted under its owner digest (never the key)."""
    if not tenant.rpm:
        return
    now = time.time()
    if _window_count(redis, f"ferry:rate:{tenant.owner}:{int(now // 60)}") > tenant.rpm:
        raise RateLimited(f"Rate limit of {tenant.rpm} requests per minute reached for this "
                          "API key.", retry_after=_retry_after(now))


def _failures_key(address: str, now: float) -> str:
    return f"ferry:authfail:{address}:{int(now // 60)}"


def check_auth_failures(redis, settings: Settings, address: str) -> None:
    """429 for an address that sent ``auth_failures_per_minute`` wrong keys this minute."""
    now = time.time()
    try:
        failures = int(redis.get(_failures_key(address, now)) or 0)
    except redis_lib.RedisError as e:
        raise ServiceUnavailable(f"Redis is unreachable: {e}") from None
    if failures >= settings.auth_failures_per_minute:
        raise RateLimited(f"Too many wrong API keys from this address ({failures} this minute; "
                          f"the limit, auth_failures_per_minute, is "
                          f"{settings.auth_failures_per_minute}).", retry_after=_retry_after(now))


def auth_failed(redis, address: str) -> None:
    _window_count(redis, _failures_key(address, time.time()))


def owner_in_flight(settings: Settings, tenant: Tenant) -> InFlight | None:
    """The key's own in-flight limit (over all models), applied with the model's."""
    if not tenant.max_in_flight:
        return None
    return InFlight(owner_pending_key(tenant.owner), tenant.max_in_flight,
                    time.time() - settings.queue_timeout - STALE_AFTER)
