"""The Redis names shared by workers and the web process.

Delivery: job events go over pub/sub, which keeps no backlog. A subscriber must be
subscribed *before* the job can start, so the web subscribes first (its process's reply
channel, once), then enqueues.
Cancels are both published (for running jobs) and left as a key (for jobs not yet started).
Worker liveness is a sorted set per queue: member = worker name, score = the Unix time (ms)
until which the worker is presumed alive; workers push it forward every heartbeat.
Every job's messages are also kept, for a while, in a capped stream that watchers replay.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import redis

CANCEL_CHANNEL = "ferry:cancel"
CANCEL_TTL = 600


def events_channel(job_id: str) -> str:
    """A job's own channel, for its watchers (``/v1/jobs/{id}/events``, background responses)."""
    return f"ferry:ev:{job_id}"


def reply_channel(process_id: str) -> str:
    """One web process's channel, subscribed once when it starts: a job submitted by it names
    this channel (``reply_to``), and its events come there too, with its id. A new stream
    then costs no SUBSCRIBE and no wait for Redis to confirm one (a burst of a thousand
    SUBSCRIBEs queued behind the tokens of the open streams timed out), and a worker sends
    one message per web process for all the jobs it has events for."""
    return f"ferry:reply:{process_id}"


def cancel_key(job_id: str) -> str:
    return f"ferry:cancel:{job_id}"


def pending_key(queue: str) -> str:
    """Jobs admitted for a queue and not yet ended (member = job id, score = admission time);
    added by the web (``tasks/core/limits.py``), removed by whichever side sees the job end."""
    return f"ferry:pending:{queue}"


def owner_pending_key(owner: str) -> str:
    """The same, per owner (an API key's digest): its jobs in flight over all models."""
    return f"ferry:pending-owner:{owner}"


def owner_jobs_key(owner: str) -> str:
    """An owner's jobs (member = job id, score = creation time), newest last: what
    ``GET /v1/jobs`` lists. Pruned of entries older than the job TTL at each new job, and
    the key itself expires with its newest job's record."""
    return f"ferry:jobs:owner:{owner}"


def workers_key(queue: str) -> str:
    return f"ferry:workers:{queue}"


def worker_jobs_key(worker: str) -> str:
    """The jobs a worker is running, as space-separated ids, rewritten every heartbeat and
    expiring with it: a job recorded as running on a live worker that does not list it has
    lost its end (a write Redis dropped in a restart)."""
    return f"ferry:worker-jobs:{worker}"


def request_cancel(redis, job_id: str) -> None:
    pipe = redis.pipeline(transaction=False)
    pipe.set(cancel_key(job_id), 1, ex=CANCEL_TTL)
    pipe.publish(CANCEL_CHANNEL, job_id)
    pipe.execute()


def stats_key(queue: str) -> str:
    """A hash of counters per model queue (``batches``, ``requests``, ``inputs`` for embedding
    workers): how much micro-batching actually happens, readable with HGETALL."""
    return f"ferry:stats:{queue}"


GENERATE_TASK = "ferry.generate"
WEBHOOK_TASK = "ferry.webhook"
# Webhook deliveries have a queue (and worker) of their own: a slow receiver must never hold
# up a model worker.
WEBHOOK_QUEUE = "ferry.webhooks"
EMBED_TASK = "ferry.embed"
EMBED_PARTS_TASK = "ferry.embed_parts"
# Celery priorities on Redis: 0 (the default) is taken first. Interactive requests use it;
# bulk work (the Batch API) is sent at the lowest, so it never sits in front of them.
BULK_PRIORITY = 9

# The Batch API's own queue. Its Celery keys carry their own prefix (see tasks/app.py).
BATCH_QUEUE = "ferry.batch"
BATCH_START_TASK = "ferry.batch.start"
BATCH_CHUNK_TASK = "ferry.batch.chunk"

# Jobs: one hash per job, and two indexes the web's janitor sweeps: queued jobs by deadline,
# running jobs by start time (to find those whose worker died).
PENDING_JOBS = "ferry:jobs:pending"
RUNNING_JOBS = "ferry:jobs:running"


def job_key(job_id: str) -> str:
    return f"ferry:job:{job_id}"


def queued_key(queue: str, bulk: bool) -> str:
    """A queue's jobs not yet started, per lane (member = job id, score = creation time):
    what ``JobStore.position`` counts instead of scanning Celery's list."""
    return f"ferry:queued:{queue}:{'bulk' if bulk else 'interactive'}"


def celery_list(queue: str, bulk: bool) -> str:
    """The Redis list holding a lane's Celery messages: kombu keeps one list per priority
    step, the queue's name for priority 0 and ``<queue>\\x06\\x16<step>`` for the others."""
    return f"{queue}\x06\x16{BULK_PRIORITY}" if bulk else queue


def events_log(job_id: str) -> str:
    """The job's replay buffer: a Redis list holding every message published on its
    channel, oldest first, each pushed in the same script call and *before* the PUBLISH (see
    ``web/job_events.py``), trimmed from its oldest end. A list, not a Stream: RPUSH costs
    Redis less than XADD, and nothing reads it by entry id. Not the key of the Streams
    (``ferry:evlog:``) older versions wrote, so none of those is ever pushed to (WRONGTYPE):
    they expire by their TTL, and jobs that ran across the upgrade cannot be replayed."""
    return f"ferry:evbuf:{job_id}"


def connect(url: str, **kw) -> "redis.Redis":
    """A Redis client for a process with many concurrent users (greenlets or task threads).

    redis-py 8 caps a pool at 100 connections and then *fails* ("Too many connections"); a
    blocking pool of the same size makes the 101st user wait for a free connection instead
    (up to ``timeout`` seconds), so a burst of streams or batch lines never turns into 503s.
    """
    import redis

    pool = redis.BlockingConnectionPool.from_url(url, max_connections=kw.pop("max_connections", 100),
                                                 timeout=kw.pop("timeout", 20), **kw)
    return redis.Redis(connection_pool=pool)


def own_connection(client: "redis.Redis", **overrides) -> "redis.Connection":
    """A connection outside ``client``'s pool, made as its connections are (address, TLS,
    password, protocol), for a user that keeps it to itself: the relay's pub/sub reader,
    the publisher's pipeline of drains. ``overrides``: its own settings (``client_name``)."""
    pool = client.connection_pool
    return pool.connection_class(**{**pool.connection_kwargs, **overrides})

