"""OpenAI sampling parameters as ExLlamaV2Sampler.Settings fields, set in full.

``Settings()``'s defaults are not neutral (temperature 0.8, top_k 50, top_p 0.8, repetition
penalty 1.025), so every field is given here; ``engine.py`` turns the dict into a
``Settings`` at the GPU line. Fields that hold state (Mirostat, DRY) get fresh objects per
call: one Settings per job, and ``Settings.clone()`` is shallow.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import torch

from config.errors import InvalidRequest
from config.contract.job import Sampling

# Every field of exllamav2 0.3.2's ExLlamaV2Sampler.Settings dataclass.
SETTINGS_FIELDS = frozenset({
    "token_repetition_penalty", "token_repetition_range", "token_repetition_decay",
    "token_frequency_penalty", "token_presence_penalty",
    "temperature", "smoothing_factor", "min_temp", "max_temp", "temp_exponent",
    "top_k", "top_p", "top_a", "min_p", "tfs", "typical", "skew", "temperature_last",
    "mirostat", "mirostat_tau", "mirostat_eta", "mirostat_mu",
    "token_bias", "cfg_scale", "post_sampling_hooks",
    "dry_allowed_length", "dry_base", "dry_multiplier", "dry_sequence_breakers", "dry_range",
    "dry_max_ngram", "ngram_trie", "ngram_index", "ngram_history",
    "xtc_probability", "xtc_threshold", "xtc_ignore_tokens",
})

# OpenAI: "values like -100 or 100 should result in a ban or exclusive selection".
BAN = -100.0


def settings_fields(s: Sampling, token_bias: torch.Tensor | None) -> dict[str, Any]:
    greedy = s.temperature == 0
    return {
        # Penalties: OpenAI's additive frequency/presence only, over the *generated* tokens.
        # The window starts empty (range 0 penalises nothing) and the loop widens it to the
        # number of generated tokens after every step (see spec.sync_penalty_window).
        "token_repetition_penalty": 1.0,
        "token_repetition_range": 0,
        "token_repetition_decay": 0,
        "token_frequency_penalty": s.frequency_penalty,
        "token_presence_penalty": s.presence_penalty,
        # Temperature 0 is greedy: exllamav2 takes the argmax below 0.01, and top_k=1 says so
        # twice. OpenAI has no top_k (0, off); Anthropic's Messages API does.
        "temperature": 0.0 if greedy else s.temperature,
        "smoothing_factor": 0.0,
        "min_temp": 0.0,
        "max_temp": 0.0,
        "temp_exponent": 1.0,
        "top_k": 1 if greedy else s.top_k,
        "top_p": s.top_p,
        "top_a": 0.0,
        "min_p": 0.0,
        "tfs": 0.0,
        "typical": 0.0,
        "skew": 0.0,
        "temperature_last": False,
        "mirostat": False,
        "mirostat_tau": 1.5,
        "mirostat_eta": 0.1,
        "mirostat_mu": None,
        "token_bias": token_bias,
        "cfg_scale": None,
        "post_sampling_hooks": [],
        "dry_allowed_length": 2,
        "dry_base": 1.75,
        "dry_multiplier": 0.0,
        "dry_sequence_breakers": set(),
        "dry_range": 0,
        "dry_max_ngram": 20,
        "ngram_trie": None,
        "ngram_index": 0,
        "ngram_history": deque(),
        "xtc_probability": 0.0,
        "xtc_threshold": 0.1,
        "xtc_ignore_tokens": None,
    }


def token_bias(logit_bias: dict[int, float], vocab_size: int) -> torch.Tensor | None:
    """OpenAI ``logit_bias`` as exllamav2's dense bias: float32, length rounded up to 32.

    None when there is no bias, so the sampler skips the addition entirely.
    """
    if not logit_bias:
        return None
    bad = [k for k in logit_bias if not 0 <= int(k) < vocab_size]
    if bad:
        raise InvalidRequest(f"logit_bias has token ids outside the vocabulary (0..{vocab_size - 1})"
                             f": {sorted(bad)[:5]}", param="logit_bias")
    bias = torch.zeros(vocab_size + (-vocab_size % 32), dtype=torch.float)
    for k, b in logit_bias.items():
        bias[int(k)] = -math.inf if b <= BAN else float(b)
    return bias
