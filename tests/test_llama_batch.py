"""The CPU backend's batching loop (models/llama_batch.py) against an engine double: who
gets a slot when, what goes into each llama_decode call, cancels, expiry and failures.
The real engine is exercised by tests/test_backend_conformance.py and tests/test_batching.py."""

from __future__ import annotations

import queue
import threading
import time

import numpy as np
import pytest

from config.errors import GenerationFailed, RequestExpired
from config.contract.events import Delta, Finish
from config.contract.job import Sampling
from models.llama_batch import BatchLoop, Choice
from models.llama_engine import DecodeFailed, Row
from models.llama_sampling import ChainSpec
from models.base import CancelFlag
from models.output import ChoiceWriter, Outbox, follow_choices

VOCAB = [b"<eos>", b"a", b"b", b"c", b" ", b"."]
EOS = 0


class Chain:
    def __init__(self, spec: ChainSpec):
        self.spec, self.sampled, self.closed = spec, 0, False

    def close(self) -> None:
        self.closed = True


class EngineDouble:
    """Choice with seed s "samples" plans[s] token by token ('a' for ever once the plan is
    used up). Keeps each sequence's cached tokens, checks that every sequence is fed
    contiguous positions after them and records each decode call's rows. ``copy`` takes
    effect at once, as llama.cpp's cell bookkeeping does (it copies the data at the next
    decode, before that decode writes anything)."""

    def __init__(self, plans=None, slots=2, n_batch=8, step=0.0):
        self.plans, self.slots, self.n_batch, self.step = plans or {}, slots, n_batch, step
        self.calls: list[list[Row]] = []
        self.kv: dict[int, list[int]] = {}
        self.chains: list[Chain] = []
        self.clears: list[int | None] = []
        self.copies: list[tuple[int, int]] = []
        self.fail_next = False
        self._lock = threading.Lock()

    def new_chain(self, spec):
        chain = Chain(spec)
        self.chains.append(chain)
        return chain

    def decode(self, rows):
        assert 0 < len(rows) <= self.n_batch
        if self.fail_next:
            self.fail_next = False
            raise DecodeFailed("llama_decode returned -3")
        if self.step:
            time.sleep(self.step)
        for r in rows:
            assert r.pos == len(self.kv.setdefault(r.seq, [])), (r, self.kv)
            self.kv[r.seq].append(r.token)
        with self._lock:
            self.calls.append(list(rows))

    def logits(self, i):
        # Token 1 most likely, then 2, ...: log-softmax order is fixed.
        return -np.arange(len(VOCAB), dtype=np.float32)

    def sample(self, chain, i):
        assert self.calls[-1][i].logits
        plan = self.plans.get(chain.spec.seed, [])
        if chain.sampled < len(plan) and plan[chain.sampled] is None:
            raise RuntimeError("the sampler broke")
        tok = plan[chain.sampled] if chain.sampled < len(plan) else 1
        chain.sampled += 1
        return tok

    def clear(self, seq=None):
        self.clears.append(seq)
        if seq is None:
            self.kv.clear()
        else:
            self.kv.pop(seq, None)

    def keep(self, seq, n):
        self.kv[seq] = self.kv.get(seq, [])[:n]
        return n

    def copy(self, src, dst):
        self.copies.append((src, dst))
        self.kv[dst] = list(self.kv.get(src, []))

    def piece(self, tok):
        return VOCAB[tok]

    text_piece = piece

    def is_eog(self, tok):
        return tok == EOS

    def seqs_per_call(self) -> list[set[int]]:
        with self._lock:
            return [{r.seq for r in call} for call in self.calls]


def choice(seed: int, index: int = 0, prompt=(1, 2, 3), max_tokens: int = 50, stop=(),
           **kw) -> Choice:
    return Choice(index=index, prompt=list(prompt), max_tokens=max_tokens,
                  chain=ChainSpec(Sampling(temperature=0), seed),
                  writer=ChoiceWriter(index, list(stop)), **kw)


def drain(c: Choice, timeout: float = 10.0) -> tuple[str, object, list]:
    """(text, final item, every item) of a choice."""
    text, items, end = "", [], time.monotonic() + timeout
    while True:
        item = c.out.get(timeout=max(0.01, end - time.monotonic()))
        items.append(item)
        if isinstance(item, Delta):
            text += item.text if not item.prompt else ""
        else:
            return text, item, items


@pytest.fixture
def make_loop():
    loops = []

    def make(engine, **kw):
        loop = BatchLoop(engine, idle_wait=0.02, **kw).start()
        loops.append(loop)
        return loop

    yield make
    for loop in loops:
        loop.close()


def test_running_choices_share_each_decode_call(make_loop):
    engine = EngineDouble({1: [1, 1, 1, EOS], 2: [2, 2, EOS], 3: [3, 4, 3, 5, EOS]}, slots=4)
    loop = make_loop(engine, reuse=False)  # released sequences are cleared
    cs = [choice(1), choice(2), choice(3)]
    for c in cs:
        loop.submit(c)
    results = [drain(c) for c in cs]
    assert [text for text, _, _ in results] == ["aaa", "bb", "c c."]
    assert [(f.finish_reason, f.completion_tokens) for _, f, _ in results] == [
        ("stop", 3), ("stop", 2), ("stop", 4)]
    decode_steps = [call for call in engine.calls if all(r.logits for r in call)]
    assert any(len(call) == 3 for call in decode_steps), engine.calls
    # Rows of a step are in ascending sequence order (llama.cpp batches runs of ids).
    assert all([r.seq for r in call] == sorted(r.seq for r in call) for call in decode_steps)
    assert all(ch.closed for ch in engine.chains)
    assert set(engine.clears) == {0, 1, 2}


def test_a_direct_outbox_gets_the_deltas_on_the_loop_thread(make_loop):
    """``Outbox(direct)``: each delta is handed to ``direct`` on the loop's thread as it is
    made; the task thread's queue gets only the finish (one wake per choice, not per token)."""
    engine = EngineDouble({1: [1, 1, 1, EOS], 2: [2, 2, EOS]}, slots=4)
    loop = make_loop(engine)
    handed = []
    out = Outbox(lambda ev: handed.append((ev, threading.current_thread().name)))
    cs = [choice(1, out=out), choice(2, index=1, out=out)]
    for c in cs:
        loop.submit(c)
    finishes = sorted((out.get(timeout=10) for _ in cs), key=lambda f: f.index)
    assert [(f.index, f.finish_reason, f.completion_tokens) for f in finishes] == [
        (0, "stop", 3), (1, "stop", 2)]
    assert out.empty()
    texts = ["".join(ev.text for ev, _ in handed if ev.index == i) for i in (0, 1)]
    assert texts == ["aaa", "bb"]
    assert {name for _, name in handed} == {BatchLoop.thread_name}
    # Without ``direct`` it is a queue of everything, in order.
    c = choice(2, out=Outbox())
    loop.submit(c)
    text, final, _ = drain(c)
    assert text == "bb" and isinstance(final, Finish)


def test_a_cancel_wakes_the_thread_following_a_direct_outbox_at_once(make_loop):
    """With its deltas handed over, a running choice sends its task thread nothing until it
    finishes: a ``CancelFlag`` set from another thread wakes ``follow_choices`` to cancel it,
    without waiting for its poll (here 60 s) to come round."""
    engine = EngineDouble(slots=2, step=0.002)
    loop = make_loop(engine)
    handed = []
    c = choice(1, max_tokens=100_000, out=Outbox(handed.append))
    loop.submit(c)
    flag = CancelFlag()
    got = []
    follower = threading.Thread(target=lambda: got.extend(
        follow_choices(c.out, {0: c}, loop.cancel, flag, poll=60.0)))
    follower.start()
    deadline = time.monotonic() + 5
    while not handed and time.monotonic() < deadline:
        time.sleep(0.005)
    assert handed, "the loop never handed a delta over"
    t0 = time.monotonic()
    flag.set()
    follower.join(timeout=5)
    assert not follower.is_alive(), "the cancel did not wake the task thread"
    assert time.monotonic() - t0 < 2.0
    assert [type(ev) for ev in got] == [Finish] and got[0].finish_reason == "cancelled"
    # A flag set before anyone follows it wakes its follower as it starts.
    late, flag = choice(2, max_tokens=100_000, out=Outbox(lambda ev: None)), CancelFlag()
    flag.set()
    loop.submit(late)
    finished = list(follow_choices(late.out, {0: late}, loop.cancel, flag, poll=60.0))
    assert finished[-1].finish_reason == "cancelled"


def test_a_prompt_is_evaluated_alone_in_n_batch_chunks_from_its_start(make_loop):
    engine = EngineDouble(slots=2, n_batch=4)
    loop = make_loop(engine)
    long, short = choice(1, prompt=range(1, 11), max_tokens=3), choice(2, max_tokens=3)
    loop.submit(long)
    loop.submit(short)
    assert drain(long)[0] == "aaa" and drain(short)[0] == "aaa"
    lengths = {0: 10, 1: 3}  # the long one was admitted first: sequence 0
    prompt_calls = [call for call in engine.calls if call[0].pos < lengths[call[0].seq]]
    assert all(len({r.seq for r in call}) == 1 for call in prompt_calls)
    by_seq = {}
    for call in prompt_calls:
        by_seq.setdefault(call[0].seq, []).append([r.pos for r in call])
    assert by_seq == {0: [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]], 1: [[0, 1, 2]]}
    # Only the prompt's last token asks for logits (nothing scores the prompt here).
    assert [[r.logits for r in call] for call in prompt_calls if call[0].seq == 0] == [
        [False] * 4, [False] * 4, [False, True]]


def test_slots_cap_running_choices_and_a_waiting_one_starts_when_one_frees(make_loop):
    engine = EngineDouble({1: [1] * 5 + [EOS], 2: [2] * 30 + [EOS], 3: [3, EOS]}, slots=2)
    loop = make_loop(engine, reuse=False)  # the cold policy: lowest free id
    first, second, third = choice(1), choice(2), choice(3)
    for c in (first, second, third):
        loop.submit(c)
    assert [drain(c)[0] for c in (first, second, third)] == ["aaaaa", "b" * 30, "c"]
    seqs = engine.seqs_per_call()
    assert max(len(s) for s in seqs) == 2 and set().union(*seqs) == {0, 1}
    # The third took the slot the first freed (the lowest free id) while the second ran.
    third_prompt = next(i for i, call in enumerate(engine.calls)
                        if call[0].seq == 0 and call[0].pos == 0 and i > 0)
    assert any(1 in s for s in seqs[third_prompt:])


def test_cancel_frees_the_slot_within_one_step(make_loop):
    engine = EngineDouble(slots=2, step=0.002)
    loop = make_loop(engine, reuse=False)  # released sequences are cleared
    victim, other = choice(1, max_tokens=100_000), choice(2, index=1, max_tokens=400)
    loop.submit(victim)
    loop.submit(other)
    assert isinstance(victim.out.get(timeout=5), Delta)
    loop.cancel(victim)
    text, fin, items = drain(victim)
    assert fin.finish_reason == "cancelled"
    assert fin.completion_tokens == sum(i.tokens for i in items if isinstance(i, Delta)) + 1
    n_calls = len(engine.calls)
    assert 0 in engine.clears and victim.writer.tokens == fin.completion_tokens
    other_text, other_fin, _ = drain(other)
    assert other_text == "a" * 400 and other_fin.finish_reason == "length"
    assert all(r.seq != 0 for call in engine.calls[n_calls:] for r in call)


def test_cancel_of_a_waiting_choice_never_gives_it_a_slot(make_loop):
    engine = EngineDouble(slots=1, step=0.002)
    loop = make_loop(engine)
    running, waiting = choice(1, max_tokens=300), choice(2, index=1)
    loop.submit(running)
    loop.submit(waiting)
    assert isinstance(running.out.get(timeout=5), Delta)
    loop.cancel(waiting)
    assert drain(waiting)[1] == Finish(1, "cancelled", 0)
    assert drain(running)[1].finish_reason == "length"
    assert len(engine.chains) == 1


def test_a_choice_still_waiting_at_its_deadline_expires(make_loop):
    now = [1000.0]
    engine = EngineDouble(slots=1, step=0.002)
    loop = make_loop(engine, clock=lambda: now[0])
    running, late = choice(1, max_tokens=100_000), choice(2, deadline=1005.0)
    loop.submit(running)
    loop.submit(late)
    assert isinstance(running.out.get(timeout=5), Delta)
    now[0] = 1006.0
    assert isinstance(drain(late)[1], RequestExpired)
    loop.cancel(running)
    assert drain(running)[1].finish_reason == "cancelled"


def test_past_the_jobs_time_budget_running_and_waiting_choices_end_with_length(make_loop):
    now = [1000.0]
    engine = EngineDouble(slots=1, step=0.002)
    loop = make_loop(engine, clock=lambda: now[0])
    running = choice(1, max_tokens=100_000, stop_by=1010.0)
    waiting = choice(2, index=1, stop_by=1010.0)
    loop.submit(running)
    loop.submit(waiting)
    assert isinstance(running.out.get(timeout=5), Delta)
    now[0] = 1011.0
    text, fin, _ = drain(running)
    assert fin.finish_reason == "length" and 0 < fin.completion_tokens < 100_000
    assert drain(waiting)[1] == Finish(1, "length", 0)
    assert len(engine.chains) == 1  # the waiting one never took a slot


def test_a_decode_failure_fails_the_running_choices_and_clears_the_context(make_loop):
    engine = EngineDouble(slots=2, step=0.002)
    loop = make_loop(engine)
    a, b = choice(1, max_tokens=100_000), choice(2, max_tokens=100_000)
    loop.submit(a)
    loop.submit(b)
    for c in (a, b):
        assert isinstance(c.out.get(timeout=5), Delta)
    engine.fail_next = True
    for c in (a, b):
        assert isinstance(drain(c)[1], GenerationFailed)
    assert None in engine.clears and loop.failures == 1
    assert all(ch.closed for ch in engine.chains)
    after = choice(3, max_tokens=4)  # the loop goes on serving
    loop.submit(after)
    assert drain(after)[0] == "aaaa"


def test_a_sampling_failure_fails_that_choice_only(make_loop):
    engine = EngineDouble({1: [1, 1, None], 2: [2] * 6 + [EOS]}, slots=2)
    loop = make_loop(engine)
    broken, fine = choice(1), choice(2)
    loop.submit(broken)
    loop.submit(fine)
    text, end, _ = drain(broken)
    assert text == "aa" and isinstance(end, GenerationFailed)
    assert drain(fine)[:2] == ("bbbbbb", Finish(0, "stop", 6))
    assert loop.failures == 0 and all(ch.closed for ch in engine.chains)


def test_echo_with_logprobs_opens_the_choice_with_every_prompt_token(make_loop):
    engine = EngineDouble(slots=1, n_batch=4)
    loop = make_loop(engine)
    c = choice(1, prompt=[3, 4, 5, 1, 2, 3], max_tokens=2, echo="c .abc", top_logprobs=1)
    loop.submit(c)
    text, fin, items = drain(c)
    echo = items[0]
    assert echo.prompt and echo.text == "c .abc" and echo.tokens == 0
    assert [e["token"] for e in echo.logprobs] == ["c", " ", ".", "a", "b", "c"]
    assert echo.logprobs[0]["logprob"] is None
    assert all(e["logprob"] <= 0 for e in echo.logprobs[1:])
    # Every prompt token asked for logits.
    assert all(r.logits for call in engine.calls if call[0].pos < 6 for r in call)
    assert text == "aa" and fin == Finish(0, "length", 2)
    deltas = [i for i in items[1:] if isinstance(i, Delta)]
    assert [e["token"] for d in deltas for e in d.logprobs] == ["a", "a"]


def test_max_tokens_zero_echoes_without_decoding(make_loop):
    engine = EngineDouble(slots=1)
    loop = make_loop(engine)
    c = choice(1, max_tokens=0, echo="abc")
    loop.submit(c)
    _, fin, items = drain(c)
    assert items[0] == Delta(0, "abc", tokens=0, prompt=True) and fin == Finish(0, "length", 0)
    assert engine.calls == []


def test_a_stop_string_ends_the_choice_and_frees_its_slot(make_loop):
    engine = EngineDouble({1: [1, 2, 3, 4, 1, 1]}, slots=1)
    loop = make_loop(engine, reuse=False)  # released sequences are cleared
    c = choice(1, stop=["c "])
    loop.submit(c)
    text, fin, _ = drain(c)
    assert text == "ab" and fin == Finish(0, "stop", 4, stop_sequence="c ")
    assert engine.clears == [0]


def test_shutdown_fails_running_and_waiting_choices():
    engine = EngineDouble(slots=1, step=0.002)
    loop = BatchLoop(engine, idle_wait=0.02).start()
    running, waiting = choice(1, max_tokens=100_000), choice(2)
    loop.submit(running)
    loop.submit(waiting)
    assert isinstance(running.out.get(timeout=5), Delta)
    loop.close()
    for c in (running, waiting):
        assert isinstance(drain(c)[1], GenerationFailed)
    with pytest.raises(queue.Empty):
        waiting.out.get_nowait()


@pytest.mark.parametrize("options,pool", [
    ({}, ("threads", 6)),
    ({"parallel": 8}, ("threads", 10)),
    ({"parallel": 1}, ("solo", 1)),
])
def test_worker_pool_follows_parallel(options, pool):
    from config.settings import ModelEntry
    from models.llama_cpp import LlamaCppBackend

    entry = ModelEntry(name="m", backend="llama_cpp", weights="m.gguf", options=options)
    assert LlamaCppBackend.worker_pool(entry) == pool


def test_parallel_must_be_positive():
    from pydantic import ValidationError

    from models.llama_cpp import LlamaCppOptions

    with pytest.raises(ValidationError):
        LlamaCppOptions(parallel=0)


# --- prompt prefix reuse ------------------------------------------------------------------


def test_a_second_turn_keeps_the_first_turns_cache_and_evaluates_only_its_suffix(make_loop):
    engine = EngineDouble({1: [1, 2, EOS], 2: [3, EOS]}, slots=2, n_batch=16)
    loop = make_loop(engine)
    first = choice(1, prompt=[5, 4, 3])
    loop.submit(first)
    assert drain(first)[0] == "ab"
    # Its sequence holds its prompt and the tokens it decoded (EOS, sampled last, never was).
    assert engine.kv[0] == [5, 4, 3, 1, 2]
    n = len(engine.calls)
    second = choice(2, prompt=[5, 4, 3, 1, 2, 4, 4])
    loop.submit(second)
    assert drain(second)[0] == "c"
    assert [r.pos for r in engine.calls[n]] == [5, 6] and engine.calls[n][0].seq == 0
    assert (second.cached, second.evaluated) == (5, 2)
    assert engine.kv[0][:7] == second.prompt and engine.clears == []


def test_a_repeated_prompt_still_evaluates_its_last_token(make_loop):
    engine = EngineDouble({1: [1, EOS], 2: [1, EOS]}, slots=1)
    loop = make_loop(engine)
    a, b = choice(1, prompt=[3, 4, 5]), choice(2, prompt=[3, 4, 5])
    loop.submit(a)
    drain(a)
    n = len(engine.calls)
    loop.submit(b)
    assert drain(b)[0] == "a"
    assert [(r.pos, r.token, r.logits) for r in engine.calls[n]] == [(2, 5, True)]
    assert (b.cached, b.evaluated) == (2, 1)


def test_a_diverging_prompt_cuts_the_cache_where_it_differs(make_loop):
    engine = EngineDouble({1: [1, 1, EOS]}, slots=1)
    loop = make_loop(engine)
    a, b = choice(1, prompt=[3, 4, 5, 2]), choice(2, prompt=[3, 4, 2, 2])
    loop.submit(a)
    drain(a)
    n = len(engine.calls)
    loop.submit(b)
    drain(b)
    assert [r.pos for r in engine.calls[n]] == [2, 3] and b.cached == 2
    assert engine.kv[0][:4] == [3, 4, 2, 2]


def test_a_new_choice_takes_the_sequence_holding_its_prefix_not_the_lowest_id(make_loop):
    engine = EngineDouble({1: [1, EOS], 2: [1, EOS], 3: [1, EOS]}, slots=2)
    loop = make_loop(engine)
    a, b = choice(1, prompt=[1, 1, 1]), choice(2, prompt=[2, 2, 2])
    loop.submit_all([a, b])
    drain(a), drain(b)
    n = len(engine.calls)
    c = choice(3, prompt=[2, 2, 2, 1, 3])
    loop.submit(c)
    drain(c)
    assert engine.calls[n][0].seq == 1 and c.cached == 4


def test_with_reuse_off_every_prompt_is_evaluated_whole(make_loop):
    engine = EngineDouble({1: [1, 2, EOS], 2: [3, EOS]}, slots=2)
    loop = make_loop(engine, reuse=False)
    first, second = choice(1, prompt=[5, 4, 3]), choice(2, prompt=[5, 4, 3, 1, 2, 4])
    loop.submit(first)
    drain(first)
    n = len(engine.calls)
    loop.submit(second)
    drain(second)
    assert [r.pos for r in engine.calls[n]] == list(range(6))
    assert (second.cached, second.evaluated) == (0, 6) and engine.clears == [0, 0]


def test_n_choices_of_one_prompt_evaluate_it_once_and_copy_the_cache(make_loop):
    plans = {1: [1, 1, EOS], 2: [2, 2, 2, EOS], 3: [3, EOS]}
    engine = EngineDouble(plans, slots=4, n_batch=4)
    loop = make_loop(engine)
    prompt = list(range(1, 6)) * 2
    cs = [choice(seed, index=i, prompt=prompt) for i, seed in enumerate((1, 2, 3))]
    loop.submit_all(cs)
    assert [drain(c)[0] for c in cs] == ["aa", "bbb", "c"]
    # One evaluation of the prompt, in n_batch chunks (decode steps ask logits of every row).
    prompt_calls = [call for call in engine.calls if not all(r.logits for r in call)]
    assert [[(r.seq, r.pos) for r in call] for call in prompt_calls] == [
        [(0, 0), (0, 1), (0, 2), (0, 3)], [(0, 4), (0, 5), (0, 6), (0, 7)], [(0, 8), (0, 9)]]
    assert engine.copies == [(0, 1), (0, 2)]
    assert [(c.cached, c.evaluated) for c in cs] == [(0, 10), (10, 0), (10, 0)]
    # Each follower decoded its own tokens after its copy of the prompt.
    assert engine.kv[1] == prompt + [2, 2, 2] and engine.kv[2] == prompt + [3]


def test_a_follower_whose_leader_is_cancelled_evaluates_the_prompt_itself(make_loop):
    engine = EngineDouble({2: [2, 2, EOS]}, slots=2, n_batch=2, step=0.01)
    loop = make_loop(engine)
    prompt = list(range(1, 5)) * 5
    leader, follower = choice(1, prompt=prompt), choice(2, index=1, prompt=prompt)
    loop.submit_all([leader, follower])
    deadline = time.monotonic() + 5
    while not engine.calls:  # the leader is evaluating the prompt, the follower waits
        assert time.monotonic() < deadline
        time.sleep(0.001)
    loop.cancel(leader)
    assert drain(leader)[1].finish_reason == "cancelled"
    assert drain(follower)[0] == "bb"
    assert (follower.cached, follower.evaluated) == (0, len(prompt)) and engine.copies == []
    assert engine.kv[1][:len(prompt)] == prompt


def test_a_decode_failure_forgets_every_kept_cache(make_loop):
    engine = EngineDouble({1: [1, EOS]}, slots=1)
    loop = make_loop(engine)
    a = choice(1, prompt=[1, 2, 3])
    loop.submit(a)
    drain(a)
    engine.fail_next = True
    b = choice(2, prompt=[1, 2, 3, 4])
    loop.submit(b)
    assert isinstance(drain(b)[1], GenerationFailed)
    c = choice(3, prompt=[1, 2, 3, 4], max_tokens=2)
    loop.submit(c)
    assert drain(c)[0] == "aa" and c.cached == 0


SYSTEM = list(range(1, 5)) * 6  # a 24-token prefix several prompts share


def prompt_positions(engine: EngineDouble, seq: int) -> list[int]:
    """Positions ``seq`` was fed in prompt calls (decode steps ask every row's logits)."""
    return [r.pos for call in engine.calls if not all(r.logits for r in call)
            for r in call if r.seq == seq]


def test_prompts_starting_alike_evaluate_their_shared_prefix_once(make_loop):
    engine = EngineDouble({1: [1, EOS], 2: [2, EOS]}, slots=2, n_batch=8)
    loop = make_loop(engine)
    a, b = choice(1, prompt=SYSTEM + [1, 1]), choice(2, prompt=SYSTEM + [3, 3, 3])
    loop.submit_all([a, b])
    assert (drain(a)[0], drain(b)[0]) == ("a", "b")
    # b waited for a to evaluate the prefix, got a copy, and evaluated only its own tail.
    assert engine.copies == [(0, 1)]
    assert prompt_positions(engine, 1) == [24, 25, 26]
    assert (b.cached, b.evaluated) == (24, 3) and (a.cached, a.evaluated) == (0, 26)
    assert engine.kv[1][:27] == b.prompt


def test_a_short_shared_prefix_is_evaluated_twice_rather_than_waited_for(make_loop):
    engine = EngineDouble(slots=2, n_batch=8)
    loop = make_loop(engine)
    a, b = choice(1, prompt=[1, 2, 3, 4, 5], max_tokens=1), \
        choice(2, prompt=[1, 2, 3, 4, 1], max_tokens=1)
    loop.submit_all([a, b])
    drain(a), drain(b)
    assert engine.copies == [] and prompt_positions(engine, 1) == [0, 1, 2, 3, 4]


def test_a_new_prompt_copies_the_prefix_of_a_running_choice(make_loop):
    engine = EngineDouble({1: [1] * 200}, slots=2, n_batch=32, step=0.002)
    loop = make_loop(engine)
    running = choice(1, prompt=SYSTEM, max_tokens=300)
    loop.submit(running)
    assert isinstance(running.out.get(timeout=5), Delta)
    late = choice(2, prompt=SYSTEM + [5], max_tokens=2)
    loop.submit(late)
    assert drain(late)[0] == "aa"
    assert engine.copies == [(0, 1)] and (late.cached, late.evaluated) == (24, 1)
    loop.cancel(running)
    drain(running)


def test_a_follower_copies_the_prefix_of_a_leader_that_ended_at_once(make_loop):
    engine = EngineDouble(slots=2, n_batch=32)
    loop = make_loop(engine)
    a, b = choice(1, prompt=SYSTEM + [1], max_tokens=1), choice(2, prompt=SYSTEM + [2, 2])
    loop.submit_all([a, b])
    drain(a)
    assert drain(b)[1].finish_reason == "length"
    assert engine.copies == [(0, 1)] and b.cached == 24 and prompt_positions(engine, 1) == [24, 25]
