"""Stop conditions of one ExLlamaV2 job.

ExLlamaV2 has no implicit EOS: a job without stop tokens runs to max_new_tokens. So every
job carries the model's end tokens (config.json ∪ generation_config.json ∪ the tokenizer's
EOS ∪ the chat template's end-of-turn) plus the request's stop strings, which exllamav2
matches on decoded text, holding back a partial match until it resolves.
"""

from __future__ import annotations

from collections.abc import Iterable


def stop_conditions(end_ids: Iterable[int], stops: Iterable[str]) -> tuple[int | str, ...]:
    # exllamav2 sorts conditions by isinstance(int/str); numpy ints or empty strings would
    # raise or match everywhere, so both are normalised here.
    ids = sorted({int(i) for i in end_ids})
    strings = sorted({s for s in stops if s})
    return (*ids, *strings)
