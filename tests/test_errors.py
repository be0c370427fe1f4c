"""Bad input gets an OpenAI error envelope with the right status, never a traceback."""

from __future__ import annotations

import openai
import pytest
import requests


def post(web, path, data, **kw):
    return requests.post(web.url + path, data=data, timeout=10,
                         headers={"Content-Type": "application/json"}, **kw)


def assert_error(r, status, code=None, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param
    return err


def test_malformed_json(web):
    assert_error(post(web, "/v1/chat/completions", "{not json"), 400)
    assert_error(post(web, "/v1/chat/completions", "[1, 2]"), 400)


@pytest.mark.parametrize("body,param", [
    ('{"messages": [{"role": "user", "content": "hi"}]}', "model"),
    ('{"model": "smollm2", "messages": []}', "messages"),
    ('{"model": "smollm2", "messages": [{"role": "wizard", "content": "hi"}]}', "messages[0].role"),
    ('{"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "temperature": 3}', "temperature"),
    ('{"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "top_p": -1}', "top_p"),
    ('{"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', "max_tokens"),
    ('{"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "stop": ["a","b","c","d","e"]}', "stop"),
    ('{"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "n": 0}', "n"),
    ('{"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "presence_penalty": 2.5}', "presence_penalty"),
])
def test_validation_names_the_param(web, body, param):
    err = assert_error(post(web, "/v1/chat/completions", body), 400, param=param)
    assert err["type"] == "invalid_request_error"


def test_unknown_fields_are_ignored(web, synthetic_worker):
    r = post(web, "/v1/chat/completions",
             '{"model": "synthetic", "messages": [{"role": "user", "content": "{\\"tokens\\": [\\"x\\"]}"}], '
             '"some_future_field": {"a": 1}}')
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "x"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4o", prompt="hi")


def test_images_on_text_model_are_400(chat):
    """Checked by the backend's capability flag, so a vision backend can accept them."""
    client = chat
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}])
    assert "smollm2" in e.value.body["message"] and "image" in e.value.body["message"]


def test_unknown_route_and_method(web):
    assert_error(requests.get(web.url + "/v1/nothing", timeout=5), 404)
    assert_error(requests.get(web.url + "/v1/chat/completions", timeout=5), 405)


def test_body_too_large(web):
    big = '{"model": "smollm2", "prompt": "' + "a" * (17 * 1024 * 1024) + '"}'
    assert_error(post(web, "/v1/completions", big), 413)


def test_ready_reports_workers(web):
    body = requests.get(web.url + "/ready", timeout=5).json()
    assert body["workers"]["unserved"] == 0
