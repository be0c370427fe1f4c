"""A generation job as a record: its state in Redis and its result in the OpenAI shape.

Every request is a job, synchronous or submitted to ``/v1/jobs``. The web process creates the
record and reads it; the worker runtime (``tasks/runtime.py``), which sees every event, is the
source of truth for ``started`` and ``finished`` and writes the final response body, so a job
completes, and its webhook fires, with nobody connected to the web.

Why here: ``tasks/`` must not import ``web/`` and ``models/`` knows nothing of HTTP, yet the
worker has to spell the exact body the synchronous endpoint returns. Assembling that body in
the web from the replay buffer instead would tie the result to a buffer that is capped and
expires sooner, and would leave the webhook sender (a Celery task) without it. So the response
shapes live with the job records, beside the worker that completes them, and the web imports
them (web -> tasks -> models -> config, never back). This package knows Redis and the OpenAI
response format; it knows neither Flask nor Celery.
"""
