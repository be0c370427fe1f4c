"""The logic under /v1/jobs that needs no services: event ordering across the replay buffer
and live delivery, job records, result bodies."""

from __future__ import annotations

import pytest

from tasks.jobs.record import JobRecord
from tasks.jobs.shapes import Outcome, ResponseSpec
from models import events
from web.job_events import EventsLost, Follower


def batch(first: int, n: int, done: bool = False) -> tuple[int, list[events.Event]]:
    evs: list[events.Event] = [events.Delta(0, f"<{first + i}>") for i in range(n)]
    if done:
        evs[-1] = events.Done(1, first + n - 1)
    return first, evs


class Buffer:
    """Stands in for the store's replay buffer (messages as the worker appended them)."""

    def __init__(self, *messages):
        self.messages = list(messages)

    def replay(self, job_id, after):
        for first, evs in self.messages:
            for seq, ev in enumerate(evs, start=first):
                if seq > after:
                    yield seq, ev

    def get(self, job_id, *, owner):
        return None


class Tap:
    def __init__(self, *items):
        self.items = list(items)

    def next(self, timeout=None):
        return self.items.pop(0) if self.items else None


def follow(buffer, tap, after=-1):
    """The sequence numbers the follower sends."""
    return [item[0] for item in Follower(buffer, tap, "job", after).events() if item is not None]


def test_events_in_both_buffer_and_live_are_sent_once():
    # Subscribed, then read the buffer (0-2); live messages overlap it (1-3), then go on.
    buffer = Buffer(batch(0, 3))
    tap = Tap(batch(1, 3), batch(4, 2, done=True))
    assert follow(buffer, tap) == [0, 1, 2, 3, 4, 5]


def test_a_live_gap_is_filled_from_the_buffer():
    buffer = Buffer(batch(0, 2))
    tap = Tap(batch(5, 2, done=True))
    # By the time message 5-6 arrives, the buffer holds what the tap missed.
    buffer.messages += [batch(2, 3), batch(5, 2, done=True)]
    assert follow(buffer, tap) == list(range(7))


def test_resume_after_last_event_id():
    buffer = Buffer(batch(0, 4), batch(4, 2, done=True))
    assert follow(buffer, Tap(), after=2) == [3, 4, 5]
    assert follow(buffer, Tap(), after=4) == [5]


def test_trimmed_events_are_reported_not_skipped():
    buffer = Buffer(batch(3, 3, done=True))  # 0-2 were trimmed
    with pytest.raises(EventsLost):
        follow(buffer, Tap())
    assert follow(buffer, Tap(), after=3) == [4, 5]


def test_an_ended_job_without_its_last_event_is_reported():
    # The job is over (the stub store has no record) but the buffer lost its end.
    with pytest.raises(EventsLost):
        follow(Buffer(batch(0, 2)), Tap())


def test_record_roundtrip_and_public_object():
    rec = JobRecord(id="cmpl-1", endpoint="/v1/completions", model="m", queue="ferry.m",
                    status="completed", spec=ResponseSpec(endpoint="/v1/completions", logprobs=True),
                    created=100.5, deadline=200.0, retained_until=300.0, started=101.2,
                    finished=102.9, result={"choices": []})
    raw = {k.encode(): v.encode() for k, v in rec.to_hash().items()}
    assert JobRecord.from_hash(raw) == rec
    public = rec.public(queue_position=3)
    assert public["created_at"] == 100 and public["finished_at"] == 102
    assert public["queue_position"] is None, "only queued jobs have a position"
    assert public["status"] == "completed" and public["result"] == {"choices": []}


def test_outcome_spells_the_endpoint_body():
    outcome = Outcome()
    for ev in (events.Started("w", 2), events.Delta(0, "Hi", prompt=True),
               events.Delta(0, " there"), events.Finish(0, "cancelled", 1), events.Done(2, 1)):
        outcome.add(ev)
    assert outcome.cancelled
    spec = ResponseSpec(endpoint="/v1/completions")
    body = outcome.body(spec.shape("cmpl-1", "m", 100))
    assert body["choices"] == [{"text": "Hi there", "index": 0, "logprobs": None,
                                "finish_reason": "stop"}]
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    assert body["created"] == 100 and body["object"] == "text_completion"
