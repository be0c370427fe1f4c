"""llama.cpp plumbing for the CPU backend: our own sampler chain, logits, prompt logprobs.

``Llama.generate`` builds its sampler with ``_init_sampler``, whose chain has no logit bias
and whose Python logits-processor hook is marked "probably broken" upstream. ``FerryLlama``
replaces it with a chain built natively from the job: logit bias, OpenAI penalties, grammar,
then greedy or top-p / temperature / seeded draw. Everything stays inside llama.cpp.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import llama_cpp
import numpy as np
from llama_cpp import _internals

from config.errors import InvalidRequest
from models.events import TokenLogprob
from models.job import Sampling
from models.logprobs import Piece, entry, log_softmax


@dataclass(frozen=True)
class ChainSpec:
    sampling: Sampling
    seed: int
    grammar: str | None = None
    # Penalties look back this many generated tokens (the whole context: OpenAI's
    # penalties count every token generated so far).
    penalty_last_n: int = 0


class FerryLlama(llama_cpp.Llama):
    """``Llama`` whose ``generate`` samples with the chain described by ``self.chain``."""

    chain: ChainSpec | None = None

    def _init_sampler(self, **_ignored) -> _internals.LlamaSampler:
        spec = self.chain
        if spec is None:
            raise RuntimeError("FerryLlama.generate needs a chain spec")
        s = spec.sampling
        sampler = _internals.LlamaSampler()
        if s.logit_bias:
            sampler.add_logit_bias(self._n_vocab, dict(s.logit_bias))
        if s.frequency_penalty or s.presence_penalty:
            sampler.add_penalties(n_vocab=self._n_vocab, penalty_last_n=spec.penalty_last_n,
                                  penalty_repeat=1.0, penalty_freq=s.frequency_penalty,
                                  penalty_present=s.presence_penalty)
        if spec.grammar is not None:
            llama_cpp.llama_sampler_chain_add(sampler.sampler, grammar_sampler(self, spec.grammar))
        if s.temperature == 0:
            sampler.add_greedy()
        else:
            if s.top_p < 1.0:
                sampler.add_top_p(s.top_p, 1)
            sampler.add_temp(s.temperature)
            sampler.add_dist(spec.seed)
        return sampler

    def last_logprobs(self) -> np.ndarray:
        """Log-softmax of the logits that produced the token ``generate`` just yielded."""
        ptr = self._ctx.get_logits_ith(-1)
        return log_softmax(np.ctypeslib.as_array(ptr, shape=(self._n_vocab,)))

    def prompt_logprobs(self, tokens: list[int], top_n: int, piece: Piece) -> list[TokenLogprob]:
        """Each prompt token's entry (the first has no log probability: nothing predicts it).

        Evaluates the prompt with logits for every position (chunk by chunk: logits for all
        of an 8k context at once would be gigabytes) and leaves it in the KV cache, so the
        following ``generate`` starts sampling at once.
        """
        self.reset()
        out = [entry(None, tokens[0], top_n, piece)] if tokens else []
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start:start + self.n_batch]
            self._ctx.kv_cache_seq_rm(-1, start, -1)
            self._batch.set_batch(batch=chunk, n_past=start, logits_all=True)
            self._ctx.decode(self._batch)
            logits = np.ctypeslib.as_array(self._ctx.get_logits(),
                                           shape=(len(chunk), self._n_vocab))
            for i in range(len(chunk)):
                if start + i + 1 < len(tokens):
                    nxt = tokens[start + i + 1]
                    out.append(entry(log_softmax(logits[i]), nxt, top_n, piece))
            self.input_ids[start:start + len(chunk)] = chunk
            self.n_tokens = start + len(chunk)
        self._requires_eval = False
        return out


def grammar_sampler(llm: llama_cpp.Llama, gbnf: str) -> ctypes.c_void_p:
    """A fresh grammar sampler (grammars hold parse state: one per choice)."""
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    ptr = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode(), b"root")
    if not ptr:
        raise InvalidRequest("The output constraint could not be compiled into a grammar.",
                             param="response_format")
    return ptr


def check_grammar(llm: llama_cpp.Llama, gbnf: str) -> None:
    llama_cpp.llama_sampler_free(grammar_sampler(llm, gbnf))
