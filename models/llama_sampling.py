"""A choice's sampler: a native llama.cpp sampler chain built from the job's settings.

llama-cpp-python's own chain (``Llama._init_sampler``) has no logit bias and adds top_k 40
and min_p 0.05, which OpenAI does not have. This chain is: logit bias, OpenAI penalties,
grammar, then greedy or top-p / temperature / seeded draw, everything inside llama.cpp.

A chain holds state (penalty counts, grammar position, random generator): one per choice,
used by one thread at a time, freed with ``close()``.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import llama_cpp
from llama_cpp import _internals

from config.errors import InvalidRequest
from config.contract.job import Sampling


@dataclass(frozen=True)
class ChainSpec:
    sampling: Sampling
    seed: int
    grammar: str | None = None
    # Penalties look back this many generated tokens (the whole context: OpenAI's
    # penalties count every token generated so far; 0 would turn them off).
    penalty_last_n: int = 0


def build_chain(vocab: ctypes.c_void_p, n_vocab: int, spec: ChainSpec) -> _internals.LlamaSampler:
    """``llama_sampler_sample`` with the result applies the chain and accepts the token it
    picks into every stateful sampler (penalties, grammar), so callers only sample."""
    s = spec.sampling
    chain = _internals.LlamaSampler()
    try:
        if s.logit_bias:
            chain.add_logit_bias(n_vocab, dict(s.logit_bias))
        if s.frequency_penalty or s.presence_penalty:
            chain.add_penalties(n_vocab=n_vocab, penalty_last_n=spec.penalty_last_n,
                                penalty_repeat=1.0, penalty_freq=s.frequency_penalty,
                                penalty_present=s.presence_penalty)
        if spec.grammar is not None:
            llama_cpp.llama_sampler_chain_add(chain.sampler, grammar_sampler(vocab, spec.grammar))
        if s.temperature == 0:
            chain.add_greedy()
        else:
            if s.top_p < 1.0:
                chain.add_top_p(s.top_p, 1)
            chain.add_temp(s.temperature)
            chain.add_dist(spec.seed)
    except BaseException:
        chain.close()
        raise
    return chain


def grammar_sampler(vocab: ctypes.c_void_p, gbnf: str) -> ctypes.c_void_p:
    """A fresh grammar sampler (grammars hold parse state: one per choice)."""
    ptr = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode(), b"root")
    if not ptr:
        raise InvalidRequest("The output constraint could not be compiled into a grammar.",
                             param="response_format")
    return ptr


def check_grammar(vocab: ctypes.c_void_p, gbnf: str) -> None:
    llama_cpp.llama_sampler_free(grammar_sampler(vocab, gbnf))
