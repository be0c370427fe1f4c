"""Fuzz every documented endpoint (schemathesis strategies from /openapi.json): no input gets
a 5xx, and every error is an OpenAI envelope. Both schema-conforming and schema-violating
inputs are generated.

Bodies that name a model are pointed at the scripted model most of the time, so valid bodies
go through the queue and a worker (which is running, so a 503 would be a real failure).
It runs twice: against the open web, and against one with API keys on, sending a key (every
store then takes a tenant's owner), with fewer examples to keep the time modest.
"""

from __future__ import annotations

import json

import pytest
import requests
import schemathesis
from schemathesis import GenerationMode
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import MAX_FILE_BYTES
from tests.services import Web

FUZZ_KEY = "fuzz-tenant-key"


@pytest.fixture(scope="module")
def operations(web, synthetic_worker):
    doc = requests.get(web.url + "/openapi.json", timeout=5).json()
    ops = [r.ok() for r in schemathesis.openapi.from_dict(doc).get_all_operations()]
    assert {op.path for op in ops} >= {"/v1/chat/completions", "/v1/completions", "/v1/models",
                                       "/v1/embeddings", "/v1/jobs", "/v1/batches",
                                       "/v1/files/{file_id}", "/v1/messages",
                                       "/v1/messages/count_tokens"}
    return ops


@pytest.fixture(scope="module")
def keyed_web(redis_server, logs, files_dir):
    web = Web(redis_server.url, logs, FERRY_API_KEYS=f'["{FUZZ_KEY}"]',
              FERRY_FILES_DIR=str(files_dir), FERRY_MAX_FILE_BYTES=str(MAX_FILE_BYTES)).start()
    yield web
    web.stop()


def check(web, case, retarget: bool, headers: dict | None = None) -> None:
    body = case.body
    if retarget and isinstance(body, dict) and "model" in body:
        body = {**body, "model": "synthetic"}
    url = web.url + case.formatted_path
    has_body = isinstance(body, (dict, list, str, int, float, bool)) or body is None and \
        case.method.upper() == "POST"
    r = requests.request(case.method, url, json=body if has_body else None, headers=headers,
                         timeout=30)
    assert r.status_code < 500, (case.method, case.formatted_path, body, r.status_code, r.text)
    if headers:  # the key is good on every endpoint
        assert r.status_code != 401, (case.method, case.formatted_path, r.text)
    if r.status_code >= 400 and case.path.startswith("/v1/messages"):  # Anthropic's shape
        assert r.json()["type"] == "error" and set(r.json()["error"]) == {"type", "message"}
    elif r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def fuzz(web, operations, mode, examples: int, headers: dict | None = None) -> None:
    for op in operations:
        if mode == GenerationMode.NEGATIVE and not len(op.body):
            continue  # no body: nothing schema-violating to generate beyond the path

        @given(case=op.as_strategy(generation_mode=mode), retarget=st.booleans())
        @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck))
        def run(case, retarget):
            check(web, case, retarget, headers)

        run()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_input_gets_a_server_error(web, operations, mode):
    fuzz(web, operations, mode, 40)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_input_gets_a_server_error_with_keys_on(keyed_web, operations, mode):
    fuzz(keyed_web, operations, mode, 15, {"Authorization": f"Bearer {FUZZ_KEY}"})


# Hostile shapes (issue #12): what used to crash a worker or answer 500. Each is a 400 with
# ``param``; over a limit, the message names it.
SCHEMA_PARAM = "response_format.json_schema.schema"


def _wrap(schema: dict, depth: int) -> dict:
    for i in range(depth):
        schema = {"type": "array", "items": schema} if i % 2 else \
            {"type": "object", "properties": {"x": schema}}
    return schema


def _post(web, body) -> requests.Response:
    data = body if isinstance(body, str) else json.dumps(body)
    r = requests.post(web.url + "/v1/chat/completions", data=data, timeout=30,
                      headers={"Content-Type": "application/json"})
    assert r.status_code < 500, (r.status_code, r.text[:300])
    return r


@given(keyword=st.sampled_from(["minLength", "maxLength", "minItems", "maxItems", "pattern"]),
       count=st.integers(0, 10**7), depth=st.integers(0, 60))
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_schema_bombs_get_a_400_naming_the_limit(web, synthetic_worker, keyword, count, depth):
    inner = {"type": "string", "pattern": f"^(a{{0,{count}}})$"} if keyword == "pattern" \
        else {keyword: count}
    r = _post(web, {"model": "synthetic", "messages": [{"role": "user", "content": "x"}],
                    "response_format": {"type": "json_schema", "json_schema": {
                        "name": "x", "schema": _wrap(inner, depth)}}})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] is not None
    if depth + 1 > 32:
        assert "max_schema_depth" in err["message"]
    elif count > 1000:
        assert "max_schema_repeat" in err["message"] and str(count) in err["message"]


@given(key=st.text(st.characters(categories=["Nd", "No", "Nl"]), min_size=1, max_size=3))
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_logit_bias_keys_that_are_not_ascii_token_ids_get_a_400(web, synthetic_worker, key):
    r = _post(web, {"model": "synthetic", "messages": [{"role": "user", "content": "x"}],
                    "logit_bias": {key: 1}})
    if not (key.isascii() and key.isdigit()):
        assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias"


@given(depth=st.integers(1, 20000), field=st.sampled_from(["messages", "stop", "user"]))
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_nested_json_bodies_get_a_400(web, synthetic_worker, depth, field):
    r = _post(web, f'{{"model": "synthetic", "{field}": ' + "[" * depth + "]" * depth + "}")
    if depth > 1000:
        assert r.status_code == 400 and r.json()["error"]["param"] == field
