"""POST /v1/embeddings end to end: official client -> web -> Celery -> sentence-transformers."""

from __future__ import annotations

import base64
import concurrent.futures
import os
import tomllib

import numpy as np
import openai
import pytest
import redis
import requests

from config import ModelEntry
from tests.services import TEST_CONFIG

pytestmark = pytest.mark.model

MODEL = "all-minilm"
TEXTS = ["The ferry leaves at dawn.",
         "A harbour full of small boats, rocking gently in the evening tide while gulls circle.",
         "hello"]


@pytest.fixture(scope="module")
def reference():
    """sentence-transformers itself, in this process: the vectors Ferry must reproduce."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from sentence_transformers import SentenceTransformer

    entries = tomllib.loads(TEST_CONFIG.read_text())["models"]
    entry = ModelEntry(**next(m for m in entries if m["name"] == MODEL))
    return SentenceTransformer(str(entry.weights_path()), device="cpu", local_files_only=True)


def vectors(resp) -> np.ndarray:
    return np.array([d.embedding for d in resp.data], dtype=np.float32)


def test_vectors_equal_sentence_transformers(embedder, reference):
    r = embedder.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    assert r.object == "list" and r.model == MODEL
    assert [d.index for d in r.data] == [0, 1, 2] and all(d.object == "embedding" for d in r.data)
    got = vectors(r)
    assert got.shape == (3, 384)
    np.testing.assert_allclose(got, reference.encode(TEXTS), atol=1e-5, rtol=0)
    expected_tokens = sum(len(reference.tokenizer(t)["input_ids"]) for t in TEXTS)
    assert r.usage.prompt_tokens == r.usage.total_tokens == expected_tokens


def test_base64_is_float32_little_endian(embedder, web):
    floats = vectors(embedder.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float"))
    # The official client asks for base64 by default and decodes it itself.
    decoded = vectors(embedder.embeddings.create(model=MODEL, input=TEXTS))
    np.testing.assert_array_equal(decoded, floats)
    raw = requests.post(web.url + "/v1/embeddings", timeout=30, json={
        "model": MODEL, "input": TEXTS, "encoding_format": "base64"}).json()
    rows = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in raw["data"]]
    np.testing.assert_array_equal(np.array(rows), floats)


def test_single_string_and_token_inputs(embedder, reference):
    one = vectors(embedder.embeddings.create(model=MODEL, input=TEXTS[0], encoding_format="float"))
    assert one.shape == (1, 384)
    ids = [reference.tokenizer(t)["input_ids"] for t in TEXTS]
    by_ids = embedder.embeddings.create(model=MODEL, input=ids, encoding_format="float")
    np.testing.assert_allclose(vectors(by_ids), reference.encode(TEXTS), atol=1e-5, rtol=0)
    assert by_ids.usage.prompt_tokens == sum(map(len, ids))
    single = embedder.embeddings.create(model=MODEL, input=ids[0], encoding_format="float")
    np.testing.assert_allclose(vectors(single), one, atol=1e-5, rtol=0)


def test_dimensions_truncate_and_renormalise(embedder):
    full = vectors(embedder.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float"))
    short = vectors(embedder.embeddings.create(model=MODEL, input=TEXTS, dimensions=64))
    assert short.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(short, axis=1), 1, atol=1e-6)
    expected = full[:, :64] / np.linalg.norm(full[:, :64], axis=1, keepdims=True)
    np.testing.assert_allclose(short, expected, atol=1e-6)
    with pytest.raises(openai.BadRequestError) as e:
        embedder.embeddings.create(model=MODEL, input="hi", dimensions=385)
    assert e.value.body["param"] == "dimensions"


@pytest.mark.parametrize("body,param", [
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": ["fine", ""]}, "input[1]"),
    ({"input": [[]]}, "input[0]"),
    ({"input": [1, "2"]}, "input"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "x", "dimensions": 0}, "dimensions"),
    ({"input": ["x"] * 2049}, "input"),
])
def test_bad_input_is_400(web, body, param):
    r = requests.post(web.url + "/v1/embeddings", json={"model": MODEL, **body}, timeout=10)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_over_max_tokens_is_400(embedder):
    """OpenAI answers 400 rather than truncating; so does Ferry (256 tokens for MiniLM)."""
    with pytest.raises(openai.BadRequestError) as e:
        embedder.embeddings.create(model=MODEL, input=["short", "word " * 300])
    assert e.value.code == "context_length_exceeded" and e.value.body["param"] == "input[1]"
    assert "256" in e.value.body["message"]
    fits = [101] + [2773] * 254 + [102]
    assert len(embedder.embeddings.create(model=MODEL, input=fits).data) == 1
    with pytest.raises(openai.BadRequestError):
        embedder.embeddings.create(model=MODEL, input=fits + [102])


def test_token_outside_vocabulary_is_400(embedder):
    with pytest.raises(openai.BadRequestError) as e:
        embedder.embeddings.create(model=MODEL, input=[101, 99999, 102])
    assert "99999" in e.value.body["message"]


def test_models_of_the_wrong_kind_are_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="smollm2", input="hi")
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="text-embedding-3-small", input="hi")


def test_concurrent_requests_share_forward_passes(embedder, redis_server, reference):
    """Micro-batching: 24 concurrent requests take fewer passes than requests, and each gets
    its own vector back."""
    r = redis.Redis.from_url(redis_server.url)
    key = "ferry:stats:ferry.all-minilm"
    before = {k.decode(): int(v) for k, v in r.hgetall(key).items()}
    texts = [f"Sentence number {i} about a ferry crossing {'the wide ' * (i % 7)}river."
             for i in range(24)]

    def one(text):
        return vectors(embedder.embeddings.create(model=MODEL, input=text, encoding_format="float"))[0]

    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        got = np.array(list(pool.map(one, texts)))
    after = {k.decode(): int(v) for k, v in r.hgetall(key).items()}
    requests_served = after["requests"] - before.get("requests", 0)
    passes = after["batches"] - before.get("batches", 0)
    assert requests_served == 24
    assert passes < requests_served, f"{passes} passes for {requests_served} requests"
    np.testing.assert_allclose(got, reference.encode(texts), atol=1e-5, rtol=0)
