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
- anything else llguidance refuses is a 400 with its message, which names the keyword.

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


def tokenizer_from_llama(vocab: Any, eog: list[int]) -> Any:
    """The llguidance tokenizer of a llama.cpp vocabulary (~0.5 s: once per worker). ``eog``:
    every end-of-generation token, so that a complete reply may end with any of them."""
    from llguidance.llamacpp import lltokenizer_from_vocab

    with warnings.catch_warnings():  # it reads each token's attributes with a deprecated call
        warnings.simplefilter("ignore", DeprecationWarning)
        return lltokenizer_from_vocab(vocab, eos_token=eog)


def grammar_text(constraint: Constraint) -> str:
    """The llguidance grammar of a constraint: JSON between ``open`` and ``close``, or
    (``text_allowed``) plain text that does not start as a call does."""
    from llguidance import LLMatcher

    schema = {**_strip_formats(constraint.schema), "x-guidance": _OPTIONS}
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


def _strip_formats(schema: Any) -> Any:
    """The schema without ``format``s outside ``FORMATS`` (a copy)."""
    def visit(node: Any) -> Any:
        if isinstance(node, list):
            return [visit(x) for x in node]
        if not isinstance(node, dict):
            return node
        return {k: v if k in _VALUES else visit(v) for k, v in node.items()
                if not (k == "format" and isinstance(v, str) and v not in FORMATS)}
    return visit(schema)


@dataclass(eq=False)
class Grammar:
    """A compiled constraint: the prototype matcher that every choice's mask copies."""

    matcher: Any
    n_vocab: int

    def mask(self) -> "TokenMask":
        return TokenMask(self.matcher.deep_copy(), self.n_vocab)


def compile_grammar(constraint: Constraint, tokenizer: Any, n_vocab: int,
                    param: str) -> Grammar:
    """Compiled and its first mask computed (llguidance builds lexer states lazily, so the
    first mask pays for them here, in the task thread); a 400 naming what llguidance refuses.
    llguidance's parser limits (grammar size, lexer fuel, lexer states) bound the work."""
    from llguidance import LLMatcher

    try:
        text = grammar_text(constraint)
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
    return Grammar(matcher, n_vocab)


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

    def apply(self, logits: np.ndarray) -> None:
        """Disallowed tokens' logits to -inf, in place."""
        logits[self.compute() == 0] = -np.inf

    def accept(self, tok: int) -> None:
        if not self.matcher.consume_token(tok):
            raise GenerationFailed(f"The grammar refused token {tok}: "
                                   f"{self.matcher.get_error()}")
