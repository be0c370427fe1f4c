"""/v1/responses through the official client: create (string and item input), the stream's
event sequence, usage, error shapes, stored responses (owner-scoped), previous_response_id,
function tools and ``responses.parse``. The synthetic worker scripts replies (its last
message is the script); SmolLM2 proves the real path (templates, grammar, prefix reuse)."""

from __future__ import annotations

import base64
import hashlib
import json
import time

import openai
import pydantic
import pytest
import redis
import requests

from config.contract.protocol import events_log

from tests.jobclient import batch_responses
from tests.services import Web, Worker


def script(*tokens: str, **extra) -> str:
    return json.dumps({"tokens": list(tokens), **extra})


EVENT_SEQUENCE = ["response.created", "response.in_progress", "response.output_item.added",
                  "response.content_part.added", "response.output_text.delta",
                  "response.output_text.delta", "response.output_text.done",
                  "response.content_part.done", "response.output_item.done",
                  "response.completed"]


def test_create_string_input(scripted):
    r = scripted.responses.create(model="synthetic", input=script("Hel", "lo", prompt_tokens=7),
                                  instructions="Be brief.", max_output_tokens=10,
                                  temperature=0.5, top_p=0.9, metadata={"k": "v"}, user="u-1")
    assert r.object == "response" and r.id.startswith("resp_")
    assert r.status == "completed" and r.incomplete_details is None and r.error is None
    assert r.output_text == "Hello"
    [msg] = r.output
    assert msg.type == "message" and msg.role == "assistant" and msg.status == "completed"
    assert [c.type for c in msg.content] == ["output_text"]
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens) == (7, 2, 9)
    assert r.usage.input_tokens_details.cached_tokens == 0
    assert r.instructions == "Be brief." and r.max_output_tokens == 10
    assert r.temperature == 0.5 and r.top_p == 0.9 and r.metadata == {"k": "v"}
    assert r.user == "u-1" and r.store is True


def test_create_item_input(scripted):
    r = scripted.responses.create(model="synthetic", input=[
        {"role": "developer", "content": "Answer in one word."},
        {"type": "message", "role": "user",
         "content": [{"type": "input_text", "text": script("a", "b")}]}])
    assert r.output_text == "ab"


def test_max_output_tokens_makes_it_incomplete(scripted):
    r = scripted.responses.create(model="synthetic", input=script("a", "b", "c", "d"),
                                  max_output_tokens=2)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output_text == "ab" and r.output[0].status == "incomplete"
    assert r.usage.output_tokens == 2


def test_stream_event_sequence(scripted):
    # Tokens 50 ms apart: each its own delta (a worker coalesces only tokens closer than
    # FERRY_STREAM_COALESCE_MS, 5 ms).
    evs = list(scripted.responses.create(model="synthetic", input=script("Hel", "lo", delay=0.05),
                                         stream=True))
    assert [e.type for e in evs] == EVENT_SEQUENCE
    assert [e.sequence_number for e in evs] == list(range(len(evs)))
    assert evs[0].response.status == "in_progress" and evs[0].response.output == []
    assert "".join(e.delta for e in evs if e.type == "response.output_text.delta") == "Hello"
    item_id = evs[2].item.id
    assert all(e.item_id == item_id for e in evs[3:8])
    assert evs[6].text == "Hello" and evs[7].part.text == "Hello"
    final = evs[-1].response
    assert final.status == "completed" and final.output_text == "Hello"
    assert final.usage.total_tokens == final.usage.input_tokens + 2
    # The stored response is the stream's final one.
    assert scripted.responses.retrieve(final.id).output_text == "Hello"


def test_stream_helper(scripted):
    with scripted.responses.stream(model="synthetic", input=script("x", "y")) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    # The tokens come at once: one delta may carry both (FERRY_STREAM_COALESCE_MS).
    assert "".join(deltas) == "xy" and final.output_text == "xy"


def test_streamed_incomplete(scripted):
    # (The client's stream helper takes only response.completed as an end, as with OpenAI.)
    evs = list(scripted.responses.create(model="synthetic", input=script("x", "y", "z"),
                                         max_output_tokens=1, stream=True))
    assert evs[-1].type == "response.incomplete"
    assert evs[-1].response.incomplete_details.reason == "max_output_tokens"
    assert evs[-1].response.output_text == "x" and evs[-2].item.status == "incomplete"


def test_a_client_that_leaves_mid_stream_cancels_the_job(scripted, web):
    stream = scripted.responses.create(model="synthetic", input=json.dumps(
        {"count": 1000, "rate": 50}), stream=True)
    first = [next(iter(stream)) for _ in range(4)]
    stream.close()
    response_id = first[0].response.id
    job = wait_for_job(web, response_id)
    assert job["status"] == "cancelled"


def test_a_failure_mid_stream_is_response_failed(scripted):
    evs = list(scripted.responses.create(model="synthetic", input=script("a", fail="boom"),
                                         stream=True))
    assert evs[-1].type == "response.failed"
    assert evs[-1].response.status == "failed" and "boom" in evs[-1].response.error.message
    assert scripted.responses.retrieve(evs[-1].response.id).status == "failed"
    with pytest.raises(openai.InternalServerError) as e:
        scripted.responses.create(model="synthetic", input=script("a", fail="boom"))
    assert e.value.body["code"] == "generation_failed"


@pytest.mark.parametrize("kwargs,param,status", [
    (dict(model="no-such-model"), "model", 404),
    (dict(temperature=3), "temperature", 400),
    (dict(tools=[{"type": "web_search"}]), "tools[0].type", 400),
    (dict(tools=[{"type": "file_search", "vector_store_ids": ["vs_1"]}]), "tools[0].type", 400),
    (dict(extra_body={"conversation": "conv_1"}), "conversation", 400),
    (dict(input=[{"type": "reasoning", "summary": []}]), "input[0]", 400),
    (dict(previous_response_id="resp_nope"), "previous_response_id", 404),
    (dict(background=True, store=False), "store", 400),
    (dict(truncation="auto"), "truncation", 400),
    (dict(metadata={f"k{i}": "v" for i in range(17)}), "metadata", 400),
    (dict(input=[{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}]),
     "input[0].content[0].file_id", 400),
])
def test_error_shapes(scripted, kwargs, param, status):
    kwargs = {"model": "synthetic", "input": script("a"), **kwargs}
    with pytest.raises(openai.APIStatusError) as e:
        scripted.responses.create(**kwargs)
    assert e.value.status_code == status and e.value.body["param"] == param
    assert e.value.body["type"] == "invalid_request_error"
    if param == "tools[0].type":
        assert kwargs["tools"][0]["type"] in e.value.body["message"]


PIXEL = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
         "+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")


def test_input_image_reaches_the_vision_check(scripted):
    # input_image parts become the chat path's image parts: a model without vision refuses
    # them by name, before anything is queued.
    with pytest.raises(openai.BadRequestError) as e:
        scripted.responses.create(model="synthetic", input=[{"role": "user", "content": [
            {"type": "input_text", "text": script("a")},
            {"type": "input_image", "image_url": PIXEL}]}])
    assert "synthetic" in e.value.body["message"]


@pytest.fixture(scope="module")
def vision_worker(redis_server, logs):
    worker = Worker("synthetic-vision", redis_server.url, logs).start()
    yield worker
    worker.stop()


def test_input_image_bytes_reach_a_vision_worker(scripted, vision_worker):
    # The vision double answers with the number of images and each one's sha256.
    r = scripted.responses.create(model="synthetic-vision", input=[{"role": "user", "content": [
        {"type": "input_text", "text": json.dumps({"describe_images": True})},
        {"type": "input_image", "image_url": PIXEL}]}])
    digest = hashlib.sha256(base64.b64decode(PIXEL.split(",", 1)[1])).hexdigest()
    assert r.output_text == f"1 images {digest}"


def test_store_retrieve_input_items_delete(scripted):
    r = scripted.responses.create(model="synthetic", input=[
        {"role": "user", "content": "first"}, {"role": "user", "content": script("ok")}])
    got = scripted.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == "ok" and got.usage == r.usage
    items = scripted.responses.input_items.list(r.id, order="asc")
    assert [i.content[0].text for i in items.data] == ["first", script("ok")]
    assert all(i.type == "message" and i.role == "user" and i.id for i in items.data)
    newest = scripted.responses.input_items.list(r.id, limit=1)
    assert newest.data[0].id == items.data[1].id and newest.has_more
    deleted = scripted.responses.delete(r.id)
    assert deleted is None  # the client answers None for a 200
    with pytest.raises(openai.NotFoundError):
        scripted.responses.retrieve(r.id)
    unstored = scripted.responses.create(model="synthetic", input=script("x"), store=False)
    with pytest.raises(openai.NotFoundError):
        scripted.responses.retrieve(unstored.id)


OWNER_KEYS = ("alice-responses-key", "bob-responses-key")


@pytest.fixture(scope="module")
def keyed_web(redis_server, logs, synthetic_worker):
    server = Web(redis_server.url, logs, FERRY_API_KEYS=json.dumps(list(OWNER_KEYS))).start()
    yield server
    server.stop()


def test_stored_responses_are_their_owners(keyed_web):
    alice, bob = (openai.OpenAI(base_url=keyed_web.url + "/v1", api_key=k, max_retries=0)
                  for k in OWNER_KEYS)
    r = alice.responses.create(model="synthetic", input=script("mine"))
    assert alice.responses.retrieve(r.id).output_text == "mine"
    for attempt in (lambda: bob.responses.retrieve(r.id),
                    lambda: bob.responses.input_items.list(r.id),
                    lambda: bob.responses.delete(r.id),
                    lambda: bob.responses.create(model="synthetic", input=script("x"),
                                                 previous_response_id=r.id)):
        with pytest.raises(openai.NotFoundError):
            attempt()
    assert alice.responses.retrieve(r.id).output_text == "mine"


# -- SmolLM2: the real model -----------------------------------------------------------------


@pytest.mark.model
def test_three_turns_with_previous_response_id(chat):
    first = chat.responses.create(model="smollm2", input="My name is Ada. Say hi.",
                                  max_output_tokens=8, temperature=0)
    second = chat.responses.create(model="smollm2", input="What is my name?",
                                   previous_response_id=first.id, max_output_tokens=8,
                                   temperature=0)
    third = chat.responses.create(model="smollm2", input="Thanks.",
                                  previous_response_id=second.id, max_output_tokens=8,
                                  temperature=0)
    # Each turn's prompt holds the earlier ones: it grows, and the CPU backend reads the
    # stored prefix from its cache instead of evaluating it again.
    assert first.usage.input_tokens < second.usage.input_tokens < third.usage.input_tokens
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert third.usage.input_tokens_details.cached_tokens > first.usage.input_tokens
    assert third.previous_response_id == second.id
    # input_items are each turn's own input.
    assert [i.content[0].text for i in chat.responses.input_items.list(third.id).data] == [
        "Thanks."]


@pytest.mark.model
def test_real_stream(chat):
    evs = list(chat.responses.create(model="smollm2", input="Count: one, two,",
                                     max_output_tokens=6, temperature=0, stream=True))
    kinds = [e.type for e in evs]
    assert kinds[:4] == EVENT_SEQUENCE[:4] and kinds[-1] in ("response.completed",
                                                             "response.incomplete")
    text = "".join(e.delta for e in evs if e.type == "response.output_text.delta")
    assert text and evs[-1].response.output_text == text


class Person(pydantic.BaseModel):
    name: str
    age: int


@pytest.mark.model
def test_parse_text_format(chat):
    r = chat.responses.parse(model="smollm2", input="Invent a person: a name and an age.",
                             text_format=Person, max_output_tokens=60, temperature=0)
    assert r.status == "completed"
    assert isinstance(r.output_parsed, Person)
    assert json.loads(r.output_text) == r.output_parsed.model_dump()


WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"], "additionalProperties": False}}


@pytest.mark.model
def test_function_tool_round_trip(chat):
    r = chat.responses.create(model="smollm2", input="What is the weather in Paris?",
                              tools=[WEATHER], tool_choice="required", max_output_tokens=40,
                              temperature=0)
    [call] = r.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id
    assert "city" in json.loads(call.arguments)
    answer = chat.responses.create(
        model="smollm2", previous_response_id=r.id, tools=[WEATHER], tool_choice="none",
        input=[{"type": "function_call_output", "call_id": call.call_id,
                "output": json.dumps({"forecast": "sunny"})}],
        max_output_tokens=12, temperature=0)
    assert answer.status in ("completed", "incomplete") and answer.output_text
    assert answer.output[0].type == "message"
    # The same turn with the items sent by hand (no stored state) is accepted alike.
    by_hand = chat.responses.create(
        model="smollm2", store=False, max_output_tokens=4, temperature=0,
        input=[{"role": "user", "content": "What is the weather in Paris?"},
               {"type": "function_call", "call_id": call.call_id, "name": call.name,
                "arguments": call.arguments},
               {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
    assert by_hand.output_text


@pytest.mark.model
def test_streamed_function_call(chat):
    evs = list(chat.responses.create(model="smollm2", input="Weather in Rome?", tools=[WEATHER],
                                     tool_choice={"type": "function", "name": "get_weather"},
                                     max_output_tokens=40, temperature=0, stream=True))
    kinds = [e.type for e in evs]
    assert kinds[2] == "response.output_item.added" and evs[2].item.type == "function_call"
    assert "response.function_call_arguments.delta" in kinds
    done = next(e for e in evs if e.type == "response.function_call_arguments.done")
    deltas = "".join(e.delta for e in evs if e.type == "response.function_call_arguments.delta")
    assert done.arguments == deltas and "city" in json.loads(deltas)
    assert kinds[-2:] == ["response.output_item.done", "response.completed"]


# -- background: the job system ----------------------------------------------------------------


def wait_for_status(client, response_id: str, wanted: set[str], timeout: float = 20):
    deadline = time.monotonic() + timeout
    while True:
        r = client.responses.retrieve(response_id)
        if r.status in wanted or time.monotonic() > deadline:
            return r
        time.sleep(0.1)


def test_background_poll_and_replay(scripted):
    r = scripted.responses.create(model="synthetic", input=script("a", "b", delay=0.2),
                                  background=True)
    assert r.status == "queued" and r.background and r.output == []
    done = wait_for_status(scripted, r.id, {"completed"})
    assert done.status == "completed" and done.output_text == "ab"
    assert done.usage.output_tokens == 2
    evs = list(scripted.responses.retrieve(r.id, stream=True))
    assert [e.type for e in evs] == ["response.created", "response.queued",
                                     *EVENT_SEQUENCE[2:]]
    assert evs[-1].response.output_text == "ab"
    later = list(scripted.responses.retrieve(r.id, stream=True, starting_after=5))
    assert [e.sequence_number for e in later] == list(range(6, len(evs)))
    assert [e.model_dump() for e in later] == [e.model_dump() for e in evs[6:]]


def test_background_stream_follows_live(scripted):
    r = scripted.responses.create(model="synthetic", input=script("x", "y", "z", delay=0.3),
                                  background=True)
    evs = list(scripted.responses.retrieve(r.id, stream=True))
    assert evs[-1].type == "response.completed" and evs[-1].response.output_text == "xyz"


def test_background_cancel(scripted):
    r = scripted.responses.create(model="synthetic", input=script("a", hang=True),
                                  background=True)
    wait_for_status(scripted, r.id, {"in_progress"})
    cancelled = scripted.responses.cancel(r.id)
    assert cancelled.status == "cancelled"
    assert scripted.responses.retrieve(r.id).status == "cancelled"
    plain = scripted.responses.create(model="synthetic", input=script("a"))
    with pytest.raises(openai.BadRequestError):
        scripted.responses.cancel(plain.id)


def wait_for_job(web, job_id: str, timeout: float = 20) -> dict:
    # The job behind a background response, read without reading the response.
    deadline = time.monotonic() + timeout
    while True:
        job = requests.get(f"{web.url}/v1/jobs/{job_id}", timeout=5).json()
        if job["status"] in ("completed", "failed", "cancelled") or time.monotonic() > deadline:
            return job
        time.sleep(0.1)


def test_background_read_from_the_job_once_its_events_expired(scripted, web, redis_server):
    r = scripted.responses.create(model="synthetic", input=script("p", "q"), background=True)
    assert wait_for_job(web, r.id)["status"] == "completed"
    redis.Redis.from_url(redis_server.url).delete(events_log(r.id))
    done = scripted.responses.retrieve(r.id)
    assert done.status == "completed" and done.output_text == "pq"
    assert done.usage.output_tokens == 2
    evs = list(scripted.responses.retrieve(r.id, stream=True))
    assert [e.type for e in evs][-3:] == ["response.content_part.done",
                                          "response.output_item.done", "response.completed"]
    assert evs[-1].response.output_text == "pq"
    assert evs[2].item.id == done.output[0].id


def test_continuing_a_background_response(scripted, web):
    running = scripted.responses.create(model="synthetic", input=script("a", hang=True),
                                        background=True)
    with pytest.raises(openai.BadRequestError) as e:
        scripted.responses.create(model="synthetic", input=script("b"),
                                  previous_response_id=running.id)
    assert e.value.body["param"] == "previous_response_id"
    scripted.responses.cancel(running.id)
    first = scripted.responses.create(model="synthetic", input=script("one"), background=True)
    assert wait_for_job(web, first.id)["status"] == "completed"
    # Never retrieved: continuing it reads its job first.
    second = scripted.responses.create(model="synthetic", input=script("two"),
                                       previous_response_id=first.id)
    assert second.output_text == "two" and second.previous_response_id == first.id
    assert scripted.responses.retrieve(first.id).output_text == "one"


# -- the Batch API ---------------------------------------------------------------------------


def test_batch_of_responses(scripted, batch_worker):
    lines = [{"custom_id": "ok", "method": "POST", "url": "/v1/responses",
              "body": {"model": "synthetic", "input": script("hi", " there")}},
             {"custom_id": "bad", "method": "POST", "url": "/v1/responses",
              "body": {"model": "synthetic", "input": script("x"),
                       "tools": [{"type": "web_search"}]}}]
    out = batch_responses(scripted, lines, "/v1/responses")
    assert out["ok"]["status_code"] == 200
    body = out["ok"]["body"]
    assert body["object"] == "response" and body["status"] == "completed"
    assert body["output"][0]["content"][0]["text"] == "hi there"
    assert body["id"] == out["ok"]["request_id"]
    assert out["bad"]["status_code"] == 400
    assert out["bad"]["body"]["error"]["param"] == "tools[0].type"


# -- the OpenAI Agents SDK ---------------------------------------------------------------------


@pytest.mark.model
def test_agents_sdk_two_tool_agent(web, smollm2_worker):
    """The Agents SDK's default model (``OpenAIResponsesModel``) runs a two-tool agent over
    three model turns: a call to each tool, each output sent back as
    ``function_call_output``, then the answer. Which tool comes next is set by agent hooks
    (named ``tool_choice``, then ``none``), so the 135M model's choices cannot make the test
    flaky; the calls' arguments and the answer are the model's. ``openai-agents`` is in the
    test extra, so it is always there."""
    import agents

    agents.set_tracing_disabled(True)
    calls = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        calls.append(("get_weather", city))
        return f"It is sunny in {city}."

    @agents.function_tool
    def get_time(city: str) -> str:
        """The local time in a city."""
        calls.append(("get_time", city))
        return f"It is noon in {city}."

    class Steer(agents.AgentHooks):
        async def on_tool_end(self, context, agent, tool, result):
            following = "get_time" if tool.name == "get_weather" else "none"
            agent.model_settings = agent.model_settings.resolve(
                agents.ModelSettings(tool_choice=following))

    model = agents.OpenAIResponsesModel(model="smollm2", openai_client=openai.AsyncOpenAI(
        base_url=web.url + "/v1", api_key="unused", max_retries=0))
    agent = agents.Agent(name="helper", instructions="Use the tools, then answer briefly.",
                         tools=[get_weather, get_time], model=model, hooks=Steer(),
                         reset_tool_choice=False,
                         model_settings=agents.ModelSettings(tool_choice="get_weather",
                                                             temperature=0, max_tokens=40))
    result = agents.Runner.run_sync(agent, "Weather and time in Paris?", max_turns=4)
    assert [name for name, _ in calls] == ["get_weather", "get_time"]
    assert all(isinstance(city, str) and city for _, city in calls)
    assert [item.type for item in result.new_items] == [
        "tool_call_item", "tool_call_output_item", "tool_call_item", "tool_call_output_item",
        "message_output_item"]
    assert isinstance(result.final_output, str) and result.final_output
    assert len(result.raw_responses) == 3
