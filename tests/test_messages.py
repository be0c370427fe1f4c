"""/v1/messages (Anthropic's Messages API) through the official ``anthropic`` client: create,
the stream's event sequence and the SDK's stream helpers, stop reasons, usage, every error
type's shape, x-api-key auth and tenants, and count_tokens. The synthetic worker scripts
replies (its last message is the script); SmolLM2 proves the real path (template, tool
grammar, prefix reuse, top_k, token counts)."""

from __future__ import annotations

import base64
import hashlib
import json
import time
import tomllib

import anthropic
import pytest
import requests

from tests.jobclient import batch_responses
from tests.services import TEST_CONFIG, Web, Worker

PIXEL = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
         "+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")


def script(*tokens: str, **extra) -> str:
    return json.dumps({"tokens": list(tokens), **extra})


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture
def claude(web) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=web.url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def scripted(claude, synthetic_worker):
    return claude


@pytest.fixture
def smol(claude, smollm2_worker):
    return claude


def test_create(scripted):
    r = scripted.messages.create(model="synthetic", max_tokens=10, system="Be brief.",
                                 messages=user(script("Hel", "lo", prompt_tokens=7)),
                                 metadata={"user_id": "u-1"},
                                 # Not in this SDK's signature any more; the API takes them.
                                 extra_body={"temperature": 0.5, "top_p": 0.9})
    assert r.id.startswith("msg_") and r.type == "message" and r.role == "assistant"
    assert r.model == "synthetic" and r.content[0].type == "text"
    assert [b.text for b in r.content] == ["Hello"]
    assert r.stop_reason == "end_turn" and r.stop_sequence is None
    assert (r.usage.input_tokens, r.usage.output_tokens) == (7, 2)
    assert (r.usage.cache_read_input_tokens, r.usage.cache_creation_input_tokens) == (0, 0)
    assert r._request_id == r.id


def test_block_content_and_system_blocks(scripted):
    r = scripted.messages.create(model="synthetic", max_tokens=10,
                                 system=[{"type": "text", "text": "Be brief.",
                                          "cache_control": {"type": "ephemeral"}}],
                                 messages=[{"role": "user", "content": "first"},
                                           {"role": "assistant", "content": [
                                               {"type": "text", "text": "ok"}]},
                                           {"role": "user", "content": [
                                               {"type": "text", "text": script("a", "b")}]}])
    assert r.content[0].text == "ab"


def test_max_tokens_and_stop_sequence(scripted):
    r = scripted.messages.create(model="synthetic", max_tokens=2,
                                 messages=user(script("a", "b", "c")))
    assert r.stop_reason == "max_tokens" and r.content[0].text == "ab"
    r = scripted.messages.create(model="synthetic", max_tokens=10, stop_sequences=["S", "T"],
                                 messages=user(script("a", "b", "T", "c")))
    assert r.stop_reason == "stop_sequence" and r.stop_sequence == "T"
    assert r.content[0].text == "ab"


STREAM = ["message_start", "ping", "content_block_start", "content_block_delta",
          "content_block_delta", "content_block_stop", "message_delta", "message_stop"]


def test_stream_event_sequence(scripted, web):
    # Tokens 50 ms apart, so that each is its own delta (a worker coalesces the tokens of a
    # few milliseconds into one, README "Streaming").
    body = dict(model="synthetic", max_tokens=10, messages=user(script(
        "Hel", "lo", prompt_tokens=5, delay=0.05)))
    # The client skips pings; the wire has one after message_start.
    evs = list(scripted.messages.create(**body, stream=True))
    assert [e.type for e in evs] == [k for k in STREAM if k != "ping"]
    start = evs[0].message
    assert start.id.startswith("msg_") and start.content == [] and start.usage.input_tokens == 5
    assert evs[1].index == 0 and evs[1].content_block.type == "text"
    assert [e.delta.text for e in evs[2:4]] == ["Hel", "lo"]
    assert evs[5].delta.stop_reason == "end_turn" and evs[5].usage.output_tokens == 2
    wire = sse(raw(web, {**body, "stream": True}).text)
    assert [name for name, _ in wire] == STREAM
    assert all(name == data["type"] for name, data in wire)


def test_stream_helpers(scripted):
    body = dict(model="synthetic", max_tokens=10, messages=user(script("Hel", "lo")))
    with scripted.messages.stream(**body) as stream:
        assert "".join(stream.text_stream) == "Hello"
        final = stream.get_final_message()
    created = scripted.messages.create(**body)
    assert final.content[0].text == "Hello" and final.stop_reason == "end_turn"
    assert final.usage == created.usage


def raw(web, body: dict, headers: dict | None = None) -> requests.Response:
    return requests.post(web.url + "/v1/messages", json=body, headers=headers, timeout=30)


def sse(text: str) -> list[tuple[str, dict]]:
    out = []
    for chunk in text.strip().split("\n\n"):
        name, data = chunk.split("\n")
        out.append((name.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return out


def test_a_failure_mid_stream_is_an_error_event(scripted, web):
    r = raw(web, {"model": "synthetic", "max_tokens": 10, "stream": True,
                  "messages": user(script("a", fail="boom"))})
    evs = sse(r.text)
    assert r.status_code == 200 and evs[0][0] == "message_start"
    name, data = evs[-1]
    assert name == "error" and data["type"] == "error"
    assert data["error"]["type"] == "api_error" and "boom" in data["error"]["message"]
    with pytest.raises(anthropic.InternalServerError) as e:
        scripted.messages.create(model="synthetic", max_tokens=10,
                                 messages=user(script("a", fail="boom")))
    assert e.value.body["error"]["type"] == "api_error"


def test_a_client_that_leaves_mid_stream_cancels_the_job(scripted, web):
    stream = scripted.messages.create(model="synthetic", max_tokens=1000, stream=True,
                                      messages=user(json.dumps({"count": 1000, "rate": 50})))
    first = [next(iter(stream)) for _ in range(4)]
    stream.close()
    message_id = first[0].message.id
    deadline = time.monotonic() + 20
    while True:
        job = requests.get(f"{web.url}/v1/jobs/{message_id}", timeout=5).json()
        if job["status"] != "in_progress" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert job["status"] == "cancelled"


def expect(web, body, status: int, kind: str, words: str = "", headers=None) -> dict:
    r = raw(web, body, headers)
    assert r.status_code == status, r.text
    got = r.json()
    assert set(got) == {"type", "error", "request_id"} and got["type"] == "error"
    assert set(got["error"]) == {"type", "message"} and got["error"]["type"] == kind
    assert words in got["error"]["message"], got
    assert r.headers["request-id"] == got["request_id"]
    return got


BASE = {"model": "synthetic", "max_tokens": 5, "messages": user(script("a"))}


@pytest.mark.parametrize("change,words", [
    ({"max_tokens": None}, "max_tokens"),
    ({"stop_sequence": ["x"]}, "stop_sequence"),  # unknown fields are refused, as Anthropic does
    # Claude Code sends thinking while its thinking mode is on: the 400 says how to turn it off.
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "alwaysThinkingEnabled: false"),
    ({"top_k": 5}, "top_k"),  # the synthetic backend has no top_k
    ({"temperature": 1.5}, "temperature"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "web_search_20250305"),
    ({"tool_choice": {"type": "tool", "name": "nope"},
      "tools": [{"name": "f", "input_schema": {"type": "object"}}]}, "nope"),
    ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
     "document"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}]}]}, "prefill"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}],
      "tools": [{"name": "f", "input_schema": {"type": "object"}}]}, "prefill"),
    ({"mcp_servers": []}, "mcp_servers"),
])
def test_invalid_requests(scripted, web, change, words):
    body = {k: v for k, v in {**BASE, **change}.items() if v is not None}
    expect(web, body, 400, "invalid_request_error", words)


def test_image_on_a_text_only_model_is_a_clear_400(scripted, web):
    content = [{"type": "text", "text": "What is this?"},
               {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                            "data": PIXEL.split(",", 1)[1]}}]
    got = expect(web, {**BASE, "messages": [{"role": "user", "content": content}]}, 400,
                 "invalid_request_error", "has no image input")
    assert "synthetic" in got["error"]["message"]
    with pytest.raises(anthropic.BadRequestError):
        scripted.messages.create(model="synthetic", max_tokens=5,
                                 messages=[{"role": "user", "content": content}])


def test_image_reaches_a_vision_model(scripted, web, redis_server, logs):
    worker = Worker("synthetic-vision", redis_server.url, logs).start()
    try:
        source = {"type": "base64", "media_type": "image/png", "data": PIXEL.split(",", 1)[1]}
        r = scripted.messages.create(model="synthetic-vision", max_tokens=5, messages=[
            {"role": "user", "content": [
                {"type": "text", "text": json.dumps({"describe_images": True})},
                {"type": "image", "source": source}]}])
        # The vision double answers with the number of images and each one's sha256.
        digest = hashlib.sha256(base64.b64decode(source["data"])).hexdigest()
        assert r.content[0].text == f"1 images {digest}"
        # A URL source reaches the chat path's image handling (fetching is off here).
        with pytest.raises(anthropic.BadRequestError) as e:
            scripted.messages.create(model="synthetic-vision", max_tokens=5, messages=[
                {"role": "user", "content": [
                    {"type": "text", "text": json.dumps({"describe_images": True})},
                    {"type": "image", "source": {"type": "url",
                                                 "url": "https://example.com/a.png"}}]}])
        assert "Fetching image URLs is disabled" in e.value.body["error"]["message"]
    finally:
        worker.stop()


def test_other_error_types(scripted, web):
    expect(web, {**BASE, "model": "no-such-model"}, 404, "not_found_error", "no-such-model")
    # Nobody serves "unserved": Ferry's 503 is Anthropic's 529, come back later.
    expect(web, {**BASE, "model": "unserved"}, 529, "overloaded_error")
    expect(web, BASE, 400, "invalid_request_error", "some-beta-2099",
           headers={"anthropic-beta": "prompt-caching-2024-07-31,some-beta-2099"})
    # anthropic-version is accepted and ignored, known betas too.
    ok = raw(web, BASE, {"anthropic-version": "2023-06-01",
                         "anthropic-beta": "prompt-caching-2024-07-31"})
    assert ok.status_code == 200, ok.text
    r = requests.post(web.url + "/v1/messages/nope", json={}, timeout=5)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = requests.post(web.url + "/v1/messages", data=b"{", timeout=5)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.NotFoundError):
        scripted.messages.create(model="no-such-model", max_tokens=5, messages=user("hi"))
    # The OpenAI routes keep OpenAI's envelope.
    r = requests.post(web.url + "/v1/chat/completions", json={"model": "no-such-model",
                      "messages": user("hi")}, timeout=5)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_count_tokens_scripted(scripted, web):
    got = scripted.messages.count_tokens(model="synthetic",
                                         messages=user(script("a", "b", prompt_tokens=11)))
    assert got.input_tokens == 11
    # The count's job rendered the prompt and generated nothing.
    job = requests.get(f"{web.url}/v1/jobs/{got._request_id}", timeout=5).json()
    assert job["status"] == "completed", job
    assert job["result"]["usage"]["completion_tokens"] == 0


# -- keys: x-api-key, tenants, 401 and 429 ----------------------------------------------------

ALICE, BOB, CAROL = "alice-msg-key-1", "bob-msg-key-2", "carol-msg-key-3"


@pytest.fixture(scope="module")
def keyed_web(redis_server, logs):
    keys = json.dumps([ALICE, BOB, {"key": CAROL, "rpm": 2}])
    server = Web(redis_server.url, logs, FERRY_API_KEYS=keys,
                 FERRY_MAX_BODY_BYTES=str(64 * 1024)).start()
    yield server
    server.stop()


def test_keys(keyed_web, synthetic_worker):
    # This SDK sends api_key as a bearer token; Claude Code and older SDKs send x-api-key.
    alice = anthropic.Anthropic(base_url=keyed_web.url, api_key=None, max_retries=0,
                                default_headers={"X-Api-Key": ALICE})
    by_bearer = anthropic.Anthropic(base_url=keyed_web.url, api_key=BOB, max_retries=0)
    r = alice.messages.create(model="synthetic", max_tokens=5, messages=user(script("hi")))
    assert r.content[0].text == "hi"
    assert "authorization" not in {k.lower() for k in alice.auth_headers}
    assert by_bearer.messages.create(model="synthetic", max_tokens=5,
                                     messages=user(script("yo"))).content[0].text == "yo"
    # The request's job is its key's: Alice sees it, Bob does not.
    url = f"{keyed_web.url}/v1/jobs/{r.id}"
    assert requests.get(url, headers={"x-api-key": ALICE}, timeout=5).status_code == 200
    assert requests.get(url, headers={"x-api-key": BOB}, timeout=5).status_code == 404
    for headers in ({}, {"x-api-key": "wrong"}):
        expect(keyed_web, BASE, 401, "authentication_error", headers=headers)
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=keyed_web.url, api_key="wrong", max_retries=0) \
            .messages.create(model="synthetic", max_tokens=5, messages=user("hi"))
    carol = {"x-api-key": CAROL}
    statuses = [raw(keyed_web, BASE, carol).status_code for _ in range(3)]
    assert statuses[:2] == [200, 200]
    got = expect(keyed_web, BASE, 429, "rate_limit_error", headers=carol)
    assert got["error"]["message"]
    big = {**BASE, "messages": user("x" * 100_000)}
    expect(keyed_web, big, 413, "request_too_large", headers={"x-api-key": ALICE})


# -- SmolLM2: the real model -------------------------------------------------------------------

# temperature (and top_p, top_k) are no longer in the SDK's signature; the API takes them.
GREEDY = {"temperature": 0}

WEATHER = {"name": "get_weather", "description": "The weather in a city.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                            "required": ["city"], "additionalProperties": False}}


@pytest.mark.model
def test_real_create_and_stream(smol):
    body = dict(model="smollm2", max_tokens=8, messages=user("Count: one, two,"))
    made = smol.messages.create(**body, extra_body=GREEDY)
    with smol.messages.stream(**body, extra_body=GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and text == made.content[0].text == final.content[0].text
    assert final.stop_reason == made.stop_reason and final.usage.output_tokens > 0


@pytest.mark.model
def test_top_k(smol):
    # top_k 1 keeps only the likeliest token: sampling at temperature 1 is then greedy, on
    # a prompt where sampling without it wanders.
    body = dict(model="smollm2", max_tokens=16, messages=user("Write a wild, strange poem."))
    greedy = smol.messages.create(**body, extra_body=GREEDY).content[0].text
    for _ in range(2):
        top1 = smol.messages.create(**body, extra_body={"temperature": 1.0, "top_k": 1})
        assert top1.content[0].text == greedy


@pytest.mark.model
def test_structured_output(smol):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    r = smol.messages.create(model="smollm2", max_tokens=40, extra_body=GREEDY,
                             output_config={"format": {"type": "json_schema", "schema": schema}},
                             messages=user("Invent a person: a name and an age."))
    person = json.loads(r.content[0].text)
    assert set(person) == {"name", "age"} and isinstance(person["age"], int)


@pytest.mark.model
def test_streamed_tool_input(smol):
    with smol.messages.stream(model="smollm2", max_tokens=40, extra_body=GREEDY, tools=[WEATHER],
                              tool_choice={"type": "tool", "name": "get_weather"},
                              messages=user("Weather in Rome?")) as stream:
        evs = list(stream)
        final = stream.get_final_message()
    starts = [e for e in evs if e.type == "content_block_start"]
    assert starts[-1].content_block.type == "tool_use"
    assert starts[-1].content_block.id.startswith("toolu_")
    deltas = [e.delta.partial_json for e in evs
              if e.type == "content_block_delta" and e.delta.type == "input_json_delta"]
    assert deltas and "city" in json.loads("".join(deltas))
    call = final.content[-1]
    assert call.type == "tool_use" and call.name == "get_weather"
    assert call.input == json.loads("".join(deltas))
    assert final.stop_reason == "tool_use"


@pytest.mark.model
def test_tool_round_trip(smol):
    question = user("What is the weather in Paris?")
    r = smol.messages.create(model="smollm2", max_tokens=40, extra_body=GREEDY, tools=[WEATHER],
                             tool_choice={"type": "any"}, messages=question)
    call = r.content[-1]
    assert r.stop_reason == "tool_use" and call.type == "tool_use" and "city" in call.input
    turn = question + [{"role": "assistant", "content": r.content},
                       {"role": "user", "content": [{"type": "tool_result",
                                                     "tool_use_id": call.id,
                                                     "content": [{"type": "text",
                                                                  "text": "sunny, 21C"}]}]}]
    answer = smol.messages.create(model="smollm2", max_tokens=12, extra_body=GREEDY,
                                  tools=[WEATHER], tool_choice={"type": "none"}, messages=turn)
    assert answer.content[0].type == "text" and answer.content[0].text
    assert answer.stop_reason in ("end_turn", "max_tokens")
    auto = smol.messages.create(model="smollm2", max_tokens=12, extra_body=GREEDY,
                                tools=[WEATHER], messages=turn)
    assert auto.content


TURNS = [{"role": "user", "content": "Hi, I am Ada."},
         {"role": "assistant", "content": "Hello Ada!"},
         {"role": "user", "content": "What is my name?"}]
CALL = [{"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1",
                                           "name": "get_weather", "input": {"city": "Oslo"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                      "content": "rain", "is_error": False}]}]
# Bodies that render differently: system (string, blocks), several turns, tools, tool
# choices, tool results.
COUNTED = [dict(messages=user("Hello")),
           dict(system="You are terse.", messages=user("Hello")),
           dict(system=[{"type": "text", "text": "Rule one."},
                        {"type": "text", "text": "Rule two."}], messages=TURNS),
           dict(tools=[WEATHER], messages=user("Weather in Rome?")),
           dict(tools=[WEATHER], tool_choice={"type": "tool", "name": "get_weather"},
                messages=user("Weather in Rome?")),
           dict(tools=[WEATHER], tool_choice={"type": "none"}, messages=CALL)]


@pytest.mark.model
def test_count_tokens_equals_the_create_usage(smol):
    """count_tokens is the prompt a create reports. Anthropic counts a cached prefix apart,
    so with prefix reuse that is input_tokens + cache_read_input_tokens."""
    counts = []
    for body in COUNTED:
        counted = smol.messages.count_tokens(model="smollm2", **body).input_tokens
        made = smol.messages.create(model="smollm2", max_tokens=1, **body).usage
        assert counted == made.input_tokens + made.cache_read_input_tokens, body
        counts.append(counted)
    assert counts[1] != counts[0] and counts[3] > counts[0]  # system and tools are counted


@pytest.mark.model
def test_count_tokens_equals_input_tokens_without_reuse(claude, redis_server, logs):
    # smollm2-cold: the same weights with prefix reuse off, so nothing is read from a cache.
    worker = Worker("smollm2-cold", redis_server.url, logs).start()
    try:
        for body in COUNTED:
            counted = claude.messages.count_tokens(model="smollm2-cold", **body).input_tokens
            made = claude.messages.create(model="smollm2-cold", max_tokens=1, **body).usage
            assert (counted, 0) == (made.input_tokens, made.cache_read_input_tokens), body
    finally:
        worker.stop()


@pytest.mark.model
def test_a_second_turn_reads_the_cache(smol):
    first = user("My name is Ada and I like tea. Say hi to me.")
    r = smol.messages.create(model="smollm2", max_tokens=8, extra_body=GREEDY, messages=first)
    second = first + [{"role": "assistant", "content": r.content},
                      {"role": "user", "content": "What do I like?"}]
    again = smol.messages.create(model="smollm2", max_tokens=4, extra_body=GREEDY,
                                 messages=second)
    assert again.usage.cache_read_input_tokens > 0
    total = again.usage.input_tokens + again.usage.cache_read_input_tokens
    assert total == smol.messages.count_tokens(model="smollm2", messages=second).input_tokens


@pytest.mark.model
def test_a_prefill_is_continued(smol, tokenize):
    """A last assistant message is continued, as at Anthropic: rendered open (no end of
    turn), and the reply's text is what follows it."""
    prefill = "The capital of France is"
    question = user("Complete the sentence about France.")
    body = dict(model="smollm2", max_tokens=6, extra_body=GREEDY,
                messages=question + [{"role": "assistant", "content": prefill}])
    made = smol.messages.create(**body)
    with smol.messages.stream(**body) as stream:
        streamed = "".join(stream.text_stream)
    text = made.content[0].text
    assert text == streamed and not text.startswith(prefill) and "Paris" in text
    # The prompt is the question's plus the prefill's tokens: no end of turn, no new turn.
    counted = smol.messages.count_tokens(model="smollm2", messages=body["messages"])
    alone = smol.messages.count_tokens(model="smollm2", messages=question)
    assert counted.input_tokens == alone.input_tokens + len(tokenize(prefill))
    assert counted.input_tokens == made.usage.input_tokens + made.usage.cache_read_input_tokens


# -- clients that ask for more than the model has (Claude Code) ---------------------------------

SMOL_CTX = next(m["num_ctx"] for m in tomllib.loads(TEST_CONFIG.read_text())["models"]
                if m["name"] == "smollm2")


def filled(smol, room: int) -> tuple[list[dict], int]:
    """A user message whose prompt leaves ``room`` tokens of smollm2's context, and its
    length (each " apple" is one token; count_tokens says where the template's are)."""
    def count(k: int) -> int:
        return smol.messages.count_tokens(model="smollm2",
                                          messages=user("apple" + " apple" * k)).input_tokens
    k = 100 + (SMOL_CTX - room) - count(100)
    return user("apple" + " apple" * k), count(k)


@pytest.mark.model
def test_a_max_tokens_past_the_model_is_an_upper_bound(smol):
    """Coding agents send max_tokens 32000 or 64000 whatever the model: it is a bound, as on
    llama.cpp's server and Ollama (not Anthropic's 400, which names its own models' limits)."""
    body = dict(model="smollm2", max_tokens=64000, messages=user("Say hi."), extra_body=GREEDY)
    made = smol.messages.create(**body)
    with smol.messages.stream(**body) as stream:
        final = stream.get_final_message()
    for m in (made, final):
        prompt = m.usage.input_tokens + m.usage.cache_read_input_tokens
        assert m.stop_reason in ("end_turn", "max_tokens") and m.content[0].text
        assert 0 < m.usage.output_tokens <= SMOL_CTX - prompt
    # A prompt that leaves 3 tokens: the reply stops there, with stop_reason max_tokens.
    messages, prompt = filled(smol, 3)
    assert prompt == SMOL_CTX - 3
    made = smol.messages.create(**{**body, "messages": messages})
    with smol.messages.stream(**{**body, "messages": messages}) as stream:
        final = stream.get_final_message()
    for m in (made, final):
        assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 3
        assert m.usage.input_tokens + m.usage.cache_read_input_tokens == prompt


@pytest.mark.model
def test_a_prompt_past_the_context_is_still_a_clear_400(smol, web):
    messages = user("apple" + " apple" * (SMOL_CTX + 100))
    for stream in (False, True):
        got = expect(web, {"model": "smollm2", "max_tokens": 64000, "stream": stream,
                           "messages": messages}, 400, "invalid_request_error",
                     f"maximum context length is {SMOL_CTX} tokens")
        assert "leaves no room for a completion" in got["error"]["message"], got


CC_SYSTEM = [
    {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude.",
     "cache_control": {"type": "ephemeral"}},
    {"type": "text", "text": "You are an interactive CLI tool that helps users with software "
     "engineering tasks. Answer concisely.", "cache_control": {"type": "ephemeral"}}]
DRAFT7 = "http://json-schema.org/draft-07/schema#"
# Small versions of Claude Code's tools, with the keywords its schemas carry (zod's JSON
# Schema output: $schema, additionalProperties false, nested arrays of objects, enums).
CC_TOOLS = [
    {"name": "Bash", "description": "Executes a bash command in a persistent shell.",
     "input_schema": {"$schema": DRAFT7, "type": "object", "additionalProperties": False,
                      "properties": {
                          "command": {"type": "string", "description": "The command"},
                          "timeout": {"type": "number", "description": "Milliseconds"},
                          "description": {"type": "string"},
                          "run_in_background": {"type": "boolean"}},
                      "required": ["command"]}},
    {"name": "Read", "description": "Reads a file from the local filesystem.",
     "input_schema": {"$schema": DRAFT7, "type": "object", "additionalProperties": False,
                      "properties": {"file_path": {"type": "string"},
                                     "offset": {"type": "number"},
                                     "limit": {"type": "number"}},
                      "required": ["file_path"]}},
    {"name": "Edit", "description": "Replaces exact text in a file.",
     "input_schema": {"$schema": DRAFT7, "type": "object", "additionalProperties": False,
                      "properties": {"file_path": {"type": "string"},
                                     "old_string": {"type": "string"},
                                     "new_string": {"type": "string"},
                                     "replace_all": {"type": "boolean", "default": False}},
                      "required": ["file_path", "old_string", "new_string"]}},
    {"name": "TodoWrite", "description": "Updates the session's todo list.",
     "input_schema": {"$schema": DRAFT7, "type": "object", "additionalProperties": False,
                      "properties": {"todos": {"type": "array", "items": {
                          "type": "object", "additionalProperties": False,
                          "properties": {
                              "content": {"type": "string", "minLength": 1},
                              "status": {"type": "string",
                                         "enum": ["pending", "in_progress", "completed"]},
                              "activeForm": {"type": "string", "minLength": 1}},
                          "required": ["content", "status", "activeForm"]}}},
                      "required": ["todos"]}},
    {"name": "mcp__ide__getDiagnostics", "description": "Diagnostics from the IDE.",
     "input_schema": {"type": "object", "properties": {"uri": {"type": "string"}},
                      "additionalProperties": False, "$schema": DRAFT7},
     "cache_control": {"type": "ephemeral"}}]
CC_MESSAGES = [
    {"role": "user", "content": [
        {"type": "text", "text": "<system-reminder>The todo list is empty.</system-reminder>"},
        {"type": "text", "text": "What does README.md say?"}]},
    {"role": "assistant", "content": [
        {"type": "text", "text": "I'll read it."},
        {"type": "tool_use", "id": "toolu_01AbCdEf", "name": "Read",
         "input": {"file_path": "/repo/README.md"}}]},
    {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_01AbCdEf",
         "content": [{"type": "text", "text": "     1\u2192# Demo\n     2\u2192A demo project."}]},
        {"type": "text", "text": "Summarize it in one line.",
         "cache_control": {"type": "ephemeral"}}]}]
CC_HEADERS = {
    "anthropic-version": "2023-06-01", "x-api-key": "unused", "x-app": "cli",
    "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,"
                      "fine-grained-tool-streaming-2025-05-14",
    "anthropic-dangerous-direct-browser-access": "true",
    "user-agent": "claude-cli/2.0.0 (external, cli)"}


@pytest.mark.model
def test_a_claude_code_request(smol, web):
    """The body and headers Claude Code sends (its beta client posts to ?beta=true)."""
    body = {"model": "smollm2", "max_tokens": 32000, "temperature": 1, "stream": True,
            "system": CC_SYSTEM, "tools": CC_TOOLS, "messages": CC_MESSAGES,
            "metadata": {"user_id": "user_" + "ab" * 32 + "_account__session_"
                                    "0f8fad5b-d9cb-469f-a165-70867728950e"}}
    r = requests.post(web.url + "/v1/messages?beta=true", json=body, headers=CC_HEADERS,
                      timeout=120)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    evs = sse(r.text)
    names = [name for name, _ in evs]
    assert all(name == data["type"] for name, data in evs)
    assert names[:2] == ["message_start", "ping"] and names[-2:] == ["message_delta",
                                                                      "message_stop"]
    starts = [d["index"] for n, d in evs if n == "content_block_start"]
    assert starts and starts == [d["index"] for n, d in evs if n == "content_block_stop"]
    delta = evs[-2][1]
    assert delta["delta"]["stop_reason"] in ("end_turn", "max_tokens", "tool_use")
    assert delta["usage"]["output_tokens"] > 0
    # The same through the official client, which rebuilds the message from the events.
    with anthropic.Anthropic(base_url=web.url, api_key="unused", max_retries=0,
                             default_headers=CC_HEADERS).messages.stream(
            **{k: v for k, v in body.items() if k not in ("stream", "temperature")},
            extra_body={"temperature": 1}) as stream:
        final = stream.get_final_message()
    assert final.content and final.stop_reason in ("end_turn", "max_tokens", "tool_use")


# -- the Batch API -------------------------------------------------------------------------------


def test_batch_of_messages(client, synthetic_worker, batch_worker):
    lines = [{"custom_id": "ok", "method": "POST", "url": "/v1/messages",
              "body": {"model": "synthetic", "max_tokens": 5,
                       "messages": user(script("hi", " there"))}},
             {"custom_id": "bad", "method": "POST", "url": "/v1/messages",
              "body": {"model": "synthetic", "max_tokens": 5, "messages": user(script("x")),
                       "thinking": {"type": "enabled", "budget_tokens": 1024}}}]
    out = batch_responses(client, lines, "/v1/messages")
    body = out["ok"]["body"]
    assert out["ok"]["status_code"] == 200 and body["type"] == "message"
    assert body["content"] == [{"type": "text", "text": "hi there"}]
    assert body["id"] == out["ok"]["request_id"] and body["id"].startswith("msg_")
    # A failed line is in the batch's (OpenAI's) envelope, as every batch line is.
    assert out["bad"]["status_code"] == 400
    assert out["bad"]["body"]["error"]["param"] == "thinking"


def test_models_in_anthropics_shape_by_header(claude, client):
    ids = [m.id for m in claude.models.list()]
    assert "synthetic" in ids and "smollm2" in ids
    got = claude.models.retrieve("synthetic")
    assert got.type == "model" and got.display_name == "synthetic" and got.created_at
    # Without anthropic-version, OpenAI's shapes (the OpenAI client parses them).
    assert "synthetic" in [m.id for m in client.models.list()]
    assert client.models.retrieve("synthetic").object == "model"
