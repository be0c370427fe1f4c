"""Pure logic of the request surface, below the backend interface and in the web layer:
shared by every backend (ChoiceWriter, tool-call parsing, constraints, logprobs)."""

from __future__ import annotations

import base64
import json
import math

import jsonschema
import numpy as np
import pytest

from config import load_settings
from config.errors import InvalidRequest
from config.contract import events
from models import constraints, logprobs, tools
from config.contract.events import Delta, Finish, ToolCallDelta
from config.contract.job import FunctionTool, GenerationJob, NamedToolChoice, ResponseFormat
from models.output import ChoiceWriter
from tasks.jobs.shapes import legacy_logprobs
from tasks.core.content import checked_image_url
from tasks.core.merge import MergedSubscription

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 16
CALL = '{"name": "get_weather", "arguments": {"city": "Par\\"is", "n": [1, {"a": "}"}]}}'


def feed(parser, text, sizes):
    out, i = [], 0
    for size in sizes:
        out += parser.feed(text[i:i + size])
        i += size
    return out + parser.finish()


@pytest.mark.parametrize("size", [1, 2, 3, 7, 100])
def test_call_parser_streams_name_then_arguments(size):
    parts = feed(tools.CallParser(text_allowed=False), CALL + " ", [size] * len(CALL))
    head, rest = parts[0], parts[1:]
    assert head.name == "get_weather" and head.id.startswith("call_") and head.arguments == ""
    args = "".join(p.arguments for p in rest)
    assert json.loads(args) == {"city": 'Par"is', "n": [1, {"a": "}"}]}
    assert all(p.id is None for p in rest)


def test_call_parser_text_when_allowed():
    parser = tools.CallParser(text_allowed=True)
    assert feed(parser, "Hello {there}", [3, 3, 100]) == ["Hel", "lo ", "{there}"]
    assert not parser.called


def test_call_parser_whitespace_layout():
    text = '{\n  "name": "f",\n  "arguments": {\n    "x": 1\n  }\n}\n'
    parts = feed(tools.CallParser(text_allowed=True), text, [4] * 20)
    assert parts[0].name == "f"
    assert json.loads("".join(p.arguments for p in parts[1:])) == {"x": 1}


def test_choice_writer_aligns_logprobs_with_released_text():
    w = ChoiceWriter(0, stops=["STOP"])
    lp = lambda t: {"token": t, "logprob": -1.0, "bytes": list(t.encode()), "top_logprobs": []}
    evs = w.add(b"Hi ", lp("Hi ")) + w.add(b"ST", lp("ST")) + w.add(b"OP", lp("OP"))
    assert w.stopped
    evs += w.finish("stop")
    deltas = [e for e in evs if isinstance(e, Delta)]
    assert "".join(d.text for d in deltas) == "Hi "
    assert sum(d.tokens for d in deltas) == 3
    assert [e["token"] for d in deltas for e in d.logprobs or ()] == ["Hi ", "ST", "OP"]
    assert evs[-1] == Finish(0, "stop", 3, stop_sequence="STOP")


def test_choice_writer_joins_split_utf8():
    w = ChoiceWriter(0, stops=[])
    snowman = "☃".encode()
    evs = w.add(snowman[:1]) + w.add(snowman[1:]) + w.finish("length")
    assert "".join(e.text for e in evs if isinstance(e, Delta)) == "☃"
    assert evs[-1].completion_tokens == 2


def test_choice_writer_drops_a_character_cut_by_the_end():
    # max_tokens ends the choice inside an emoji's bytes: the text stops before it, with no
    # U+FFFD, and the token is still counted.
    w = ChoiceWriter(0, stops=[])
    evs = w.add(b"ok ") + w.add("🙂".encode()[:2]) + w.finish("length")
    assert "".join(e.text for e in evs if isinstance(e, Delta)) == "ok "
    assert sum(e.tokens for e in evs if isinstance(e, Delta)) == 2
    assert evs[-1] == Finish(0, "length", 2, None)
    # Bytes that are never UTF-8 are still replaced where they stand.
    w = ChoiceWriter(0, stops=[])
    evs = w.add(b"a\xffb") + w.finish("stop")
    assert "".join(e.text for e in evs if isinstance(e, Delta)) == "a\ufffdb"


def test_choice_writer_tool_call_finish_reason():
    w = ChoiceWriter(0, stops=[], calls=tools.CallParser(text_allowed=False))
    evs = [e for piece in CALL for e in w.add(piece.encode())] + w.finish("stop")
    assert isinstance(evs[0], ToolCallDelta) and evs[0].name == "get_weather"
    assert evs[-1].finish_reason == "tool_calls"
    assert sum(e.tokens for e in evs if isinstance(e, (Delta, ToolCallDelta))) == len(CALL)
    assert not any(e.logprobs for e in evs if isinstance(e, Delta))


def test_logprob_entry():
    logits = np.array([1.0, 3.0, 2.0, 3.0])
    row = logprobs.log_softmax(logits)
    assert math.isclose(sum(math.exp(x) for x in row), 1.0)
    pieces = {0: b"a", 1: b"\xe2", 2: b"c", 3: b"d"}
    e = logprobs.entry(row, 2, 2, pieces.__getitem__)
    assert e["token"] == "c" and e["bytes"] == [99] and e["logprob"] == float(row[2])
    # Ties are broken as argmax does (lower id first); lone UTF-8 bytes are spelled \xNN.
    assert [t["token"] for t in e["top_logprobs"]] == ["\\xe2", "d"]
    assert logprobs.entry(None, 0, 3, pieces.__getitem__)["logprob"] is None


def test_legacy_logprobs_shape():
    entries = [{"token": "The", "logprob": None, "bytes": [], "top_logprobs": []},
               {"token": " sky", "logprob": -2.0, "bytes": [],
                "top_logprobs": [{"token": " sky", "logprob": -2.0, "bytes": []}]}]
    out = legacy_logprobs(entries, 5)
    assert out == {"tokens": ["The", " sky"], "token_logprobs": [None, -2.0],
                   "top_logprobs": [None, {" sky": -2.0}], "text_offset": [5, 8]}


def job(**kw):
    return GenerationJob(id="j", model="m", messages=[{"role": "user", "content": "hi"}], **kw)


def test_tool_call_schema_accepts_only_valid_calls():
    item = {"type": "object", "properties": {"v": {"type": "integer"}}, "required": ["v"]}
    a = FunctionTool(name="a", parameters={"type": "object", "properties": {
        "items": {"type": "array", "items": {"$ref": "#/$defs/Item"}}},
        "$defs": {"Item": item}, "required": ["items"]})
    b = FunctionTool(name="b", parameters={"type": "object", "properties": {
        "item": {"$ref": "#/$defs/Item"}}, "$defs": {"Item": {"type": "string"}},
        "required": ["item"]})
    c = constraints.for_job(job(tools=[a, b], tool_choice="required"))
    assert c.is_tool_call and not c.text_allowed
    jsonschema.validate({"name": "a", "arguments": {"items": [{"v": 1}]}}, c.schema)
    jsonschema.validate({"name": "b", "arguments": {"item": "x"}}, c.schema)
    # Each tool's "Item" keeps its own meaning.
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "b", "arguments": {"item": {"v": 1}}}, c.schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "c", "arguments": {}}, c.schema)
    named = constraints.for_job(job(tools=[a, b], tool_choice=NamedToolChoice(name="b")))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "a", "arguments": {"items": []}}, named.schema)
    assert constraints.for_job(job(tools=[a], tool_choice="none")) is None
    assert constraints.for_job(job(tools=[a])).text_allowed


def test_response_format_constraints():
    assert constraints.for_job(job()) is None
    assert constraints.for_job(job(response_format=ResponseFormat(type="json_object"))).schema \
        == {"type": "object"}
    tree = {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#"}}}}
    c = constraints.for_job(job(response_format=ResponseFormat(type="json_schema",
                                                               json_schema=tree)))
    jsonschema.validate({"kids": [{"kids": []}]}, c.schema)


@pytest.mark.parametrize("schema,ok", [
    ({"type": "object", "properties": {"a": {"type": "string", "format": "date"}}}, True),
    ({"anyOf": [{"type": "string", "pattern": "^a+$"}, {"type": "null"}]}, True),
    ({"type": "integer", "maximum": 3}, True),
    ({"type": "object", "properties": {"a": {"uniqueItems": True}}}, False),
    ({"$defs": {"x": {"multipleOf": 2}}, "$ref": "#/$defs/x"}, True),
    ({"$defs": {"x": {"not": {"const": 2}}}, "$ref": "#/$defs/x"}, False),
    ({"type": "object", "patternProperties": {"^a": {"contains": {}}}}, False),
    ({"type": "integer", "multipleOf": 0}, False),
    ({"type": "object", "patternProperties": {"^a{0,5000}$": {}}}, False),
    ({"type": "nonsense"}, False),
    ([], False),
    # Bounded (constraints.SchemaLimits): repetitions, patterns' counted repetitions
    # (nested ones multiplied) and nesting through $ref chains.
    ({"type": "string", "maxLength": 1000, "pattern": "^a{0,1000}$"}, True),
    ({"type": "string", "maxLength": 1001}, False),
    ({"type": "array", "minItems": 10**6}, False),
    ({"type": "string", "pattern": "^(a{0,100}){0,100}$"}, False),
    ({"type": "string", "pattern": "^a{,5000}$"}, False),
    ({"type": "object", "properties": {f"p{i}": {"maxLength": 1000} for i in range(10)}}, True),
    ({"type": "object", "properties": {f"p{i}": {"maxLength": 1000} for i in range(11)}}, False),
    # A definition counts once per reference string, not once per use.
    ({"$defs": {"s": {"maxLength": 1000}},
      "properties": {f"p{i}": {"$ref": "#/$defs/s"} for i in range(30)}}, True),
    ({"$defs": {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(40)}, "$ref": "#/$defs/d0"},
     False),
])
def test_check_schema(schema, ok):
    if ok:
        constraints.check_schema(schema, "p")
    else:
        with pytest.raises(InvalidRequest) as e:
            constraints.check_schema(schema, "p")
        assert e.value.param == "p"


def test_grammar_compiles_for_llguidance():
    llguidance = pytest.importorskip("llguidance", reason="llguidance is not installed")
    from models.guidance import grammar_text

    c = constraints.for_job(job(tools=[FunctionTool(name="f")]))
    grammar = grammar_text(c)
    assert "start: call | free_text" in grammar and "free_text: /[^{ " in grammar
    assert llguidance.LLMatcher.validate_grammar(grammar) == ""


def test_prepare_messages_writes_calls_for_plain_templates():
    history = [{"role": "system", "content": "Be brief."},
               {"role": "assistant", "content": "", "tool_calls": [
                   {"id": "c1", "type": "function",
                    "function": {"name": "f", "arguments": {"x": 1}}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "2"}]
    out = tools.prepare_messages(history, [FunctionTool(name="f")], "auto", False)
    assert out[0]["content"].startswith("Be brief.\n\nYou can call these tools:")
    assert json.loads(out[1]["content"]) == {"name": "f", "arguments": {"x": 1}}
    assert "tool_calls" not in out[1] and out[2] == history[2]
    kept = tools.prepare_messages(history, [], "auto", True)
    assert kept == history


def test_image_urls():
    s = load_settings()
    data = "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert checked_image_url(data, s, "p") == data
    assert checked_image_url("https://example.com/a.png", s, "p") == "https://example.com/a.png"
    assert checked_image_url(base64.b64encode(PNG).decode(), s, "p") == data
    for bad in ("data:image/jpeg;base64," + base64.b64encode(PNG).decode(),
                "data:image/png;base64,@@@", "data:text/plain,hi", "ftp://example.com/a.png",
                "http:///nohost", "not an image"):
        with pytest.raises(InvalidRequest) as e:
            checked_image_url(bad, s, "messages[0].content[1].image_url.url")
        assert e.value.param == "messages[0].content[1].image_url.url"


class ScriptedSubscription:
    def __init__(self, job_id, evs):
        self.job_id, self.evs, self.finished, self.cancelled = job_id, list(evs), False, False

    def next(self, timeout=None):
        ev = self.evs.pop(0)
        self.finished = isinstance(ev, events.TERMINAL)
        return ev

    def cancel(self):
        self.cancelled = True

    def close(self):
        pass


def test_merged_subscription_is_prompt_major():
    def script(text, prompt_tokens):
        return [events.Started("w", prompt_tokens), Delta(0, text), Delta(1, text),
                Finish(0, "stop", 1), Finish(1, "stop", 1), events.Done(prompt_tokens, 2)]

    subs = [ScriptedSubscription("r-0", script("a", 3)), ScriptedSubscription("r-1", script("b", 4))]
    merged = MergedSubscription("r", subs, per_prompt=2)
    out = []
    while not out or not isinstance(out[-1], events.Done):
        out.append(merged.next())
    assert sum(isinstance(e, events.Started) for e in out) == 1
    assert [(e.index, e.text) for e in out if isinstance(e, Delta)] == \
        [(0, "a"), (1, "a"), (2, "b"), (3, "b")]
    assert out[-1] == events.Done(7, 4, evaluated_tokens=7)  # usage summed over the prompts


def test_merged_subscription_cancels_the_rest_on_failure():
    failed = events.Failed(400, {"message": "m", "type": "t", "param": None, "code": None})
    subs = [ScriptedSubscription("r-0", [failed]), ScriptedSubscription("r-1", [])]
    merged = MergedSubscription("r", subs, per_prompt=1)
    assert merged.next() == failed
    merged.close()
    assert not subs[0].cancelled and subs[1].cancelled


def test_new_events_roundtrip():
    lp = {"token": "a", "logprob": -0.5, "bytes": [97],
          "top_logprobs": [{"token": "a", "logprob": -0.5, "bytes": [97]}]}
    evs = [Delta(0, "a", 1, [lp], prompt=True), ToolCallDelta(1, 0, "", "call_x", "f", 3)]
    assert events.decode(events.encode(0, evs))[1] == evs


# A template in the style of Hermes / Qwen 2.5: tools listed in the system turn, calls
# written between <tool_call> tags (our own minimal rendering of that convention).
TAGGED_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:\n{% for t in tools %}{{ t | tojson }}\n"
    "{% endfor %}Call one as <tool_call>\n{\"name\": ..., \"arguments\": ...}\n</tool_call>"
    "<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>\n{{ {'name': c.function.name, "
    "'arguments': c.function.arguments} | tojson }}\n</tool_call>{% endfor %}<|im_end|>\n"
    "{% endfor %}<|im_start|>assistant\n")


def test_tagged_tool_format_is_the_templates_own():
    from models.templates import ChatTemplate

    t = ChatTemplate(TAGGED_TEMPLATE)
    assert t.tool_format == tools.TAGGED and t.renders_tool_calls
    assert ChatTemplate("{{ messages }}").tool_format == tools.FERRY
    history = [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]}]
    msgs = tools.prepare_messages(history, [FunctionTool(name="f")], "auto", True, t.tool_format)
    assert msgs == history  # no instructions of ours: the template describes the tools
    text = t.render(msgs, tools=tools.template_tools([FunctionTool(name="f")]))
    assert '"name": "f"' in text and '<tool_call>\n{"name": "f", "arguments": {"x": 1}}' in text
    parts = feed(tools.CallParser(True, tools.TAGGED),
                 '<tool_call>\n{"name": "f", "arguments": {"x": 2}}\n</tool_call>', [3] * 30)
    assert parts[0].name == "f" and "".join(p.arguments for p in parts[1:]) == '{"x": 2}'


def test_tagged_grammar():
    llguidance = pytest.importorskip("llguidance", reason="llguidance is not installed")
    from models.guidance import grammar_text

    c = constraints.for_job(job(tools=[FunctionTool(name="f")]), tools.TAGGED)
    grammar = grammar_text(c)
    assert 'start: "<tool_call>\\n" call "\\n</tool_call>" | free_text' in grammar
    assert "free_text: /[^< " in grammar
    assert llguidance.LLMatcher.validate_grammar(grammar) == ""
