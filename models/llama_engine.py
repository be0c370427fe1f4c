"""llama.cpp plumbing for the CPU backend: one model, one context of several sequences.

The context holds ``slots`` sequences, each in its own KV stream (``kv_unified = False``):
a sequence's logits then do not depend on which other sequences share a decode call, so a
temperature-0 reply is the same token for token whether it ran alone or with others (with a
unified cache they differed here). Its ``n_ctx`` is split evenly among the streams, hence
``slots * num_ctx``.

Thread safety: the model's vocabulary is read-only, so tokenizing and spelling tokens
(``tokenize``, ``detokenize``, ``piece``, ``is_eog``) and compiling grammars against it
(``compile_grammar``) may run in any thread; everything that touches the context
(``decode``, ``logits``, ``sample``, ``clear``, ``keep``, ``copy``) is for the one loop thread
that owns it (``models.llama_batch``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import llama_cpp
import numpy as np
from llama_cpp import _internals
from llama_cpp._logger import set_verbose

from models import guidance
from models.constraints import Constraint
from models.llama_sampling import Chain, ChainSpec, build_chain


class Row(NamedTuple):
    """One token of a decode call: ``logits`` asks for its output row."""

    token: int
    pos: int
    seq: int
    logits: bool


class DecodeFailed(RuntimeError):
    """llama_decode refused or failed a batch (no room in the cache, an abort, a bug)."""


class LlamaEngine:
    def __init__(self, path: str, num_ctx: int, slots: int, n_batch: int, n_threads: int):
        set_verbose(False)  # llama.cpp logs every context it builds to stderr otherwise
        llama_cpp.llama_backend_init()
        self.model = _internals.LlamaModel(path_model=path,
                                           params=llama_cpp.llama_model_default_params(),
                                           verbose=False)
        self.vocab = self.model.vocab
        self.n_vocab = self.model.n_vocab()
        self.slots, self.num_ctx = slots, num_ctx
        # A decode step holds one token per slot, so a batch must take at least that many.
        self.n_batch = max(n_batch, slots)
        self.ctx = _internals.LlamaContext(model=self.model, params=self._params(n_threads),
                                           verbose=False)
        per_seq = llama_cpp.llama_n_ctx_seq(self.ctx.ctx)
        if per_seq < num_ctx:
            self.close()
            raise RuntimeError(f"llama.cpp gave each sequence {per_seq} tokens of context, "
                               f"fewer than num_ctx {num_ctx}")
        self._batch = _internals.LlamaBatch(n_tokens=self.n_batch, embd=0, n_seq_max=1,
                                            verbose=False)
        eog = [t for t in range(self.n_vocab) if self.is_eog(t)]
        self._grammar_tokenizer = guidance.tokenizer_from_llama(self.vocab, eog)

    def _params(self, n_threads: int):
        p = llama_cpp.llama_context_default_params()
        p.n_ctx = self.slots * self.num_ctx
        p.n_batch = self.n_batch
        p.n_ubatch = min(self.n_batch, 512)
        p.n_seq_max = self.slots
        p.kv_unified = False
        p.n_threads = p.n_threads_batch = n_threads
        # As llama-cpp-python's Llama (and so its server) runs: same logits, same greedy text.
        p.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        p.no_perf = True
        return p

    # -- any thread ---------------------------------------------------------------------------

    @property
    def metadata(self) -> dict[str, str]:
        return self.model.metadata()

    def tokenize(self, text: bytes, add_bos: bool, special: bool) -> list[int]:
        return self.model.tokenize(text, add_bos=add_bos, special=special)

    def detokenize(self, tokens: list[int], special: bool = False) -> bytes:
        return self.model.detokenize(tokens, special=special)

    def piece(self, tok: int) -> bytes:
        """A token's bytes as text; control tokens (which have none) by their name."""
        return self.detokenize([tok]) or self.detokenize([tok], special=True)

    def text_piece(self, tok: int) -> bytes:
        """A generated token's bytes as the reply's text (control tokens add nothing)."""
        return self.detokenize([tok])

    def is_eog(self, tok: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, tok))

    def token_bos(self) -> int:
        return self.model.token_bos()

    def token_eos(self) -> int:
        return self.model.token_eos()

    def fim_tokens(self) -> tuple[int, int, int]:
        v = self.vocab
        return (llama_cpp.llama_vocab_fim_pre(v), llama_cpp.llama_vocab_fim_suf(v),
                llama_cpp.llama_vocab_fim_mid(v))

    def compile_grammar(self, constraint: Constraint, param: str,
                        integer_digits: int = guidance.INTEGER_DIGITS) -> guidance.Grammar:
        return guidance.compile_grammar(constraint, self._grammar_tokenizer, self.n_vocab, param,
                                        integer_digits)

    # -- the loop thread only -----------------------------------------------------------------

    def new_chain(self, spec: ChainSpec) -> Chain:
        return build_chain(self.n_vocab, spec)

    def decode(self, rows: Sequence[Row]) -> None:
        """One llama_decode of ``rows`` (at most ``n_batch``). With separate KV streams,
        llama.cpp splits a batch into one micro-batch per run of consecutive sequence ids,
        taken in batch order: callers list rows by ascending ``seq``."""
        b = self._batch.batch
        for i, r in enumerate(rows):
            b.token[i], b.pos[i], b.n_seq_id[i] = r.token, r.pos, 1
            b.seq_id[i][0], b.logits[i] = r.seq, r.logits
        b.n_tokens = len(rows)
        code = llama_cpp.llama_decode(self.ctx.ctx, b)
        if code != 0:
            raise DecodeFailed(f"llama_decode returned {code}")

    def logits(self, i: int) -> np.ndarray:
        """The output row of row ``i`` of the last decode: a view, valid until the next one."""
        ptr = llama_cpp.llama_get_logits_ith(self.ctx.ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def sample(self, chain: Chain, i: int) -> int:
        """The next token of row ``i``. A constrained chain's mask is applied to the logits
        in place for the native chain to read, then undone: logprobs are of the raw logits
        (~75 µs a step for SmolLM2's 49k tokens, mask computation ~50 µs)."""
        if chain.mask is None:
            return llama_cpp.llama_sampler_sample(chain.sampler, self.ctx.ctx, i)
        logits = self.logits(i)
        raw = logits.copy()
        chain.mask.apply(logits)
        try:
            tok = llama_cpp.llama_sampler_sample(chain.sampler, self.ctx.ctx, i)
        finally:
            np.copyto(logits, raw)
        chain.mask.accept(tok)
        return tok

    def clear(self, seq: int | None = None) -> None:
        """Forget sequence ``seq``'s cache (every sequence's with None)."""
        mem = self.ctx.memory
        if seq is None:
            llama_cpp.llama_memory_clear(mem, True)
        else:
            llama_cpp.llama_memory_seq_rm(mem, seq, -1, -1)

    def keep(self, seq: int, n: int) -> int:
        """Keep the first ``n`` tokens of sequence ``seq``'s cache and drop the rest; returns
        how many were kept (0 where llama.cpp cannot cut a sequence, e.g. a recurrent
        model's state: the whole sequence is dropped then)."""
        mem = self.ctx.memory
        if n > 0 and llama_cpp.llama_memory_seq_rm(mem, seq, n, -1):
            return n
        llama_cpp.llama_memory_seq_rm(mem, seq, -1, -1)
        return 0

    def copy(self, src: int, dst: int) -> None:
        """Make ``dst``'s cache a copy of ``src``'s. With one KV stream per sequence this
        copies the whole stream buffer (``num_ctx`` tokens of K and V, used or not: 47 MB
        for SmolLM2 at 2,048, far less work than evaluating a prompt). llama.cpp copies at
        the start of the next ``decode``, so ``src`` must not change before then; the last
        decode's logits stay readable meanwhile."""
        llama_cpp.llama_memory_seq_cp(self.ctx.memory, src, dst, -1, -1)

    def close(self) -> None:
        batch = getattr(self, "_batch", None)
        if batch is not None:
            batch.close()
        self.ctx.close()
        self.model.close()
