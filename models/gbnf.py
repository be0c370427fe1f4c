"""Constraints (``models.constraints``) as llama.cpp GBNF grammars.

JSON schemas are converted by llama-cpp-python's port of llama.cpp's converter, which keeps
whitespace to at most one space between tokens (a small model cannot run away in blank
space). A tool call's ``name`` is generated before its ``arguments``, so the name can be
streamed before the arguments are complete.
"""

from __future__ import annotations

import copy

from config.errors import InvalidRequest
from models.constraints import Constraint

# auto tool choice: a reply that does not open with "{" is plain text, to its end.
_TEXT_RULES = 'free-text ::= [^{ \\t\\r\\n] [^\\x00]*'


def compile_gbnf(constraint: Constraint, param: str) -> str:
    from llama_cpp.llama_grammar import SchemaConverter

    converter = SchemaConverter(prop_order={"name": 0, "arguments": 1}, allow_fetch=False,
                                dotall=False, raw_pattern=False)
    try:
        schema = converter.resolve_refs(copy.deepcopy(constraint.schema), "")
        if constraint.text_allowed:
            converter.visit(schema, "call")
        else:
            converter.visit(schema, "")
    except (AssertionError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise InvalidRequest(f"The JSON schema cannot be turned into a grammar: {e}",
                             param=param) from None
    grammar = converter.format_grammar()
    if constraint.text_allowed:
        grammar += f"\nroot ::= call | free-text\n{_TEXT_RULES}"
    return grammar
