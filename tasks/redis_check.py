"""The start-up check of the Redis that holds Ferry's queues: it must not evict keys.

Redis with ``maxmemory`` and an evicting ``maxmemory-policy`` deletes keys when it is full:
a queue's list (every job waiting in it), a job record, a batch's plan. Nobody is told; the
work is simply gone. So web and workers read the policy at start and refuse to run with any
policy but ``noeviction`` (which makes a full Redis refuse writes: requests fail with a 503
that says so), unless the operator sets ``allow_redis_eviction``. A Redis that forbids
CONFIG (some managed services) cannot be checked: that is logged, and start goes on.
"""

from __future__ import annotations

import logging
import time

import redis as redis_lib

log = logging.getLogger(__name__)


class EvictingRedis(RuntimeError):
    """Redis would silently delete Ferry's keys when full."""


def check_eviction_policy(client: redis_lib.Redis, allow: bool, wait: float = 10.0) -> None:
    """Raise ``EvictingRedis`` unless Redis's policy is ``noeviction`` (or ``allow``). Waits
    up to ``wait`` seconds for a Redis that is still starting, then gives up with a warning."""
    deadline = time.monotonic() + wait
    while True:
        try:
            policy = client.config_get("maxmemory-policy").get("maxmemory-policy")
            break
        except redis_lib.ResponseError as e:
            log.warning("could not read Redis's maxmemory-policy (%s); make sure it is "
                        "noeviction", e)
            return
        except (redis_lib.ConnectionError, redis_lib.TimeoutError) as e:
            if time.monotonic() > deadline:
                log.warning("Redis is unreachable (%s): its maxmemory-policy is unchecked", e)
                return
            time.sleep(0.5)
    if policy in (None, "noeviction"):
        return
    message = (f"Redis's maxmemory-policy is {policy!r}: when it is full it deletes keys "
               "(queued jobs, job records, batch state) and nobody is told. Set it to "
               "noeviction (maxmemory-policy in redis.conf, or CONFIG SET maxmemory-policy "
               "noeviction), or set FERRY_ALLOW_REDIS_EVICTION=1 to accept the loss.")
    if allow:
        log.warning("%s Starting anyway: FERRY_ALLOW_REDIS_EVICTION is set.", message)
        return
    raise EvictingRedis(message)
