"""The OpenAI endpoints the core serves, by path, and answering one request in full.

Each family module (``chat``, ``completions``, ``embeddings``) has its ``Request`` type,
``prepare(req, ferry)`` (one job: what ``/v1/jobs`` takes) and ``prepare_all(req, ferry)``
(the request's jobs). A front door that speaks another dialect translates its request into
one of these and the ``Run``'s events back into its own shapes; it adds no path of its own.
Such a family (``responses``) has ``answer(req, ferry, caller) -> (request id, body)``,
which batch lines take instead of the chat shapes' body.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from types import ModuleType
from typing import Any

import redis as redis_lib

from config.errors import FerryError, InvalidRequest, PayloadTooLarge, ServiceUnavailable
from tasks.core import chat, completions, embeddings, messages, responses
from tasks.core.generation import Caller, ClientGone, collect, start
from tasks.core.services import Ferry
from tasks.core.validation import validate

log = logging.getLogger(__name__)

FAMILIES: dict[str, ModuleType] = {
    "/v1/chat/completions": chat,
    "/v1/completions": completions,
    "/v1/embeddings": embeddings,
    "/v1/responses": responses,
    # A failed line's body is the OpenAI envelope, as on the other lines of an OpenAI batch
    # (the batch runner retries by its ``code``), not Anthropic's shape.
    "/v1/messages": messages,
}

Answer = tuple[int, str | None, Any]  # status, request id, JSON body


def family(endpoint: str) -> ModuleType:
    try:
        return FAMILIES[endpoint]
    except KeyError:
        raise InvalidRequest(f"Jobs for {endpoint} are not available yet.",
                             param="endpoint") from None


def answer(ferry: Ferry, endpoint: str, body: dict[str, Any], caller: Caller) -> Answer | None:
    """``body`` as a request to ``endpoint``, run to its end: the status, request id and
    JSON body the endpoint answers it with over HTTP (an OpenAI error envelope for a
    failure); None once ``caller.abandoned()`` (its job is then cancelled)."""
    enqueued: list[str] = []

    def on_enqueued(job_id: str, model: str) -> None:
        enqueued.append(job_id)
        caller.on_enqueued(job_id, model)

    try:
        if len(json.dumps(body)) > ferry.settings.max_body_bytes:
            raise PayloadTooLarge("The request body is too large.")
        fam = family(endpoint)
        req = validate(fam.Request, body)
        counted = dataclasses.replace(caller, on_enqueued=on_enqueued)
        if hasattr(fam, "answer"):
            return 200, *fam.answer(req, ferry, counted)
        run = start(ferry, fam.prepare_all(req, ferry), counted, streamed=False)
        return 200, run.id, collect(run)
    except ClientGone:
        return None
    except redis_lib.RedisError as e:
        return _error(ServiceUnavailable(f"Redis is unreachable: {e}"), enqueued)
    except FerryError as e:
        return _error(e, enqueued)
    except Exception:
        log.exception("unhandled error")
        return _error(FerryError("The server had an error while processing the request."),
                      enqueued)


def _error(err: FerryError, enqueued: list[str]) -> Answer:
    # As over HTTP: the request id is that of the last job enqueued, if any was.
    return err.status, enqueued[-1] if enqueued else None, {"error": err.to_dict()}
