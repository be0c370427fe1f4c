"""The request core: validate a request, build its jobs, submit them, follow or collect their
events, shape the answer. Plain functions and types, no Flask: the HTTP routes (``web/``) and
the batch runner (``tasks/batch_runner.py``) are its front doors.

    schemas/       the request types (pydantic), one module per endpoint family
    chat.py, completions.py, embeddings.py
                   ``prepare``: a request's jobs, checked against the model and the limits
    responses.py, messages.py
                   dialects translated onto chat jobs (OpenAI Responses, Anthropic
                   Messages), shaped by response_events.py and message_events.py
    endpoints.py   the families by path; ``answer``: one request run to its end
    generation.py  ``Caller``, ``submit``, ``start`` -> ``Run`` (events), ``collect``
    relay.py, merge.py
                   job events from Redis pub/sub to the requests waiting for them
    limits.py, bounds.py, content.py, images.py, validation.py, offload.py
                   admission, per-request bounds, image inputs, validation off the hub
    services.py    ``Ferry``: what the core works with, built once per process

It sits in ``tasks/`` because what it does is build and send Celery jobs and read what the
workers publish; ``web`` imports it, it never imports ``web`` (pyproject.toml's
import-linter contracts).
"""
