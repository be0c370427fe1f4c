"""Images through the whole pipeline: the web process resolves them for models the registry
marks ``vision`` (decoding data URLs, fetching http(s) URLs) and puts their bytes in the job;
other models get a 400 before anything is queued. The vision model here is a test double,
the synthetic backend with the registry's vision flag (``synthetic-vision`` in
tests/ferry.test.toml), which replies with the sha256 of each image that reached it."""

from __future__ import annotations

import base64
import hashlib
import json

import openai
import pytest

import models
from config.settings import ModelEntry
from models import load_backend
from models.synthetic import SyntheticBackend
from tests.loopback import HTTPServer
from tests.services import Web, Worker

PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAAAASUVORK5CYII=")
GIF = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
DESCRIBE = json.dumps({"describe_images": True})


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def data_url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def ask(client, model, *urls, text=DESCRIBE):
    content = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return client.chat.completions.create(model=model, messages=[
        {"role": "user", "content": [{"type": "text", "text": "look"}, *content]},
        {"role": "user", "content": text}])


@pytest.fixture(scope="module")
def vision_worker(redis_server, logs):
    worker = Worker("synthetic-vision", redis_server.url, logs).start()
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def image_server():
    server = HTTPServer(lambda path, headers: (
        200, {}, {"/a.png": PNG, "/b.gif": GIF}.get(path, b"<html>no</html>")))
    yield server.url
    server.close()


@pytest.fixture(scope="module")
def fetching_web(redis_server, logs):
    """A web process that fetches image URLs, loopback ones included (the test's server)."""
    server = Web(redis_server.url, logs, FERRY_FETCH_IMAGE_URLS="1",
                 FERRY_FETCH_ALLOW_PRIVATE="1").start()
    yield server
    server.stop()


def test_image_bytes_reach_the_vision_worker(client, vision_worker):
    reply = ask(client, "synthetic-vision", data_url(PNG), base64.b64encode(GIF).decode())
    assert reply.choices[0].message.content == f"2 images {sha(PNG)} {sha(GIF)}"


def test_fetched_images_reach_the_vision_worker(fetching_web, vision_worker, image_server):
    client = openai.OpenAI(base_url=fetching_web.url + "/v1", api_key="unused", max_retries=0,
                           timeout=60)
    reply = ask(client, "synthetic-vision", image_server + "/b.gif", data_url(PNG))
    assert reply.choices[0].message.content == f"2 images {sha(GIF)} {sha(PNG)}"
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, "synthetic-vision", image_server + "/page.html")
    assert e.value.body["param"] == "messages[0].content[1].image_url.url"


def test_image_urls_are_not_fetched_unless_enabled(client, image_server):
    # Refused in the web process, before a job exists (no worker is needed for this).
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, "synthetic-vision", image_server + "/a.png")
    assert "disabled" in e.value.body["message"]
    assert e.value.body["param"] == "messages[0].content[1].image_url.url"


def test_text_only_models_refuse_images_in_the_web_process(client):
    # "unserved" has no worker: the 400 comes before anything is queued.
    for model in ("synthetic", "unserved"):
        with pytest.raises(openai.BadRequestError) as e:
            ask(client, model, data_url(PNG))
        assert model in e.value.body["message"] and "image" in e.value.body["message"]
        assert e.value.body["param"] == "messages[0].content"


class NoVisionBackend(SyntheticBackend):
    """The synthetic backend with image input switched off, as a text-only backend is."""

    def __init__(self, entry):
        super().__init__(entry)
        self.supports_vision = False


def test_a_backend_without_image_input_cannot_claim_vision(monkeypatch):
    entry = ModelEntry(name="s", backend="synthetic", weights="", vision=True)
    assert load_backend(entry).supports_vision
    monkeypatch.setitem(models._BACKENDS, "synthetic",
                        ("tests.test_vision_web", "NoVisionBackend", None))
    with pytest.raises(RuntimeError, match="vision = true"):
        load_backend(entry)
    assert not load_backend(ModelEntry(name="s", backend="synthetic", weights="")).supports_vision
