"""Stored responses (``store: true``): the response object, its input items and the
conversation it ends, in Redis for ``response_ttl`` seconds.

Each carries its owner (``config/tenants.py``: a digest of the key, never the key); ``get``
and ``delete`` take the owner and answer ``NotFound`` for anyone else's, as for no response
at all, so existence is not revealed and a route cannot forget the check.
"""

from __future__ import annotations

import json
from typing import Any

import redis as redis_lib
from pydantic import BaseModel

from config.errors import NotFound
from config.tenants import ANY_OWNER
from tasks.core.services import Ferry


def _key(response_id: str) -> str:
    return f"ferry:response:{response_id}"


class StoredResponse(BaseModel):
    owner: str
    response: dict[str, Any]
    # This request's input items, with ids (``GET /v1/responses/{id}/input_items``).
    input_items: list[dict[str, Any]]
    # The chat messages up to and including this response's output (without instructions,
    # which OpenAI does not carry over): the prefix of a turn that continues it.
    messages: list[dict[str, Any]]


class ResponseStore:
    def __init__(self, redis: redis_lib.Redis, ttl: float):
        self.redis, self.ttl = redis, ttl

    def put(self, stored: StoredResponse) -> None:
        self.redis.set(_key(stored.response["id"]), stored.model_dump_json(),
                       px=int(self.ttl * 1000))

    def get(self, response_id: str, *, owner: str | None,
            param: str = "response_id") -> StoredResponse:
        raw = self.redis.get(_key(response_id))
        stored = StoredResponse.model_validate(json.loads(raw)) if raw else None
        if stored is None or (owner is not ANY_OWNER and stored.owner != owner):
            raise NotFound(f"Response with id '{response_id}' not found.", param=param)
        return stored

    def delete(self, response_id: str, *, owner: str) -> None:
        self.get(response_id, owner=owner)
        self.redis.delete(_key(response_id))


def store_of(ferry: Ferry) -> ResponseStore:
    return ResponseStore(ferry.redis, ferry.settings.response_ttl)
