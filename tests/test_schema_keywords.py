"""Every JSON schema keyword we accept is enforced by the grammar, and the README lists
exactly those (``models.constraints.ASSERTIONS``); keywords llguidance cannot enforce are a
400 naming the keyword. Runs llguidance against SmolLM2's real vocabulary (no services),
through each backend's compile path: the CPU backend's (``models.guidance`` with the
llguidance tokenizer of llama.cpp's vocabulary, as ``LlamaEngine.compile_grammar``) and
ExLlamaV2's (``ExLlamaV2Backend._grammar`` with its tokenizer from the model directory's
tokenizer.json, the engine a test double): both accept and refuse the same schemas."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

from config.errors import GenerationFailed, InvalidRequest
from models import constraints
from config.settings import ModelEntry
from models.constraints import ASSERTIONS, Constraint
from tests import exl2_model_dirs as dirs

llguidance = pytest.importorskip("llguidance")
llama_cpp = pytest.importorskip("llama_cpp")
from models import guidance  # noqa: E402  (needs llguidance)

README = Path(__file__).resolve().parents[1] / "README.md"
OBJ = {"type": "object"}

# keyword -> (a schema using it, JSON that validates, JSON that does not)
CASES = {
    "type": ({"type": "integer"}, "3", '"3"'),
    "properties": ({"type": "object", "properties": {"a": {"type": "integer"}}},
                   '{"a": 1}', '{"a": "x"}'),
    "required": ({"type": "object", "properties": {"a": {"type": "integer"}},
                  "required": ["a"]}, '{"a": 1}', "{}"),
    "additionalProperties": ({"type": "object", "additionalProperties": {"type": "integer"}},
                             '{"a": 1}', '{"a": true}'),
    "patternProperties": ({"type": "object", "patternProperties": {"^x": {"type": "integer"}},
                           "additionalProperties": False}, '{"x1": 1}', '{"y": 1}'),
    "minProperties": ({"type": "object", "additionalProperties": {"type": "integer"},
                       "minProperties": 1}, '{"a": 1}', "{}"),
    "maxProperties": ({"type": "object", "additionalProperties": {"type": "integer"},
                       "maxProperties": 1}, '{"a": 1}', '{"a": 1, "b": 2}'),
    "items": ({"type": "array", "items": {"type": "integer"}}, "[1, 2]", '[1, "2"]'),
    "prefixItems": ({"type": "array", "prefixItems": [{"type": "string"}]}, '["a", 2]', "[2]"),
    "minItems": ({"type": "array", "minItems": 2}, "[1, 2]", "[1]"),
    "maxItems": ({"type": "array", "maxItems": 1}, "[1]", "[1, 2]"),
    "enum": ({"enum": ["red", 2]}, '"red"', '"blue"'),
    "const": ({"const": {"a": 1}}, '{"a": 1}', '{"a": 2}'),
    "anyOf": ({"anyOf": [{"type": "integer"}, {"type": "boolean"}]}, "true", '"x"'),
    "oneOf": ({"oneOf": [{"type": "integer"}, {"type": "string"}]}, '"x"', "true"),
    "allOf": ({"allOf": [{"type": "integer"}, {"minimum": 2}]}, "2", "1"),
    "$ref": ({"$ref": "#/$defs/n", "$defs": {"n": {"type": "integer"}}}, "1", '"1"'),
    "pattern": ({"type": "string", "pattern": "^[0-9]{3}$"}, '"123"', '"12a"'),
    "minLength": ({"type": "string", "minLength": 2}, '"ab"', '"a"'),
    "maxLength": ({"type": "string", "maxLength": 2}, '"ab"', '"abc"'),
    "minimum": ({"type": "integer", "minimum": 3}, "3", "2"),
    "maximum": ({"type": "number", "maximum": 3}, "2.5", "3.5"),
    "exclusiveMinimum": ({"type": "integer", "exclusiveMinimum": 3}, "4", "3"),
    "exclusiveMaximum": ({"type": "number", "exclusiveMaximum": 3}, "2.99", "3"),
    "multipleOf": ({"type": "integer", "multipleOf": 5}, "15", "12"),
}
# Refused by the web before anything compiles, and by llguidance too.
UNENFORCEABLE = {
    "uniqueItems": {"type": "array", "uniqueItems": True},
    "not": {"not": {"type": "string"}},
    "contains": {"type": "array", "contains": {"type": "integer"}},
    "propertyNames": {"type": "object", "propertyNames": {"pattern": "^a"}},
    "dependentRequired": {"type": "object", "dependentRequired": {"a": ["b"]}},
    "if": {"if": {"type": "string"}, "then": {"minLength": 2}},
    "unevaluatedProperties": {"type": "object", "unevaluatedProperties": False},
}


class Compiler:
    """One backend's compile path: ``compile(constraint)`` -> ``guidance.Grammar`` (or the
    400), and the llguidance tokenizer it compiles for."""

    def __init__(self, compile, tokenizer):
        self.compile, self.tokenizer = compile, tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size


def _param(c: Constraint) -> str:
    return "tools" if c.is_tool_call else "response_format"


@pytest.fixture(scope="module", params=["llama.cpp", "exllamav2"])
def tokenizer(request, tmp_path_factory):
    gguf = dirs.smollm2_gguf()
    if gguf is None:
        pytest.skip("the SmolLM2 weights package is not installed")
    if request.param == "llama.cpp":
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), params)
        vocab = llama_cpp.llama_model_get_vocab(model)
        eog = [t for t in range(llama_cpp.llama_vocab_n_tokens(vocab))
               if llama_cpp.llama_vocab_is_eog(vocab, t)]
        tok = guidance.tokenizer_from_llama(vocab, eog)
        yield Compiler(lambda c: guidance.compile_grammar(c, tok, tok.vocab_size, _param(c)), tok)
        llama_cpp.llama_model_free(model)
        return
    from models.exllamav2.backend import ExLlamaV2Backend
    from tests.exl2_doubles import HFEngineDouble

    path = dirs.smollm2(tmp_path_factory.mktemp("smollm2"), gguf)
    backend = ExLlamaV2Backend(ModelEntry(name="smol", backend="exllamav2", weights=str(path)),
                               engine=HFEngineDouble(path, lambda job: []))
    yield Compiler(backend._grammar, backend.grammar_tokenizer)
    backend.close()


def compile_grammar(tokenizer: Compiler, constraint: Constraint) -> guidance.Grammar:
    return tokenizer.compile(constraint)


def matches(tokenizer, constraint: Constraint, text: str) -> bool:
    """Whether the compiled grammar lets the reply ``text`` be generated in full."""
    m = compile_grammar(tokenizer, constraint).mask().matcher
    tokens = tokenizer.tokenizer.tokenize_str(text)
    return m.try_consume_tokens(tokens) == len(tokens) and m.is_accepting()


def test_every_accepted_keyword_has_a_case():
    assert set(CASES) == ASSERTIONS


@pytest.mark.parametrize("keyword", sorted(CASES))
def test_accepted_keywords_are_enforced(tokenizer, keyword):
    schema, good, bad = CASES[keyword]
    constraints.check_schema(schema, "p")
    jsonschema.validate(json.loads(good), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(json.loads(bad), schema)
    assert matches(tokenizer, Constraint(schema), good)
    assert not matches(tokenizer, Constraint(schema), bad)


@pytest.mark.parametrize("keyword", sorted(UNENFORCEABLE))
def test_unenforceable_keywords_are_refused_by_name(tokenizer, keyword):
    schema = UNENFORCEABLE[keyword]
    with pytest.raises(InvalidRequest) as e:
        constraints.check_schema(schema, "p")
    assert f"'/{keyword}'" in e.value.message
    with pytest.raises(InvalidRequest) as e:
        compile_grammar(tokenizer, Constraint(schema))
    assert keyword in e.value.message


def test_readme_lists_the_accepted_keywords():
    text = " ".join(README.read_text().split())
    listed = re.search(r"Supported keywords \(enforced\): (.*?)\.", text).group(1)
    assert set(re.findall(r"`([^`]+)`", listed)) == ASSERTIONS


def test_a_refusal_of_llguidance_is_a_400_naming_the_keyword(tokenizer):
    # minProperties beside an optional declared property: llguidance cannot enforce it.
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "minProperties": 1}
    constraints.check_schema(schema, "p")
    with pytest.raises(InvalidRequest) as e:
        compile_grammar(tokenizer, Constraint(schema))
    assert e.value.param == "response_format" and "min/maxProperties" in e.value.message


def test_known_formats_are_enforced_and_others_are_annotations(tokenizer):
    date = Constraint({"type": "string", "format": "date"})
    assert matches(tokenizer, date, '"2024-02-29"')
    assert not matches(tokenizer, date, '"2024-13-01"')
    other = Constraint({"type": "string", "format": "color", "const": {"format": "x"}})
    assert guidance._prepare(other.schema, 15) == {"type": "string", "const": {"format": "x"}}
    assert matches(tokenizer, Constraint({"type": "string", "format": "color"}), '"red"')


def test_blank_space_is_bounded(tokenizer):
    assert matches(tokenizer, Constraint(OBJ), '{\n  "a": [1, 2]\n}')
    assert matches(tokenizer, Constraint(OBJ), '{"a":1}')
    assert not matches(tokenizer, Constraint(OBJ), '{"a":  1}')
    assert not matches(tokenizer, Constraint(OBJ), "{\n" + " " * 21 + '"a": 1}')


@pytest.mark.parametrize("open_,close,first", [("", "", "{"),
                                               ("<tool_call>\n", "\n</tool_call>", "<")])
def test_auto_tool_choice_is_a_call_or_text_not_opening_like_one(tokenizer, open_, close,
                                                                 first):
    c = Constraint({"type": "object", "properties": {"name": {"const": "f"}},
                    "required": ["name"], "additionalProperties": False},
                   text_allowed=True, is_tool_call=True, open=open_, close=close)
    assert matches(tokenizer, c, f'{open_}{{"name": "f"}}{close}')
    assert not matches(tokenizer, c, f'{open_}{{"name": "g"}}{close}')
    assert matches(tokenizer, c, "Hello.\nNo tool is needed.")
    assert not matches(tokenizer, c, f"{first}x")
    assert not matches(tokenizer, c, " leading space")
    required = Constraint(c.schema, is_tool_call=True, open=open_, close=close)
    assert not matches(tokenizer, required, "Hello.")


def test_a_matcher_in_error_fails_the_choice_instead_of_ending_it(tokenizer):
    # In error, llguidance's mask allows only the end tokens: the reply would end half
    # written, with finish_reason "stop".
    mask = compile_grammar(tokenizer, Constraint(OBJ)).mask()
    with pytest.raises(GenerationFailed):
        mask.accept(tokenizer.tokenizer.tokenize_str("hello")[0])
    with pytest.raises(GenerationFailed):
        mask.compute()


# --- integers without bounds --------------------------------------------------------------------

def digits(n: int) -> str:
    return "1" + "0" * (n - 1)


@pytest.mark.parametrize("schema", [
    {"type": "integer"},
    {"type": ["integer", "null"]},
    {"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 5}},
     "required": ["n"]},
    {"type": "array", "items": {"$ref": "#/$defs/n"}, "$defs": {"n": {"type": "integer"}}},
])
def test_an_integer_without_bounds_has_at_most_15_digits(tokenizer, schema):
    def fits(number: str) -> bool:
        if schema["type"] == "object":
            return matches(tokenizer, Constraint(schema), f'{{"n": {number}}}')
        if schema["type"] == "array":
            return matches(tokenizer, Constraint(schema), f"[{number}]")
        return matches(tokenizer, Constraint(schema), number)

    assert fits(digits(15)) and fits("-" + digits(15)) and fits("0")
    assert not fits(digits(16)) and not fits("-" + digits(16))


def test_one_bound_keeps_the_other_side_bounded(tokenizer):
    def fits(schema, number: str) -> bool:
        return matches(tokenizer, Constraint(schema), number)

    low = {"type": "integer", "minimum": 0}
    assert fits(low, "9" * 15) and not fits(low, digits(16)) and not fits(low, "-1")
    high = {"type": "integer", "exclusiveMaximum": 10}
    assert fits(high, "9") and fits(high, "-" + "9" * 15) and not fits(high, "10")
    # A bound with more digits than the limit widens the other side to as many.
    big = {"type": "integer", "minimum": 10 ** 16}
    assert fits(big, str(10 ** 16 + 7)) and fits(big, "9" * 17) and not fits(big, "2" + "0" * 17)
    # ...within llguidance's 64-bit numbers (whose bounds it compares as doubles, so the
    # last digits of the edge are not exact).
    huge = {"type": "integer", "minimum": 10 ** 18}
    assert fits(huge, str(10 ** 18 + 5)) and not fits(huge, digits(20))
    both = {"type": "integer", "minimum": 0, "maximum": 10 ** 18}
    assert fits(both, str(10 ** 18))  # explicit bounds are the schema's own


def test_the_digit_limit_is_the_callers():
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    assert guidance._prepare(schema, 3)["properties"]["n"] == {
        "type": "integer", "minimum": -999, "maximum": 999}
    # Numbers, strings and values in enum/const are left alone.
    for other in ({"type": "number"}, {"type": "string"}, {"enum": [{"type": "integer"}]}):
        assert guidance._prepare(other, 3) == other
