"""ExLlamaV2 constraints below the GPU line: job -> Constraint -> prepared schemas -> formatron
builder calls, the real formatron grammar over a toy vocabulary, and Ferry's grammar filter
(stop tokens held off, tool_choice auto) as exllamav2 0.3.2's sampler drives it."""

from __future__ import annotations

import json

import pytest
import torch

from config.errors import InvalidRequest
from models import constraints, tools
from models.exllamav2.grammar import (DIALECT, SCHEMA_ID, FirstTokens, Grammar, build_formatter,
                                      grammar_for, prepare_schema, split_alternatives)
from config.contract.job import FunctionTool, GenerationJob, NamedToolChoice, ResponseFormat
from tests.exl2_doubles import FormatterFilterDouble, GrammarFilterDouble

formatron = pytest.importorskip("formatron", reason="formatron is not installed (test extra)")
kbnf = pytest.importorskip("kbnf", reason="kbnf is not installed (test extra)")

WEATHER = FunctionTool(name="get_weather", parameters={
    "type": "object", "description": "where", "properties": {
        "city": {"type": "string", "description": "a city"},
        "unit": {"enum": ["c", "f"]}},
    "required": ["city"]})
TIME = FunctionTool(name="get_time", parameters={"type": "object", "properties": {}})


def job(**kw) -> GenerationJob:
    return GenerationJob(id="g", model="m", messages=[{"role": "user", "content": "x"}], **kw)


def grammar(fmt=tools.FERRY, **kw) -> Grammar:
    return grammar_for(constraints.for_job(job(**kw), fmt))


# --- schema preparation ---------------------------------------------------------------------

def test_schema_gets_id_and_dialect_loses_annotations_and_writes_every_property():
    s = prepare_schema({"type": "object", "title": "T", "description": "d",
                        "properties": {"a": {"type": "integer", "default": 1},
                                       "b": {"type": "string", "examples": ["x"]}},
                        "required": ["a"], "additionalProperties": False}, "response_format")
    assert s == {"$id": SCHEMA_ID, "$schema": DIALECT, "type": "object",
                 "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
                 "required": ["a", "b"]}


def test_nested_objects_and_defs_are_prepared_too():
    s = prepare_schema({"type": "array", "items": {"$ref": "#/$defs/P"},
                        "$defs": {"P": {"type": "object", "title": "P",
                                        "properties": {"n": {"anyOf": [{"type": "string"},
                                                                       {"type": "null"}],
                                                             "description": "name"}}}}}, "p")
    assert s["$defs"]["P"] == {"type": "object", "required": ["n"], "properties": {
        "n": {"anyOf": [{"type": "string"}, {"type": "null"}]}}}


@pytest.mark.parametrize("schema,where", [
    ({"type": "object", "properties": {"a": {"oneOf": [{"type": "string"}]}}}, "/properties/a/oneOf"),
    ({"type": "object", "allOf": [{"type": "object"}]}, "/allOf"),
    ({"type": "object", "properties": {"a": {"type": "string", "anyOf": [{"minLength": 1}]}}},
     "/properties/a"),
    ({"type": "object", "additionalProperties": {"type": "integer"}}, "/additionalProperties"),
    # Accepted by the web for the CPU backend's llguidance; formatron would ignore them.
    ({"type": "object", "properties": {"a": {"type": "integer", "minimum": 1}}},
     "/properties/a/minimum"),
    ({"type": "object", "properties": {"a": {"type": "number", "multipleOf": 2}}},
     "/properties/a/multipleOf"),
    ({"type": "object", "patternProperties": {"^a": {"type": "integer"}}}, "/patternProperties"),
    ({"type": "array", "items": {"type": "object", "maxProperties": 1}}, "/items/maxProperties"),
])
def test_what_formatron_would_not_enforce_is_refused(schema, where):
    with pytest.raises(InvalidRequest) as e:
        prepare_schema(schema, "response_format")
    assert e.value.param == "response_format" and f"'{where}'" in e.value.message


def test_top_level_must_be_an_object_or_array():
    for schema in ({"type": "string"}, {"enum": [1, 2]}, {"type": ["object", "null"]}):
        with pytest.raises(InvalidRequest, match="top level") as e:
            prepare_schema(schema, "response_format")
        assert e.value.param == "response_format"
    assert prepare_schema({"type": ["object", "array"]}, "p")["type"] == ["object", "array"]


def test_json_modes_and_tool_calls_become_grammars():
    assert grammar_for(constraints.for_job(job(), tools.FERRY)) is None
    g = grammar(response_format=ResponseFormat(type="json_object"))
    assert [json.loads(a)["type"] for a in g.alternatives] == ["object"]
    assert (g.text_allowed, g.is_tool_call, g.param) == (False, False, "response_format")
    g = grammar(tools=[WEATHER, TIME], tool_choice="required")
    names = [json.loads(a)["properties"]["name"]["const"] for a in g.alternatives]
    assert names == ["get_weather", "get_time"] and g.param == "tools" and not g.text_allowed
    alt = json.loads(g.alternatives[0])
    assert list(alt["properties"]) == ["name", "arguments"]  # name streams first
    assert alt["properties"]["arguments"]["required"] == ["city", "unit"]
    g = grammar(tools=[WEATHER, TIME], tool_choice=NamedToolChoice(name="get_time"))
    assert len(g.alternatives) == 1
    g = grammar(tools=[WEATHER], tool_choice="auto", fmt=tools.TAGGED)
    assert g.text_allowed and (g.open, g.close, g.first) == (tools.TAGGED.open, tools.TAGGED.close, "<")
    assert grammar(tools=[WEATHER], tool_choice="none") is None


def test_a_top_level_anyof_is_split_with_its_definitions():
    root = {"anyOf": [{"$ref": "#/$defs/a"}, {"type": "array"}], "$defs": {"a": {"type": "object"}},
            "description": "either"}
    assert split_alternatives(root) == [{"$ref": "#/$defs/a", "$defs": {"a": {"type": "object"}}},
                                        {"type": "array", "$defs": {"a": {"type": "object"}}}]
    assert split_alternatives({"type": "object", "anyOf": []}) == [{"type": "object", "anyOf": []}]


# --- builder calls -----------------------------------------------------------------------------

class RecordingBuilder:
    """FormatterBuilder's surface, recording calls (formatron's own is used below)."""

    def __init__(self):
        self.calls = []

    def json(self, schema):
        self.calls.append(("json", schema))
        return f"${{json{len(self.calls)}}}"

    def choose(self, *parts):
        self.calls.append(("choose", parts))
        return "${choice}"

    def append_str(self, text):
        self.calls.append(("append_str", text))

    def build(self, vocabulary, decode):
        self.calls.append(("build", vocabulary, decode))
        return "formatter"


def test_builder_calls_one_json_per_alternative_choose_and_the_literals():
    created = []

    def create_schema(s):
        created.append(s)
        return f"schema{len(created)}"

    b = RecordingBuilder()
    decode = lambda ids: ""  # noqa: E731
    g = grammar(tools=[WEATHER, TIME], tool_choice="required", fmt=tools.TAGGED)
    assert build_formatter(g, "vocab", decode, b, create_schema) == "formatter"
    assert [c["$id"] for c in created] == [SCHEMA_ID, SCHEMA_ID]
    assert b.calls == [("json", "schema1"), ("json", "schema2"),
                       ("choose", ("${json1}", "${json2}")),
                       ("append_str", "<tool_call>\n${choice}\n</tool_call>"),
                       ("build", "vocab", decode)]
    b = RecordingBuilder()
    build_formatter(grammar(response_format=ResponseFormat(type="json_object")), "v", decode, b,
                    create_schema)
    assert [c[0] for c in b.calls] == ["json", "append_str", "build"] and b.calls[1][1] == "${json1}"


def test_formatron_errors_are_400s_naming_the_parameter():
    def create_schema(s):
        raise ValueError("Duplicate keys in schema referenced by type")

    with pytest.raises(InvalidRequest, match="Duplicate keys") as e:
        build_formatter(grammar(tools=[WEATHER], tool_choice="required"), None, None,
                        RecordingBuilder(), create_schema)
    assert e.value.param == "tools"


# --- the real formatron grammar ------------------------------------------------------------------

# A character vocabulary with a few longer pieces, control tokens first (as real ones are
# somewhere): ids 0 and 1 stand for end-of-text and end-of-turn.
PIECES = ["<|endoftext|>", "<|im_end|>", *map(chr, range(32, 127)), "\n", '{"', '":', "get_",
          "<tool_call>", "</tool_call>"]
EOS, EOT = 0, 1


def vocabulary():
    return kbnf.Vocabulary({i: kbnf.Token(p.encode()) for i, p in enumerate(PIECES)},
                           dict(enumerate(PIECES)))


def formatter(g: Grammar):
    return build_formatter(g, vocabulary(), lambda ids: "".join(PIECES[i] for i in ids))


def tokens(text: str) -> list[int]:
    """Greedy longest-piece tokenisation over PIECES."""
    out, i = [], 0
    while i < len(text):
        best = max((p for p in PIECES[2:] if text.startswith(p, i)), key=len)
        out.append(PIECES.index(best))
        i += len(best)
    return out


def accepts(f, text: str) -> bool:
    f.reset()
    try:
        for t in tokens(text):
            f.accept_token(t)
    except ValueError:
        return False
    return f.is_completed()


def test_formatron_grammar_accepts_valid_calls_only():
    f = formatter(grammar(tools=[WEATHER, TIME], tool_choice="required"))
    assert accepts(f, '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}')
    assert accepts(f, '\n{"name":"get_time","arguments":{}}')
    assert not accepts(f, '{"name": "get_wether", "arguments": {}}')
    assert not accepts(f, '{"name": "get_weather", "arguments": {"city": "Oslo"}}')  # unit: all written
    assert not accepts(f, '{"name": "get_weather", "arguments": {"city": 3, "unit": "c"}}')
    assert not accepts(f, 'Sure! {"name": "get_time", "arguments": {}}')


def test_formatron_grammar_with_tags_and_json_schema():
    f = formatter(grammar(tools=[TIME], tool_choice="required", fmt=tools.TAGGED))
    assert accepts(f, '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
    assert not accepts(f, '{"name": "get_time", "arguments": {}}')
    f = formatter(grammar(response_format=ResponseFormat(type="json_schema", json_schema={
        "type": "object", "properties": {"n": {"type": "integer"},
                                         "tags": {"type": "array", "items": {"type": "string"},
                                                  "maxItems": 2}}})))
    assert accepts(f, '{"n": 3, "tags": ["a", "b"]}')
    assert not accepts(f, '{"n": 3, "tags": ["a", "b", "c"]}')
    assert not accepts(f, '{"n": 3.5, "tags": []}')


# --- Ferry's grammar filter -------------------------------------------------------------------

def new_filter(g: Grammar, first: FirstTokens | None = None):
    tokenizer = type("Tok", (), {"eos_token_id": EOS})()
    inner = FormatterFilterDouble(tokenizer, formatter(g))
    return GrammarFilterDouble(None, tokenizer, inner, [EOS, EOT], first)


def feed_text(f, text):
    for t in tokens(text):
        f.feed(torch.tensor([[t]]))


def test_stop_tokens_are_refused_until_the_grammar_is_complete():
    g = grammar(response_format=ResponseFormat(type="json_object"))
    f = new_filter(g)
    f.begin("")
    feed_text(f, '{"a": "x')
    assert f.can_mask_logits() and f.prepare_logit_mask() is True
    # Inside a string the end-of-turn token's text is valid JSON to formatron: refused here.
    assert f.inner._formatter.mask_logits(torch.zeros(len(PIECES)))[EOT] == 0
    masked = f.mask_logits(torch.zeros(len(PIECES)))
    assert masked[EOT] == masked[EOS] == float("-inf") and masked[PIECES.index("y")] == 0
    allowed, _ = f.next()
    assert EOT not in allowed and EOS not in allowed
    feed_text(f, '"}')
    assert f.is_completed() and f.prepare_logit_mask() is True
    masked = f.mask_logits(torch.zeros(len(PIECES)))
    assert masked[EOS] == 0 and torch.isinf(masked).sum() == len(PIECES) - 1  # EOS only
    assert f.next() == ([EOS], [EOS])


def test_auto_tool_choice_first_token_decides_call_or_text():
    g = grammar(tools=[TIME], tool_choice="auto")
    first = FirstTokens.of(PIECES, g.first, [EOS, EOT])
    f = new_filter(g, first)
    f.begin("")
    assert not f.can_mask_logits()  # the first step lists allowed tokens
    allowed, end = f.next()
    assert PIECES.index("{") in allowed and PIECES.index('{"') in allowed
    assert PIECES.index("H") in allowed and end == []
    for refused in (EOS, EOT, PIECES.index(" "), PIECES.index("\n")):
        assert refused not in allowed  # no stop token (filter_prefer_eos would take it)
    f.feed(torch.tensor([[PIECES.index("H")]]))
    assert f.mode == "text" and f.next() == (None, None)
    assert not f.can_mask_logits() and not f.use_background_worker()
    # The same filter begun again (a new job would get a new one; begin resets it all).
    f.begin("")
    feed_text(f, '{"name": "get_time", "arguments": {}}')
    assert f.mode == "call" and f.can_mask_logits() and f.is_completed()


def test_first_tokens_sets():
    first = FirstTokens.of(["{", ' {"', "  ", "Hi", " Hi", "<|im_end|>", "{x"], "{", [5])
    assert first.call == {0, 6} and first.text == (3, 4)
