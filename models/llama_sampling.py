"""A choice's sampler: a native llama.cpp sampler chain built from the job's settings.

llama-cpp-python's own chain (``Llama._init_sampler``) has no logit bias and adds top_k 40
and min_p 0.05, which OpenAI does not have. This chain is: logit bias, OpenAI penalties,
then greedy or top-p / temperature / seeded draw, everything inside llama.cpp. A constrained
choice's llguidance mask (``models.guidance``) is applied to the logits before the chain
runs (``LlamaEngine.sample``), so it bounds what bias and penalties can pick.

A chain holds state (penalty counts, grammar position, random generator): one per choice,
used by one thread at a time, freed with ``close()``.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from llama_cpp import _internals

from config.contract.job import Sampling
from models.guidance import Grammar, TokenMask


@dataclass(frozen=True)
class ChainSpec:
    sampling: Sampling
    seed: int
    grammar: Grammar | None = None
    # Penalties look back this many generated tokens (the whole context: OpenAI's
    # penalties count every token generated so far; 0 would turn them off).
    penalty_last_n: int = 0


@dataclass(eq=False)
class Chain:
    """A choice's native sampler chain, and its token mask when its output is constrained."""

    native: _internals.LlamaSampler
    mask: TokenMask | None = None

    @property
    def sampler(self) -> ctypes.c_void_p:
        return self.native.sampler

    def close(self) -> None:
        self.native.close()


def build_chain(n_vocab: int, spec: ChainSpec) -> Chain:
    """``llama_sampler_sample`` with the result applies the chain and accepts the token it
    picks into every stateful sampler (penalties), so callers only sample."""
    s = spec.sampling
    chain = _internals.LlamaSampler()
    try:
        if s.logit_bias:
            chain.add_logit_bias(n_vocab, dict(s.logit_bias))
        if s.frequency_penalty or s.presence_penalty:
            chain.add_penalties(n_vocab=n_vocab, penalty_last_n=spec.penalty_last_n,
                                penalty_repeat=1.0, penalty_freq=s.frequency_penalty,
                                penalty_present=s.presence_penalty)
        if s.temperature == 0:
            chain.add_greedy()
        else:
            if s.top_k > 0:
                chain.add_top_k(s.top_k)
            if s.top_p < 1.0:
                chain.add_top_p(s.top_p, 1)
            chain.add_temp(s.temperature)
            chain.add_dist(spec.seed)
    except BaseException:
        chain.close()
        raise
    return Chain(chain, spec.grammar.mask() if spec.grammar is not None else None)

