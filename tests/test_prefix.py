"""Which idle sequence a new choice takes (models/prefix.py): the longest common token
prefix of which it keeps at least half, ties and misses to the least recently used, never
the prompt's last token."""

from __future__ import annotations

from models.prefix import IdleSequences, common_prefix


def test_common_prefix_counts_leading_equal_tokens():
    assert common_prefix([1, 2, 3, 4], [1, 2, 5]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([7, 1], [1, 7]) == 0


def idle(*held: list[int]) -> IdleSequences:
    """Sequences 0, 1, ... released in that order (0 least recently used), holding ``held``."""
    seqs = IdleSequences(range(len(held)))
    for seq, tokens in enumerate(held):
        seqs.put(seq, list(tokens))
    return seqs


def test_the_longest_common_prefix_wins_whatever_its_age():
    seqs = idle([1, 2, 9], [1, 2, 3, 4, 8], [5])
    assert seqs.take([1, 2, 3, 4, 5, 6], limit=5) == (1, 4)
    assert len(seqs) == 2


def test_equal_prefixes_go_to_the_least_recently_used():
    seqs = idle([1, 2, 7], [1, 2, 8], [1, 2, 9])
    assert seqs.take([1, 2, 3], limit=2) == (0, 2)
    seqs.put(0, [1, 2, 3])
    assert seqs.take([1, 2, 4], limit=2) == (1, 2)


def test_without_a_match_the_least_recently_used_is_evicted():
    seqs = idle([1], [2], [3])
    seqs.put(0, [1, 1])  # 0 used again: now 1 is the oldest
    assert seqs.take([9, 9], limit=1) == (1, 0)


def test_a_short_match_does_not_evict_a_longer_cache():
    seqs = idle([1, 2, 3, 4, 5, 6], [9, 8, 7, 6, 5, 4])
    # Sequence 1 shares one token of six: the oldest is evicted instead.
    assert seqs.take([9, 1, 1], limit=2) == (0, 0)


def test_an_empty_sequence_goes_before_any_eviction():
    seqs = idle([1, 2, 3], [], [4, 5, 6])
    assert seqs.take([7, 7], limit=1) == (1, 0)


def test_a_shared_system_prompt_is_taken_wherever_it_is():
    system = list(range(100, 120))
    seqs = idle([1, 2, 3], system + [1, 1, 1], system + [2, 2, 2])
    assert seqs.take(system + [3, 3], limit=21) == (1, 20)


def test_the_prompts_last_token_is_never_kept():
    seqs = idle([1, 2, 3, 4, 5])
    # The whole prompt is cached, but its last token must be evaluated for its logits.
    assert seqs.take([1, 2, 3], limit=2) == (0, 2)


def test_limit_zero_keeps_nothing_and_spares_the_caches():
    seqs = idle([1, 2, 3], [4])
    seqs.put(0, [1, 2, 3])  # 1 is now the oldest
    assert seqs.take([1, 2, 3, 4], limit=0) == (1, 0)


def test_with_reuse_off_the_lowest_id_is_taken_and_nothing_is_kept():
    seqs = IdleSequences(range(3), reuse=False)
    seqs.take([1], 0)
    seqs.take([1], 0)
    seqs.put(1, [1, 2, 3])
    assert seqs.tokens(1) == []
    assert seqs.take([1, 2, 3, 4], limit=3) == (1, 0)


def test_forget_empties_every_idle_sequence():
    seqs = idle([1, 2, 3], [1, 2])
    seqs.forget()
    assert seqs.take([1, 2, 3, 4], limit=3) == (0, 0)
