"""Optional API keys on /v1: ``Authorization: Bearer <key>``, compared in constant time."""

from __future__ import annotations

import hmac

from flask import Flask, current_app, request

from config.errors import AuthenticationFailed
from web import limits


def _matches(given: str, keys: list[str]) -> bool:
    # Compare with every key, so the time taken does not tell which one (or how much) matched.
    found = False
    for key in keys:
        found |= hmac.compare_digest(given.encode(), key.encode())
    return found


def register(app: Flask) -> None:
    @app.before_request
    def _authenticate():
        settings = current_app.extensions["ferry"].settings
        if not settings.api_keys or not request.path.startswith("/v1/"):
            return None
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise AuthenticationFailed("Missing API key: send 'Authorization: Bearer <key>'.")
        if not _matches(given.strip(), settings.api_keys):
            raise AuthenticationFailed("Incorrect API key provided.")
        limits.check_rate(current_app.extensions["ferry"].relay.redis, settings, given.strip())
        return None
