"""Who is calling: the request's ``Tenant``, resolved once before any handler and kept on
``g.tenant`` (``current_tenant()``); the stores then show each tenant only its own objects.

With ``api_keys`` set, /v1 needs ``Authorization: Bearer <key>`` (or ``x-api-key: <key>``).
The key is compared by digest, with every configured key, in constant time. A client
address that sends more than ``auth_failures_per_minute`` wrong keys gets 429 for every keyed
request until the minute ends, its valid keys included (else a guess that works would show
as the one 200).
With ``admin_key`` set, /metrics and /ready need it (``Bearer <admin key>``).

Batch lines never come through here: the batch worker runs them through the request core
(``tasks/core``) as their batch's owner, so a batch holds no key.
"""

from __future__ import annotations

import hmac

from flask import Flask, current_app, g, request

from config.errors import AuthenticationFailed
from config.settings import Settings
from config.tenants import ANONYMOUS_TENANT, ApiKey, Tenant, owner_of
from tasks.core import limits

ADMIN_PATHS = ("/metrics", "/ready")


def current_tenant() -> Tenant:
    """The caller of the current request (set for every request before its handler)."""
    return g.tenant


def tenant_of(settings: Settings, key: ApiKey) -> Tenant:
    return Tenant(owner=owner_of(key.key), name=key.name,
                  rpm=settings.rate_limit_rpm if key.rpm is None else key.rpm,
                  max_in_flight=(settings.key_max_in_flight if key.max_in_flight is None
                                 else key.max_in_flight),
                  max_file_bytes=key.max_file_bytes)


def _match(given: str, digests: dict[str, Tenant]) -> Tenant | None:
    # Compare with every key, so the time taken does not tell which one (or how much) matched.
    wanted = owner_of(given).encode()
    found = None
    for digest, tenant in digests.items():
        if hmac.compare_digest(wanted, digest.encode()):
            found = tenant
    return found


def _bearer() -> str:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise AuthenticationFailed("Missing API key: send 'Authorization: Bearer <key>'.")
    return given.strip()


def _key() -> str:
    """A /v1 key: ``Authorization: Bearer <key>``, or ``x-api-key: <key>`` as Anthropic's
    clients send it (accepted on every /v1 route; the same keys and tenants)."""
    given = request.headers.get("x-api-key", "").strip()
    if given and not request.headers.get("Authorization"):
        return given
    scheme, _, bearer = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not bearer.strip():
        raise AuthenticationFailed("Missing API key: send 'Authorization: Bearer <key>' or "
                                   "'x-api-key: <key>'.")
    return bearer.strip()


def _check(given: str, known: dict[str, Tenant], redis, settings: Settings) -> Tenant:
    address = request.remote_addr or "unknown"
    limits.check_auth_failures(redis, settings, address)
    tenant = _match(given, known)
    if tenant is None:
        limits.auth_failed(redis, address)
        raise AuthenticationFailed("Incorrect API key provided.")
    return tenant


def register(app: Flask) -> None:
    settings = app.extensions["ferry"].settings
    tenants = {owner_of(k.key): tenant_of(settings, k) for k in settings.api_keys}
    admin = {owner_of(settings.admin_key): ANONYMOUS_TENANT} if settings.admin_key else {}

    @app.before_request
    def _authenticate():
        redis = current_app.extensions["ferry"].redis
        g.tenant = ANONYMOUS_TENANT
        if admin and request.path in ADMIN_PATHS:
            _check(_bearer(), admin, redis, settings)
        elif tenants and request.path.startswith("/v1/"):
            g.tenant = _check(_key(), tenants, redis, settings)
            limits.check_rate(redis, g.tenant)
