"""The Redis names shared by workers and the web process.

Delivery: job events go over pub/sub, which keeps no backlog. A subscriber must be
subscribed *before* the job can start, so the web subscribes first, then enqueues.
Cancels are both published (for running jobs) and left as a key (for jobs not yet started).
Worker liveness is a sorted set per queue: member = worker name, score = the Unix time (ms)
until which the worker is presumed alive; workers push it forward every heartbeat.
"""

from __future__ import annotations

CANCEL_CHANNEL = "ferry:cancel"
CANCEL_TTL = 600


def events_channel(job_id: str) -> str:
    return f"ferry:ev:{job_id}"


def cancel_key(job_id: str) -> str:
    return f"ferry:cancel:{job_id}"


def workers_key(queue: str) -> str:
    return f"ferry:workers:{queue}"


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
EMBED_TASK = "ferry.embed"
EMBED_MANY_TASK = "ferry.embed_many"
# Celery priorities on Redis: 0 (the default) is taken first. Interactive requests use it;
# bulk work (the Batch API) is sent at the lowest, so it never sits in front of them.
BULK_PRIORITY = 9

# The Batch API's own queue. Its Celery keys carry their own prefix (see tasks/app.py).
BATCH_QUEUE = "ferry.batch"
BATCH_START_TASK = "ferry.batch.start"
BATCH_CHUNK_TASK = "ferry.batch.chunk"
