"""The ExLlamaV2 batching loop's scheduling, against a generator double (no GPU here)."""

from __future__ import annotations

import queue
import time

import pytest

from config.errors import ContextLengthExceeded, GenerationFailed, RequestExpired
from config.contract.events import Delta, Finish
from models.exllamav2.loop import BatchLoop, Ticket
from models.exllamav2.results import ChoiceStream
from models.exllamav2.sampling import settings_fields
from models.exllamav2.spec import JobSpec
from config.contract.job import Sampling
from tests.exl2_doubles import EngineDouble

VOCAB = ["<eos>", "a", "b", "c", " ", "."]
EOS = 0
# Long enough to be cancelled mid-way at one step per 2-5 ms, short enough that two such
# jobs fit the double's default cache (4096 tokens = 16 pages) at once.
LONG = 2000


def by_seed(plans: dict[int, list[int]]):
    """Job with seed s "samples" plans[s]; unknown seeds sample 'a' for ever."""
    return lambda job: plans.get(job.seed, [1] * 100_000)


def spec(seed: int, max_new: int = 50, prompt=(1, 2, 3)) -> JobSpec:
    return JobSpec(input_ids=tuple(prompt), max_new_tokens=max_new,
                   settings=settings_fields(Sampling(temperature=0), None), seed=seed,
                   stop_conditions=(EOS,))


def ticket(seed: int, index: int = 0, **kw) -> Ticket:
    deadline, stop_by = kw.pop("deadline", None), kw.pop("stop_by", None)
    return Ticket(spec(seed, **kw), ChoiceStream(index), deadline=deadline, stop_by=stop_by)


def drain(t: Ticket, timeout: float = 10.0) -> tuple[str, object]:
    """(text, final item) of a ticket: its Deltas' text and its Finish or error."""
    text, end = "", time.monotonic() + timeout
    while True:
        item = t.out.get(timeout=max(0.01, end - time.monotonic()))
        if isinstance(item, Delta):
            text += item.text
        else:
            return text, item


def first_delta(t: Ticket, timeout: float = 10.0) -> Delta:
    item = t.out.get(timeout=timeout)
    assert isinstance(item, Delta), item
    return item


@pytest.fixture
def make_loop():
    loops = []

    def make(engine, **kw):
        loop = BatchLoop(engine, idle_wait=0.05, **kw).start()
        loops.append(loop)
        return loop

    yield make
    for loop in loops:
        loop.close()


def test_jobs_are_decoded_together(make_loop):
    engine = EngineDouble(VOCAB, by_seed({1: [1, 1, 1, EOS], 2: [2, 2, EOS], 3: [3, 4, 3, 5, EOS]}))
    loop = make_loop(engine)
    tickets = [ticket(1), ticket(2), ticket(3)]
    for t in tickets:
        loop.submit(t)
    results = [drain(t) for t in tickets]
    assert [text for text, _ in results] == ["aaa", "bb", "c c."]
    assert [(f.finish_reason, f.completion_tokens) for _, f in results] == [
        ("stop", 3), ("stop", 2), ("stop", 4)]
    steps = engine.generators[0].decode_steps
    assert any(len(step) == 3 for step in steps), steps  # one step decoded all three


def test_batch_size_caps_running_jobs(make_loop):
    engine = EngineDouble(VOCAB, by_seed({1: [1] * 5 + [EOS], 2: [2] * 5 + [EOS], 3: [3, EOS]}),
                          max_batch_size=2)
    loop = make_loop(engine)
    tickets = [ticket(1), ticket(2), ticket(3)]
    for t in tickets:
        loop.submit(t)
    assert [drain(t)[0] for t in tickets] == ["aaaaa", "bbbbb", "c"]
    steps = engine.generators[0].decode_steps
    assert max(len(s) for s in steps) == 2
    third = tickets[2].key
    first_third = next(i for i, s in enumerate(steps) if third in s)
    assert all(tickets[0].key not in s or tickets[1].key not in s for s in steps[first_third:])


def test_max_new_tokens_finishes_with_length(make_loop):
    loop = make_loop(EngineDouble(VOCAB, by_seed({})))
    t = ticket(9, max_new=4)
    loop.submit(t)
    text, fin = drain(t)
    assert text == "aaaa" and fin == Finish(0, "length", 4)


def test_cancel_running_job_stops_it_and_sends_the_final_event(make_loop):
    engine = EngineDouble(VOCAB, by_seed({}), step=0.005)
    loop = make_loop(engine)
    running, other = ticket(1, max_new=LONG), ticket(2, index=1, max_new=LONG)
    loop.submit(running)
    loop.submit(other)
    first_delta(running)
    loop.cancel(running)
    text, fin = drain(running)
    assert isinstance(fin, Finish) and fin.finish_reason == "cancelled"
    assert fin.completion_tokens >= 1
    assert running.job in engine.generators[0].cancelled
    # Nothing more arrives for it, and the other job keeps going.
    first_delta(other)
    with pytest.raises(queue.Empty):
        running.out.get(timeout=0.1)
    loop.cancel(other)
    assert drain(other)[1].finish_reason == "cancelled"


def test_cancel_queued_job_never_starts_it(make_loop):
    engine = EngineDouble(VOCAB, by_seed({}), step=0.005, max_batch_size=1)
    loop = make_loop(engine)
    running, queued = ticket(1, max_new=LONG), ticket(2, max_new=LONG)
    loop.submit(running)
    loop.submit(queued)
    first_delta(running)
    loop.cancel(queued)
    assert drain(queued) == ("", Finish(0, "cancelled", 0))
    gen = engine.generators[0]
    assert queued.job in gen.cancelled and queued.job not in gen.pending
    assert all(queued.key not in step for step in gen.decode_steps)
    loop.cancel(running)
    drain(running)


def test_queued_job_past_its_deadline_fails_running_job_does_not(make_loop):
    now = [1000.0]
    engine = EngineDouble(VOCAB, by_seed({}), step=0.005, max_batch_size=1)
    loop = make_loop(engine, clock=lambda: now[0])
    running = ticket(1, max_new=LONG, deadline=1010.0)
    queued = ticket(2, max_new=LONG, deadline=1010.0)
    loop.submit(running)
    loop.submit(queued)
    first_delta(running)
    now[0] = 1011.0
    text, err = drain(queued)
    assert text == "" and isinstance(err, RequestExpired) and err.status == 408
    assert queued.job in engine.generators[0].cancelled
    # The running job had started: its deadline only bounded the wait.
    first_delta(running)
    loop.cancel(running)
    assert drain(running)[1].finish_reason == "cancelled"


def test_jobs_past_their_time_budget_end_with_length(make_loop):
    now = [1000.0]
    engine = EngineDouble(VOCAB, by_seed({}), step=0.005, max_batch_size=1)
    loop = make_loop(engine, clock=lambda: now[0])
    running = ticket(1, max_new=LONG, stop_by=1010.0)
    queued = ticket(2, max_new=LONG, stop_by=1010.0)
    loop.submit(running)
    loop.submit(queued)
    first_delta(running)
    now[0] = 1011.0
    text, fin = drain(running)
    assert fin.finish_reason == "length" and 0 < fin.completion_tokens < LONG
    assert drain(queued) == ("", Finish(0, "length", 0))
    assert {running.job, queued.job} <= set(engine.generators[0].cancelled)


def test_iterate_raising_fails_every_live_job_and_rebuilds(make_loop):
    engine = EngineDouble(VOCAB, by_seed({}), step=0.002)
    loop = make_loop(engine)
    first = engine.generators[0]
    first.fail_on_iterate = 5
    tickets = [ticket(1, max_new=LONG), ticket(2, max_new=LONG)]
    for t in tickets:
        loop.submit(t)
    for t in tickets:
        _, err = drain(t)
        assert isinstance(err, GenerationFailed) and err.status == 500
    assert len(engine.generators) == 2 and loop.rebuilds == 1
    # The rebuilt generator serves new jobs.
    after = ticket(7, max_new=3)
    loop.submit(after)
    assert drain(after) == ("aaa", Finish(0, "length", 3))
    assert any(after.key in step for step in engine.generators[1].decode_steps)


def test_job_too_large_for_the_cache_is_refused(make_loop):
    loop = make_loop(EngineDouble(VOCAB, by_seed({}), cache_tokens=512))
    t = ticket(1, max_new=600)
    loop.submit(t)
    _, err = drain(t)
    assert isinstance(err, ContextLengthExceeded) and err.status == 400


def test_penalty_window_follows_generated_tokens(make_loop):
    engine = EngineDouble(VOCAB, by_seed({}), step=0.002)
    loop = make_loop(engine)
    t = ticket(1, max_new=LONG)
    assert t.spec.settings["token_repetition_range"] == 0  # the prompt is never penalised
    loop.submit(t)
    for _ in range(5):
        first_delta(t)
    loop.cancel(t)
    drain(t)
    # The window was widened after every step to exactly the tokens generated so far.
    assert t.job.gen_settings.token_repetition_range == t.job.new_tokens >= 5


def test_close_fails_live_jobs(make_loop):
    engine = EngineDouble(VOCAB, by_seed({}), step=0.005)
    loop = BatchLoop(engine, idle_wait=0.05).start()
    t = ticket(1, max_new=LONG)
    loop.submit(t)
    first_delta(t)
    loop.close()
    _, err = drain(t)
    assert isinstance(err, GenerationFailed)


def test_calls_run_on_the_loop_thread_between_steps_and_keep_their_errors(make_loop):
    import threading

    engine = EngineDouble(VOCAB, by_seed({}), step=0.002)
    loop = make_loop(engine)
    running = ticket(1, max_new=LONG)
    loop.submit(running)
    first_delta(running)
    assert loop.call(lambda: threading.current_thread().name).result(5) == "exl2-loop"

    def broken():
        raise AssertionError("Input image exceeds maximum size")

    with pytest.raises(AssertionError, match="maximum size"):
        loop.call(broken).result(5)
    # The caller's error is not the generator's: the running job goes on, nothing rebuilt.
    assert isinstance(first_delta(running), Delta) and len(engine.generators) == 1
    loop.cancel(running)
    assert drain(running)[1].finish_reason == "cancelled"
