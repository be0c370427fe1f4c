"""Optional API keys and per-key rate limits, on a web process configured with keys."""

from __future__ import annotations

import openai
import pytest
import requests

from tests.services import Web


@pytest.fixture(scope="module")
def keyed_web(redis_server, logs):
    web = Web(redis_server.url, logs, FERRY_API_KEYS='["key-one", "key-two"]',
              FERRY_RATE_LIMIT_RPM="4").start()
    yield web
    web.stop()


def test_missing_and_wrong_keys_are_401(keyed_web):
    r = requests.get(keyed_web.url + "/v1/models", timeout=5)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=keyed_web.url + "/v1", api_key="key-three", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_valid_keys_pass_and_health_stays_open(keyed_web):
    for key in ("key-one", "key-two"):
        ok = openai.OpenAI(base_url=keyed_web.url + "/v1", api_key=key, max_retries=0)
        assert ok.models.retrieve("smollm2").id == "smollm2"
    assert requests.get(keyed_web.url + "/health", timeout=5).status_code == 200


def test_per_key_rate_limit(keyed_web):
    headers = {"Authorization": "Bearer key-two"}
    codes = [requests.get(keyed_web.url + "/v1/models", headers=headers, timeout=5).status_code
             for _ in range(6)]
    assert 429 in codes and codes.count(200) <= 4
    r = requests.get(keyed_web.url + "/v1/models", headers=headers, timeout=5)
    if r.status_code == 429:
        assert 1 <= int(r.headers["Retry-After"]) <= 60
