"""response_format end to end on the real CPU model: output is grammar-constrained, so even a
135M-parameter model returns JSON that parses and validates."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from pydantic import BaseModel

pytestmark = pytest.mark.model


class FriendInfo(BaseModel):
    name: str
    age: int
    is_available: bool


class FriendList(BaseModel):
    friends: list[FriendInfo]


FRIENDS = [{"role": "user", "content": (
    "I have two friends. The first is Ollama 22 years old busy saving the world, and the "
    "second is Alonso 23 years old and wants to hang out. Return a list of friends in JSON "
    "format")}]

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer"},
        "pets": {"type": "array", "items": {"$ref": "#/$defs/pet"}, "maxItems": 2},
        "mood": {"enum": ["happy", "sad"]},
    },
    "required": ["name", "age", "pets", "mood"],
    "additionalProperties": False,
    "$defs": {"pet": {"type": "object",
                      "properties": {"kind": {"type": "string", "maxLength": 20}},
                      "required": ["kind"], "additionalProperties": False}},
}


def schema_format(schema, name="person"):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema,
                                                   "strict": True}}


def test_parse_returns_a_parsed_object(chat):
    r = chat.chat.completions.parse(model="smollm2", messages=FRIENDS, temperature=0,
                                    max_tokens=200, response_format=FriendList)
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, FriendList)
    assert FriendList.model_validate_json(choice.message.content) == choice.message.parsed


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_json_schema_output_validates(chat, temperature):
    # Every string and array in PERSON is bounded, so 400 tokens always suffice to finish.
    r = chat.chat.completions.create(
        model="smollm2", temperature=temperature, seed=3, max_tokens=400, n=2,
        messages=[{"role": "user", "content": "Describe a person."}],
        response_format=schema_format(PERSON))
    for c in r.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.message.content), PERSON)


def test_json_object_is_valid_json(chat):
    r = chat.chat.completions.create(
        model="smollm2", temperature=0, max_tokens=150,
        messages=[{"role": "user", "content": "Give me a JSON object describing a cat."}],
        response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:
        assert r.choices[0].message.content.startswith("{")


def test_json_schema_streamed(chat):
    kw = dict(model="smollm2", temperature=0, max_tokens=120,
              messages=[{"role": "user", "content": "Describe a person."}],
              response_format=schema_format(PERSON))
    whole = chat.chat.completions.create(**kw).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or ""
                       for c in chat.chat.completions.create(stream=True, **kw) if c.choices)
    assert streamed == whole
    jsonschema.validate(json.loads(streamed), PERSON)


def test_text_format_is_plain_text(chat):
    kw = dict(model="smollm2", temperature=0, max_tokens=8, messages=FRIENDS)
    plain = chat.chat.completions.create(**kw).choices[0].message.content
    text = chat.chat.completions.create(response_format={"type": "text"}, **kw)
    assert text.choices[0].message.content == plain


def test_cut_off_constrained_reply_is_length(chat):
    r = chat.chat.completions.create(model="smollm2", messages=FRIENDS, temperature=0,
                                     max_tokens=5, response_format=schema_format(PERSON))
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5
    with pytest.raises(openai.LengthFinishReasonError):
        chat.chat.completions.parse(model="smollm2", messages=FRIENDS, temperature=0,
                                    max_tokens=5, response_format=FriendList)


@pytest.mark.parametrize("schema,words", [
    ({"type": "object", "properties": {"n": {"type": "array", "uniqueItems": True}}},
     "'/properties/n/uniqueItems'"),
    ({"type": "object", "properties": {"n": {"type": "wizard"}}}, "Invalid JSON schema"),
    ({"type": "object", "not": {"required": ["a"]}}, "/not"),
])
def test_schemas_we_cannot_enforce_are_400(chat, schema, words):
    with pytest.raises(openai.BadRequestError) as e:
        chat.chat.completions.create(model="smollm2", messages=FRIENDS, max_tokens=5,
                                     response_format=schema_format(schema))
    assert e.value.body["param"] == "response_format.json_schema.schema"
    assert words in e.value.body["message"]


NUMBERS = {
    "type": "object",
    "properties": {
        "age": {"type": "integer", "minimum": 18, "maximum": 30},
        "score": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
        "dozen": {"type": "integer", "multipleOf": 12, "minimum": 100, "maximum": 999},
        "labels": {"type": "object", "patternProperties": {"^l[0-9]$": {"type": "boolean"}},
                   "additionalProperties": False, "minProperties": 1, "maxProperties": 2},
        "born": {"type": "string", "format": "date"},
    },
    "required": ["age", "score", "dozen", "labels", "born"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_numeric_and_property_count_keywords_are_enforced(chat, temperature):
    r = chat.chat.completions.create(
        model="smollm2", temperature=temperature, seed=5, max_tokens=300, n=2,
        messages=[{"role": "user", "content": "Describe a child of 5 with a score of 7."}],
        response_format=schema_format(NUMBERS, "numbers"))
    for c in r.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.message.content), NUMBERS,
                            format_checker=jsonschema.FormatChecker())


def test_a_schema_the_grammar_engine_refuses_is_400_naming_the_keyword(chat):
    # Accepted by the web; llguidance bounds the properties of a map only.
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "minProperties": 1}
    with pytest.raises(openai.BadRequestError) as e:
        chat.chat.completions.create(model="smollm2", messages=FRIENDS, max_tokens=5,
                                     response_format=schema_format(schema))
    assert e.value.body["param"] == "response_format"
    assert "min/maxProperties" in e.value.body["message"]


def test_bad_response_format_type_is_400(chat):
    with pytest.raises(openai.BadRequestError) as e:
        chat.chat.completions.create(model="smollm2", messages=FRIENDS, max_tokens=5,
                                     response_format={"type": "yaml"})
    assert e.value.body["param"] == "response_format"


def test_an_integer_without_bounds_stops_at_the_models_digit_limit():
    """In-process on the real model (the digit limit is a registry setting): asked to copy a
    22-digit number, SmolLM2 writes it all unless the grammar stops it."""
    from config import Registry, load_settings
    from config.contract.events import Delta
    from config.contract.job import GenerationJob, ResponseFormat, Sampling
    from models import load_backend

    entry = Registry(load_settings().models).resolve("smollm2")
    number = "1234567890123456789012"
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    job = GenerationJob(id="d", model="smollm2", max_tokens=60, sampling=Sampling(temperature=0),
                        messages=[{"role": "user", "content":
                                   f'Give the number {number} as JSON: {{"n": {number}}}'}],
                        response_format=ResponseFormat(type="json_schema", json_schema=schema))
    for digits in (15, 3):
        backend = load_backend(entry.model_copy(update={"max_integer_digits": digits}))
        try:
            text = "".join(e.text for e in backend.generate(job, lambda: False)
                           if isinstance(e, Delta))
        finally:
            backend.close()
        assert json.loads(text) == {"n": int(number[:digits])}
