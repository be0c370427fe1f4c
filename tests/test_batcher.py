"""The micro-batcher (models/batcher.py) with a stand-in model: grouping, order, errors."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from models.batcher import MicroBatcher


class FakeModel:
    """Rows are [first token id]; the first pass can be held until ``gate`` is set."""

    def __init__(self, hold_first: bool = False):
        self.calls: list[list[list[int]]] = []
        self.gate = threading.Event()
        if not hold_first:
            self.gate.set()

    def __call__(self, tokens):
        self.calls.append(list(tokens))
        if len(self.calls) == 1:
            self.gate.wait(5)
        if any(t == [666] for t in tokens):
            raise RuntimeError("model failed")
        return np.array([[float(t[0])] for t in tokens], dtype=np.float32)


def submit(batcher, tokens, bulk=False):
    out = {}

    def run():
        try:
            out["rows"] = batcher.embed(tokens, bulk=bulk)
        except Exception as e:
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    return t, out


def wait_pending(batcher, n):
    deadline = time.monotonic() + 5
    while len(batcher._pending) < n:
        assert time.monotonic() < deadline
        time.sleep(0.001)


def test_waiting_requests_share_one_pass_and_get_their_own_rows():
    model = FakeModel(hold_first=True)
    b = MicroBatcher(model, max_inputs=8, max_wait=0)
    first, _ = submit(b, [[1]])
    while not model.calls:
        time.sleep(0.001)
    jobs = [submit(b, [[10 + i], [20 + i]]) for i in range(3)]
    wait_pending(b, 3)
    model.gate.set()
    for t, out in jobs:
        t.join(5)
    first.join(5)
    assert len(model.calls) == 2 and len(model.calls[1]) == 6
    for i, (_, out) in enumerate(jobs):
        assert out["rows"][:, 0].tolist() == [10 + i, 20 + i]


def test_interactive_requests_go_before_bulk_ones():
    model = FakeModel(hold_first=True)
    b = MicroBatcher(model, max_inputs=1, max_wait=0)
    first, _ = submit(b, [[1]])
    while not model.calls:
        time.sleep(0.001)
    bulk, _ = submit(b, [[2]], bulk=True)
    wait_pending(b, 1)
    interactive, _ = submit(b, [[3]])
    wait_pending(b, 2)
    model.gate.set()
    for t in (first, bulk, interactive):
        t.join(5)
    assert [c[0][0] for c in model.calls] == [1, 3, 2]


def test_a_request_larger_than_a_pass_runs_alone():
    model = FakeModel()
    b = MicroBatcher(model, max_inputs=2, max_wait=0)
    rows = b.embed([[i] for i in range(5)])
    assert rows[:, 0].tolist() == [0, 1, 2, 3, 4]


def test_a_failed_pass_fails_its_requests_and_not_the_next():
    model = FakeModel()
    b = MicroBatcher(model, max_inputs=4, max_wait=0)
    with pytest.raises(RuntimeError, match="model failed"):
        b.embed([[666]])
    assert b.embed([[7]])[0, 0] == 7


def test_the_first_request_waits_for_company_at_most_max_wait():
    b = MicroBatcher(FakeModel(), max_inputs=64, max_wait=0.05)
    started = time.monotonic()
    b.embed([[1]])
    assert 0.04 <= time.monotonic() - started < 1


def hold_a_pass(b, model):
    """Occupy the batcher with a pass that runs until ``model.gate`` is set."""
    t, _ = submit(b, [[0]])
    while not model.calls:
        time.sleep(0.001)
    return t


def test_bulk_work_gathers_several_passes_worth():
    model = FakeModel(hold_first=True)
    b = MicroBatcher(model, max_inputs=2, max_bulk_inputs=6, max_wait=0)
    first = hold_a_pass(b, model)
    bulk = [submit(b, [[i]], bulk=True) for i in range(1, 8)]
    wait_pending(b, 7)
    model.gate.set()
    for t, _ in [(first, None), *bulk]:
        t.join(5)
    assert [len(c) for c in model.calls] == [1, 6, 1]


def test_a_waiting_interactive_request_limits_the_call_to_one_pass():
    model = FakeModel(hold_first=True)
    b = MicroBatcher(model, max_inputs=2, max_bulk_inputs=6, max_wait=0)
    first = hold_a_pass(b, model)
    waiting = [submit(b, [[i]], bulk=True) for i in range(1, 5)] + [submit(b, [[9]])]
    wait_pending(b, 5)
    model.gate.set()
    for t, _ in [(first, None), *waiting]:
        t.join(5)
    assert [[t[0] for t in c] for c in model.calls] == [[0], [9, 1], [2, 3, 4]]
