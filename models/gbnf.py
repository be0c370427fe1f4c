"""Constraints (``models.constraints``) as llama.cpp GBNF grammars.

JSON schemas are converted by llama-cpp-python's port of llama.cpp's converter, with
whitespace between tokens widened from its "at most one space" to llama.cpp's current rule
(nothing, a space, or a newline and up to 20 spaces or tabs): models write JSON indented, and
squeezed onto one line SmolLM2 lost track and listed friends forever, where indented it closed
the list after the two it was told of. Blank space stays bounded, so none can run away. A
tool call's ``name`` is generated before its ``arguments``, so the name can be
streamed before the arguments are complete.
"""

from __future__ import annotations

import copy
import json
import re
from itertools import accumulate

from config.errors import InvalidRequest
from models.constraints import Constraint

_SPACE = r'| " " | "\n" [ \t]{0,20}'
# JSON strings may not hold raw control characters (the port's rule lets them through, and
# json.loads then rejects the output).
_CHAR = r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'


# llama.cpp's GBNF parser recurses once per nested group and has no limit of its own: a
# grammar nested ~19,000 deep (maxLength 19000) overflowed a worker thread's stack (SIGSEGV:
# the worker gone, with every request it held). The web's schema limits keep grammars far
# shallower (maxLength 1000 is ~1000 levels); this refuses whatever still gets here, before
# llama.cpp parses it.
MAX_NESTING = 4000


def nesting(gbnf: str) -> int:
    """The deepest nesting of parentheses in a grammar, outside literals and classes."""
    bare = _QUOTED.sub("", gbnf)
    return max(accumulate(1 if c == "(" else -1 for c in _PARENS.findall(bare)), default=0)


_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"|\[(?:[^\]\\]|\\.)*\]|#[^\n]*')
_PARENS = re.compile(r"[()]")


def _literal(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid GBNF literal


def compile_gbnf(constraint: Constraint, param: str) -> str:
    from llama_cpp.llama_grammar import SchemaConverter

    converter = SchemaConverter(prop_order={"name": 0, "arguments": 1}, allow_fetch=False,
                                dotall=False, raw_pattern=False)
    try:
        schema = converter.resolve_refs(copy.deepcopy(constraint.schema), "")
        converter.visit(schema, "call")
    except (AssertionError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise InvalidRequest(f"The JSON schema cannot be turned into a grammar: {e}",
                             param=param) from None
    converter._rules["space"] = _SPACE
    if "char" in converter._rules:
        converter._rules["char"] = _CHAR
    c = constraint
    call = " ".join(x for x in (c.open and _literal(c.open), "call",
                                 c.close and _literal(c.close)) if x)
    root = f"root ::= {call}"
    if c.text_allowed:
        # auto tool choice: a reply that does not open like a call is plain text, to its end.
        first = json.dumps((c.open or "{")[0])[1:-1]
        root += f" | free-text\nfree-text ::= [^{first} \\t\\r\\n] [^\\x00]*"
    gbnf = f"{converter.format_grammar()}\n{root}"
    if nesting(gbnf) > MAX_NESTING:
        raise InvalidRequest(f"The JSON schema makes a grammar nested more than {MAX_NESTING} "
                             "deep, more than llama.cpp can parse; lower its maxLength, "
                             "maxItems or pattern repetitions.", param=param)
    return gbnf
