"""The relay's token timings (tasks/core/timing.py) without services: the inter-token
histogram filled in batches holds exactly what one ``observe`` per gap would."""

from __future__ import annotations

import random

import pytest

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from tasks.core.timing import ITL, _Gaps


def exposition(fill) -> dict[str, float]:
    """The samples by name and labels, creation times left out."""
    registry = CollectorRegistry()
    h = Histogram("itl_seconds", "x", ["model"], buckets=ITL._upper_bounds[:-1],
                  registry=registry)
    fill(h.labels("m"))
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in generate_latest(registry).decode().splitlines()
            if line and not line.startswith("#") and "_created" not in line}


def test_gaps_flushed_in_batches_equal_one_observe_each():
    rng = random.Random(7)
    # Values on the bucket bounds too (a bound is inclusive: "le"), and past the last.
    values = [rng.choice([0.001, 0.02, 1.5, 3.0, rng.uniform(0, 2)]) for _ in range(500)]

    def observed(child):
        for v in values:
            child.observe(v)

    def batched(child):
        gaps = _Gaps(child)
        for i, v in enumerate(values):
            gaps.add(v)
            if i % 97 == 0:
                gaps.flush()
        gaps.flush()
        gaps.flush()  # nothing held: adds nothing

    got, want = exposition(batched), exposition(observed)
    total = 'itl_seconds_sum{model="m"}'
    assert got.pop(total) == pytest.approx(want.pop(total))  # added in another order
    assert got == want
    assert got['itl_seconds_count{model="m"}'] == 500
