"""Tool calls end to end on the real CPU model (Ferry's JSON tool format, models/tools.py)."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

pytestmark = pytest.mark.model

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Get the local time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 40}},
                   "required": ["zone"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
# An earlier turn in which a tool was called and answered: the model sees both.
HISTORY = [
    {"role": "user", "content": "What is the weather in Rome?"},
    {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Rome", "unit": "celsius"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 20, "sky": "clear"}'},
    {"role": "assistant", "content": "It is 20 degrees and clear in Rome."},
]
KW = dict(model="smollm2", temperature=0, max_tokens=120)


def parameters(tool):
    return tool["function"]["parameters"]


def test_required_call_is_valid(chat):
    r = chat.chat.completions.create(messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                     **KW)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), parameters(tool))


def test_named_call(chat):
    r = chat.chat.completions.create(
        messages=ASK, tools=[WEATHER, TIME], **KW,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_time"
    jsonschema.validate(json.loads(call.function.arguments), parameters(TIME))


@pytest.mark.parametrize("temperature", [0.7, 1.5])
def test_calls_validate_when_sampling(chat, temperature):
    r = chat.chat.completions.create(messages=ASK, tools=[WEATHER], tool_choice="required",
                                     n=3, seed=5, **{**KW, "temperature": temperature})
    for c in r.choices:
        assert c.finish_reason == "tool_calls"
        jsonschema.validate(json.loads(c.message.tool_calls[0].function.arguments),
                            parameters(WEATHER))


def test_auto_lets_the_model_choose(chat):
    # After a conversation in which the tool was used, the model calls it again...
    r = chat.chat.completions.create(messages=HISTORY + ASK, tools=[WEATHER], **KW)
    assert r.choices[0].finish_reason == "tool_calls"
    (call,) = r.choices[0].message.tool_calls
    args = json.loads(call.function.arguments)
    assert call.function.name == "get_weather" and args["city"] == "Paris"
    # ...and where no tool helps, it answers in text ("auto" is the default choice).
    r = chat.chat.completions.create(messages=[{"role": "user", "content": "Say hello"}],
                                     tools=[WEATHER], tool_choice="auto", **KW)
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content


def test_none_never_calls(chat):
    r = chat.chat.completions.create(messages=HISTORY + ASK, tools=[WEATHER], tool_choice="none",
                                     **KW)
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].finish_reason in ("stop", "length")


def test_streamed_call_deltas(chat):
    kw = dict(messages=ASK, tools=[WEATHER], tool_choice="required", **KW)
    whole = chat.chat.completions.create(**kw).choices[0].message.tool_calls[0]
    deltas, finish = [], None
    for chunk in chat.chat.completions.create(stream=True, **kw):
        c = chunk.choices[0]
        deltas += c.delta.tool_calls or []
        finish = c.finish_reason or finish
    assert finish == "tool_calls"
    first, rest = deltas[0], deltas[1:]
    assert first.index == 0 and first.id.startswith("call_") and first.type == "function"
    assert first.function.name == "get_weather"
    assert len(rest) > 3 and all(d.id is None and d.function.name is None for d in rest)
    assert first.function.arguments + "".join(d.function.arguments for d in rest) == \
        whole.function.arguments


def test_stream_helper_accumulates_the_call(chat):
    with chat.chat.completions.stream(messages=ASK, tools=[WEATHER], tool_choice="required",
                                      **KW) as stream:
        final = stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls
    jsonschema.validate(json.loads(call.function.arguments), parameters(WEATHER))


def test_cut_off_call_is_length(chat):
    r = chat.chat.completions.create(messages=ASK, tools=[WEATHER], tool_choice="required",
                                     **{**KW, "max_tokens": 14})
    assert r.choices[0].finish_reason == "length"


@pytest.mark.parametrize("kw,param", [
    (dict(tool_choice="required"), "tool_choice"),
    (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}),
     "tool_choice"),
    (dict(tools=[{"type": "function", "function": {"name": "bad name!"}}]),
     "tools[0].function.name"),
    (dict(tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "not": {"required": ["a"]}}}}]),
     "tools[0].function.parameters"),
    (dict(tools=[{"type": "function", "function": {
        "name": "f", "parameters": {"type": "string"}}}]), "tools[0].function.parameters"),
    (dict(functions=[{"name": "f"}]), "functions"),
])
def test_tool_validation(chat, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        chat.chat.completions.create(messages=ASK, **{**KW, **kw})
    assert e.value.body["param"] == param


def test_bad_history_is_400(chat):
    bad = [dict(HISTORY[1], tool_calls=[{"id": "c", "type": "function",
                                         "function": {"name": "f", "arguments": "{oops"}}])]
    with pytest.raises(openai.BadRequestError) as e:
        chat.chat.completions.create(messages=ASK + bad + ASK, tools=[WEATHER], **KW)
    assert e.value.body["param"] == "messages[1].tool_calls[0].function.arguments"
    no_id = [{"role": "tool", "content": "20"}]
    with pytest.raises(openai.BadRequestError) as e:
        chat.chat.completions.create(messages=ASK + no_id, **KW)
    assert e.value.body["param"] == "messages[1].tool_call_id"
