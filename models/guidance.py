"""Constraints (``models.constraints``) as llguidance grammars, and each step's token mask.

llguidance (the engine behind llama.cpp's ``LLAMA_LLGUIDANCE`` build, vLLM and SGLang) walks
the tokenizer's token trie with the grammar's lexer and Earley parser: a mask of SmolLM2's
49k tokens costs ~50 µs here, and compiling a nested schema ~2 ms. llama.cpp's GBNF sampler,
which this replaces, checked every token against its grammar at every step, and constrained
decoding ran at about half the speed of free decoding.

How schemas are compiled:

- blank space between JSON tokens is bounded as it was with GBNF: nothing, a space, or a
  newline and up to 20 spaces or tabs. Models write JSON indented (SmolLM2, squeezed onto one
  line, listed friends forever) and none can run away;
- ``oneOf`` is taken as ``anyOf`` (``coerce_one_of``), as before: the alternatives of the
  schemas people write rarely overlap, and llguidance cannot decide when they do;
- ``format`` values llguidance does not know are annotations (dropped, as JSON Schema 2020-12
  has them); those it knows (``FORMATS``) are enforced;
- an ``integer`` without a ``minimum`` (``maximum``) gets one of ``integer_digits`` digits
  (``ModelEntry.max_integer_digits``), or of as many as its other bound has: llguidance's
  integers are otherwise any number of digits, and a model that starts repeating a digit
  (SmolLM2 writes one token per digit) fills max_tokens with one number;
- anything else llguidance refuses is a 400 with its message, which names the keyword.

Both backends compile here, with the tokenizer of their model (``tokenizer_from_llama``,
``tokenizer_from_hf``), so they accept the same schemas and refuse the same ones.

``Grammar`` is compiled in the task thread (compiling drops the GIL, and the loop thread that
decodes every stream never waits for it); the loop thread takes one ``TokenMask`` per choice
(a copy of the compiled matcher, ~1 µs) and uses it alone.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from config.errors import GenerationFailed, InvalidRequest
from models.constraints import Constraint

# Blank space where JSON allows it: matched at most once per place (llguidance's rule).
WHITESPACE = r"(?:[ ]|\n[ \t]{0,20})"
# The string formats llguidance enforces; any other is an annotation.
FORMATS = frozenset({"date-time", "time", "date", "duration", "email", "hostname", "ipv4",
                     "ipv6", "uuid", "uri"})
# Keywords whose values are JSON data, not schemas.
_VALUES = {"const", "enum", "default", "examples"}
_OPTIONS = {"whitespace_pattern": WHITESPACE, "coerce_one_of": True}
# Digits of an integer without bounds (ModelEntry.max_integer_digits' default).
INTEGER_DIGITS = 15
_LOWER, _UPPER = ("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")
_INT64 = 2 ** 63 - 1  # llguidance's JSON numbers are 64-bit: a larger bound is a 400


def tokenizer_from_llama(vocab: Any, eog: list[int]) -> Any:
    """The llguidance tokenizer of a llama.cpp vocabulary (~0.5 s: once per worker). ``eog``:
    every end-of-generation token, so that a complete reply may end with any of them."""
    from llguidance.llamacpp import lltokenizer_from_vocab

    with warnings.catch_warnings():  # it reads each token's attributes with a deprecated call
        warnings.simplefilter("ignore", DeprecationWarning)
        return lltokenizer_from_vocab(vocab, eos_token=eog)


def tokenizer_from_hf(tokenizer_json: str, n_vocab: int, eog: list[int]) -> Any:
    """The llguidance tokenizer of a Hugging Face ``tokenizer.json`` (its text), as
    ExLlamaV2 model directories ship it (~0.4 s for 49k tokens: once per worker).
    ``n_vocab``: the model head's width, which may exceed the tokenizer's; ``eog``: as
    for ``tokenizer_from_llama``."""
    from llguidance import LLTokenizer

    return LLTokenizer(tokenizer_json, n_vocab=n_vocab, eos_token=sorted(set(eog)))


def grammar_text(constraint: Constraint, integer_digits: int = INTEGER_DIGITS) -> str:
    """The llguidance grammar of a constraint: JSON between ``open`` and ``close``, or
    (``text_allowed``) plain text that does not start as a call does."""
    from llguidance import LLMatcher

    schema = {**_prepare(constraint.schema, integer_digits), "x-guidance": _OPTIONS}
    c = constraint
    if not (c.open or c.close or c.text_allowed):
        return LLMatcher.grammar_from_json_schema(schema)
    call = " ".join(x for x in (c.open and json.dumps(c.open), "call",
                                 c.close and json.dumps(c.close)) if x)
    rules = [f"start: {call}" + (" | free_text" if c.text_allowed else ""),
             f"call: %json {json.dumps(schema)}"]
    if c.text_allowed:
        first = _class_char((c.open or "{")[0])
        rules.append(rf"free_text: /[^{first} \t\r\n](?s:.*)/")
    return LLMatcher.grammar_from_lark("\n".join(rules))


def _class_char(ch: str) -> str:
    return "\\" + ch if ch in "\\]^-[/" else ch


def _prepare(schema: Any, integer_digits: int) -> Any:
    """The schema without ``format``s outside ``FORMATS``, its integers bounded (a copy)."""
    def visit(node: Any) -> Any:
        if isinstance(node, list):
            return [visit(x) for x in node]
        if not isinstance(node, dict):
            return node
        out = {k: v if k in _VALUES else visit(v) for k, v in node.items()
               if not (k == "format" and isinstance(v, str) and v not in FORMATS)}
        return _bound_integer(out, integer_digits)
    return visit(schema)


def _bound_integer(node: dict[str, Any], digits: int) -> dict[str, Any]:
    """An integer schema's missing bounds: the largest (smallest) number of ``digits``
    digits, or of as many as the other bound has (so that the two never conflict), within
    64 bits."""
    types = node.get("type")
    if not (types == "integer" or isinstance(types, list) and "integer" in types):
        return node
    lower = [node[k] for k in _LOWER if _is_number(node.get(k))]
    upper = [node[k] for k in _UPPER if _is_number(node.get(k))]
    if lower and upper:
        return node
    width = max([digits, *(len(str(abs(int(b)))) for b in lower + upper)])
    extreme = min(10 ** width - 1, _INT64)
    return {**node, **({} if lower else {"minimum": -extreme}),
            **({} if upper else {"maximum": extreme})}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(eq=False)
class Grammar:
    """A compiled constraint: the prototype matcher that every choice's mask copies.
    ``end``: the tokens that may end a complete reply (the tokenizer's end tokens)."""

    matcher: Any
    n_vocab: int
    end: tuple[int, ...] = ()

    def mask(self) -> "TokenMask":
        return TokenMask(self.matcher.deep_copy(), self.n_vocab)


def compile_grammar(constraint: Constraint, tokenizer: Any, n_vocab: int, param: str,
                    integer_digits: int = INTEGER_DIGITS) -> Grammar:
    """Compiled and its first mask computed (llguidance builds lexer states lazily, so the
    first mask pays for them here, in the task thread); a 400 naming what llguidance refuses.
    llguidance's parser limits (grammar size, lexer fuel, lexer states) bound the work."""
    from llguidance import LLMatcher

    try:
        text = grammar_text(constraint, integer_digits)
    except ValueError as e:
        raise InvalidRequest(f"The JSON schema cannot be compiled: {e}", param=param) from None
    matcher = LLMatcher(tokenizer, text, log_level=0)
    try:
        TokenMask(matcher, n_vocab).compute()
    except GenerationFailed:
        pass  # the matcher is in error: a 400 below
    if matcher.is_error():
        raise InvalidRequest(f"The JSON schema cannot be enforced while generating: "
                             f"{matcher.get_error()}", param=param)
    return Grammar(matcher, n_vocab, tuple(tokenizer.eos_tokens))


@dataclass(eq=False)
class TokenMask:
    """One choice's place in its grammar, and the mask of the tokens allowed next."""

    matcher: Any
    n_vocab: int
    bits: np.ndarray = field(init=False)

    def __post_init__(self):
        self.bits = np.zeros((self.n_vocab + 31) // 32, dtype=np.int32)

    def compute(self) -> np.ndarray:
        """The allowed tokens, as booleans over the vocabulary. A matcher past llguidance's
        limits (or otherwise in error) would allow only the end tokens, ending the reply
        half written as if complete: it fails the choice instead."""
        self.matcher.unsafe_compute_mask_ptr(self.bits.ctypes.data, self.bits.nbytes)
        if self.matcher.is_error():
            raise GenerationFailed(f"The grammar failed: {self.matcher.get_error()}")
        return np.unpackbits(self.bits.view(np.uint8), bitorder="little")[:self.n_vocab]

    @property
    def stopped(self) -> bool:
        """The reply is complete and has ended (its end token accepted)."""
        return self.matcher.is_stopped()

    def apply(self, logits: np.ndarray) -> None:
        """Disallowed tokens' logits to -inf, in place."""
        logits[self.compute() == 0] = -np.inf

    def accept(self, tok: int) -> None:
        if not self.matcher.consume_token(tok):
            raise GenerationFailed(f"The grammar refused token {tok}: "
                                   f"{self.matcher.get_error()}")
