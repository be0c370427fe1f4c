"""Tenants: who a request is, as the stores see it.

Every stored object (file, batch, job) carries its *owner*: a digest of the API key that made
it, never the key. Stores take the owner on every read, list, delete and cancel and answer
"not found" for anyone else's objects, so existence is not revealed. With no keys configured
everyone is the one anonymous owner ``""``, which is also the owner of data stored before
owners existed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from pydantic import BaseModel, Field

# Everyone, when no keys are configured; and objects stored before owners were recorded.
ANONYMOUS = ""
# Passed by the system itself (workers, janitors) where a store takes an owner: any owner.
ANY_OWNER = None


def owner_of(key: str) -> str:
    """The owner recorded for objects made with ``key``: a SHA-256 prefix (128 bits), so
    Redis never holds a key, and a leaked dump gives no way to call the API."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


class ApiKey(BaseModel):
    """One accepted key (``FERRY_API_KEYS`` / ``[[api_keys]]``). A plain string in the list
    is a key with no name and the default limits. ``None`` limits take the server-wide
    setting; 0 means no limit."""

    key: str = Field(min_length=1)
    name: str = ""
    # Requests per minute (default: ``rate_limit_rpm``).
    rpm: int | None = Field(default=None, ge=0)
    # Jobs queued or running at once, over all models (default: ``key_max_in_flight``).
    max_in_flight: int | None = Field(default=None, ge=0)
    # Largest upload (default: ``max_file_bytes``).
    max_file_bytes: int | None = Field(default=None, ge=1)


@dataclass(frozen=True)
class Tenant:
    """The caller of one request, resolved once (``web/auth.py``). Limits are resolved
    too: 0 = none."""

    owner: str
    name: str = ""
    rpm: int = 0
    max_in_flight: int = 0
    max_file_bytes: int | None = None  # None: the server-wide limit

    @property
    def label(self) -> str:
        """How errors name the caller: its name, else a short prefix of its owner digest."""
        return f"'{self.name}'" if self.name else f"'{self.owner[:8]}...'"


ANONYMOUS_TENANT = Tenant(ANONYMOUS)
