"""End to end on the real CPU model: official client -> web -> Celery -> llama.cpp -> SSE."""

from __future__ import annotations

import concurrent.futures

import pytest

pytestmark = pytest.mark.model

MESSAGES = [{"role": "user", "content": "Write one sentence about the sea."}]


def test_models_list_and_retrieve(client):
    models = client.models.list().data
    ids = {m.id for m in models}
    assert {"smollm2", "synthetic"} <= ids
    m = client.models.retrieve("smollm2")
    assert m.object == "model" and m.owned_by == "library" and m.created > 1_600_000_000
    assert client.models.retrieve("smollm2-135m-instruct").id == "smollm2"


def test_chat_completion(chat):
    r = chat.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=24,
                                     temperature=0)
    assert r.object == "chat.completion"
    assert r.id.startswith("chatcmpl-") and r.model == "smollm2"
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 10
    assert 0 < r.usage.completion_tokens <= 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_is_coherent_english(chat):
    """Guards against a miscompiled engine: garbage logits still produce 'text'."""
    r = chat.chat.completions.create(
        model="smollm2", temperature=0, max_tokens=12,
        messages=[{"role": "user", "content": "Say hello"}])
    text = r.choices[0].message.content
    letters = sum(c.isascii() and c.isalpha() for c in text)
    assert letters >= len(text) // 2, text


def test_max_tokens_gives_length(chat):
    r = chat.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=3,
                                     temperature=0)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 3


def test_max_completion_tokens(chat):
    r = chat.chat.completions.create(model="smollm2", messages=MESSAGES,
                                     max_completion_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2 and r.choices[0].finish_reason == "length"


def test_stream_equals_non_stream_at_temperature_zero(chat):
    kw = dict(model="smollm2", messages=MESSAGES, max_tokens=30, temperature=0)
    whole = chat.chat.completions.create(**kw).choices[0].message.content
    chunks = list(chat.chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert len({c.id for c in chunks}) == 1
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == whole


def test_stream_include_usage(chat):
    chunks = list(chat.chat.completions.create(
        model="smollm2", messages=MESSAGES, max_tokens=5, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert all(c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 5
    assert last.usage.total_tokens == last.usage.prompt_tokens + 5


def test_stop_string(chat):
    kw = dict(model="smollm2", prompt="1, 2, 3, 4,", max_tokens=30, temperature=0)
    free = chat.completions.create(**kw).choices[0].text
    assert " 6" in free
    r = chat.completions.create(stop=[" 6"], **kw)
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == free[: free.index(" 6")]
    streamed = "".join(c.choices[0].text for c in
                       chat.completions.create(stop=" 6", stream=True, **kw))
    assert streamed == r.choices[0].text


def test_seed_reproducible_at_temperature(chat):
    kw = dict(model="smollm2", messages=MESSAGES, max_tokens=20, temperature=1.0, seed=1234)
    a = chat.chat.completions.create(**kw).choices[0].message.content
    b = chat.chat.completions.create(**kw).choices[0].message.content
    assert a == b


def test_completion_text_and_echo(chat):
    r = chat.completions.create(model="smollm2", prompt="The sky is", max_tokens=5,
                                temperature=0, echo=True)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].text.startswith("The sky is") and len(r.choices[0].text) > 10
    assert r.usage.completion_tokens == 5


def test_completion_token_prompt(chat):
    text = chat.completions.create(model="smollm2", prompt="Hello", max_tokens=4,
                                   temperature=0).choices[0].text
    # Token ids for "Hello" in SmolLM2's vocabulary.
    by_ids = chat.completions.create(model="smollm2", prompt=[19556], max_tokens=4,
                                     temperature=0).choices[0].text
    assert by_ids == text


def test_context_length_exceeded(chat):
    import openai

    long = "word " * 3000
    with pytest.raises(openai.BadRequestError) as e:
        chat.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": long}])
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        chat.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=5000)
    assert e.value.code == "context_length_exceeded"


def test_concurrent_streams_get_only_their_own_tokens(chat):
    def run(i: int) -> tuple[str, str]:
        kw = dict(model="smollm2", max_tokens=12, temperature=0,
                  messages=[{"role": "user", "content": f"Count from {i} to {i + 5}."}])
        whole = chat.chat.completions.create(**kw).choices[0].message.content
        streamed = "".join(c.choices[0].delta.content or ""
                           for c in chat.chat.completions.create(stream=True, **kw))
        return whole, streamed

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, range(1, 5)))
    for whole, streamed in results:
        assert whole == streamed
    assert len({w for w, _ in results}) > 1
