"""Output constraints on ExLlamaV2: llguidance token masks (``models.guidance``) as a filter.

Below the GPU line: nothing here imports exllamav2 or torch at import time. The backend
compiles a job's ``Constraint`` with ``models.guidance.compile_grammar``, the CPU backend's
own path, with the llguidance tokenizer of the model directory's ``tokenizer.json``
(``guidance.tokenizer_from_hf``): both backends accept the same schemas, refuse the same
ones with the same 400s, and write tool calls (tool_choice auto included) with the same
grammar. ``MaskFilterLogic`` is the ExLlamaV2 filter of one choice; engine.py mixes it with
``exllamav2.generator.filters.ExLlamaV2Filter``.

How exllamav2 0.3.2 drives a filter (generator/dynamic.py, generator/sampler.py): ``begin``
before the first token; then, when every filter of the job ``can_mask_logits``, the sampler
calls ``get_next(mask=True)`` (our ``prepare_logit_mask``, or its result when it ran in the
generator's filter pool) and ``mask_logits`` on the CPU logits, else ``next()`` for
``(allowed, end)`` token collections; ``feed`` with each sampled token, after which a filter
that ``use_background_worker`` gets its next ``prepare_logit_mask`` scheduled in the pool, to
overlap the next forward pass on the GPU. We always take the mask path: the mask and a
float bias of 0 / -inf made from it are computed in the pool, and ``mask_logits``, on the
loop thread, only adds that bias to the logits (one vectorised add, as exllamav2 adds its
own ``token_bias``: a boolean ``masked_fill_`` costs several times more).

An exception raised by a filter propagates out of ``iterate()``, and the loop then fails
every job of the worker and rebuilds the generator. A grammar failure (llguidance refusing
a token, or past its limits) is therefore kept in ``failure`` and the mask then allows only
the end tokens: the job ends at once, and the loop fails that choice alone
(``loop.BatchLoop``) instead of returning a reply cut short as if complete.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from config.errors import GenerationFailed
from models.guidance import Grammar, TokenMask

# Token allowed (1) or not (0) -> what is added to its logit.
_BIAS = np.array([-np.inf, 0.0], dtype=np.float32)


class MaskFilterLogic:
    """One choice's llguidance mask as an ExLlamaV2 filter. ``grammar``: the job's compiled
    grammar, copied at ``begin`` (a filter begun again starts over)."""

    def __init__(self, model: Any, tokenizer: Any, grammar: Grammar):
        super().__init__(model, tokenizer)
        self.grammar = grammar
        self.mask: TokenMask = grammar.mask()
        self.failure: GenerationFailed | None = None
        self._bias = np.zeros(grammar.n_vocab, dtype=np.float32)
        self._ready = False  # _bias holds the next step's mask (prepare_logit_mask ran)

    def begin(self, prefix_str: str) -> None:
        self.mask = self.grammar.mask()
        self.failure, self._ready = None, False

    def feed(self, token: Any) -> None:
        """``token``: the sampled (1, 1) tensor (or an int)."""
        if self.failure is not None:
            return
        try:
            self.mask.accept(int(token))
        except GenerationFailed as e:
            self.failure = e

    def prepare_logit_mask(self) -> bool:
        np.take(_BIAS, self._compute(), out=self._bias)
        self._ready = True
        return True

    def mask_logits(self, logits: Any) -> Any:
        """-inf where the mask says no, in place; ``logits`` (a CPU float tensor) is the
        head's width, which may exceed the vocabulary (the rest is never allowed)."""
        import torch

        if not self._ready:
            self.prepare_logit_mask()
        self._ready = False
        n = min(len(self._bias), logits.shape[-1])
        logits[:n].add_(torch.from_numpy(self._bias[:n]))
        logits[n:] = float("-inf")
        return logits

    def next(self) -> tuple[set[int], set[int]]:
        """The allowed-token path (only taken beside a filter that cannot mask): the allowed
        ids, and no "end" ids (the end tokens are the job's stop conditions)."""
        return set(self._compute().nonzero()[0].tolist()), set()

    def use_background_worker(self) -> bool:
        return True

    def can_mask_logits(self) -> bool:
        return True

    def _compute(self) -> np.ndarray:
        if self.failure is None and not self.mask.stopped:
            try:
                return self.mask.compute()
            except GenerationFailed as e:
                self.failure = e
        # Failed, or already ended (a mask scheduled after the last token): the end tokens.
        allowed = np.zeros(self.grammar.n_vocab, dtype=np.uint8)
        allowed[list(self.grammar.end)] = 1
        return allowed


def failure_of(filters: Any) -> GenerationFailed | None:
    """The first grammar failure among a job's filters, if any."""
    return next((f.failure for f in filters or () if getattr(f, "failure", None) is not None),
                None)
