"""One ExLlamaV2 job (one choice of a request), as plain data until the GPU line.

``JobSpec`` is built in the task thread; the loop thread turns it into an
``ExLlamaV2DynamicJob`` through ``engine.new_job``, whose keyword arguments come from
``job_kwargs``. ``ExLlamaV2DynamicJob`` swallows unknown keywords silently, so the names
here are checked against its signature (tests/test_exllamav2_api.py, where exllamav2 is
installed) and against the test double, which has the same signature without ``**kwargs``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class JobSpec:
    input_ids: tuple[int, ...]
    max_new_tokens: int
    # settings_fields(): every ExLlamaV2Sampler.Settings field.
    settings: dict[str, Any]
    seed: int
    stop_conditions: tuple[int | str, ...]
    # Alternatives per token when logprobs are asked for; None: no probabilities at all.
    top_logprobs: int | None = None
    # This job's own ExLlamaV2 filters (a grammar: stateful, so never shared between jobs).
    filters: tuple[Any, ...] = ()
    # ExLlamaV2MMEmbeddings whose token ids are in ``input_ids`` (images of vision models).
    embeddings: tuple[Any, ...] = ()


def job_kwargs(spec: JobSpec, identifier: Any, input_ids: Any, gen_settings: Any) -> dict[str, Any]:
    """Keyword arguments of ``ExLlamaV2DynamicJob`` for a spec. ``input_ids`` is the
    (1, n) CPU LongTensor of ``spec.input_ids``; ``gen_settings`` its fresh Settings."""
    logprobs = spec.top_logprobs is not None
    return {
        "input_ids": input_ids,
        "max_new_tokens": spec.max_new_tokens,
        "min_new_tokens": 0,
        "gen_settings": gen_settings,
        "seed": spec.seed,
        "stop_conditions": list(spec.stop_conditions),
        "decode_special_tokens": False,
        # Probabilities cost time on every token: only when asked for. Never logits (~4 bytes
        # x vocab per token).
        "return_top_tokens": spec.top_logprobs or 0,
        "return_probs": logprobs,
        "return_logits": False,
        "filters": list(spec.filters),
        # Not with llguidance masks: EOS may be allowed before the reply is complete (plain
        # text of tool_choice auto), and a complete reply allows only the end ids anyway.
        "filter_prefer_eos": False,
        "embeddings": list(spec.embeddings),
        "identifier": identifier,
    }


def sync_penalty_window(job: Any) -> None:
    """Keep frequency/presence penalties on the generated tokens only.

    exllamav2 penalises the last ``token_repetition_range`` tokens of prompt + output; the
    loop sets that range to the number generated so far after each step (``new_tokens`` is
    -1 before a healed first token), so the prompt is never penalised.
    """
    settings = job.gen_settings
    settings.token_repetition_range = max(job.new_tokens, 0)
