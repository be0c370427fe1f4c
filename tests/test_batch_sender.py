"""GroupingSender (tasks/batch_sender.py): a batch worker's embedding jobs, one message each
group, every sender still waiting for (and seeing the errors of) its own send."""

from __future__ import annotations

import gevent

from tasks.batch_sender import GroupingSender
from tasks.protocol import EMBED_MANY_TASK, EMBED_TASK, GENERATE_TASK


class FakeCelery:
    def __init__(self, fail: bool = False):
        self.sent: list[tuple[str, list, dict]] = []
        self.fail = fail

    def send_task(self, name, args=None, **options):
        if self.fail:
            raise ConnectionError("broker down")
        self.sent.append((name, args, options))


def send_all(sender, jobs, name=EMBED_TASK, queue="ferry.m", priority=9):
    def one(job):
        try:
            sender.send_task(name, args=[job], queue=queue, priority=priority, task_id=job["id"],
                             expires=60)
            return "sent"
        except ConnectionError as e:
            return str(e)

    greenlets = [gevent.spawn(one, j) for j in jobs]
    gevent.joinall(greenlets, timeout=5)
    return [g.value for g in greenlets]


def test_embedding_jobs_sent_together_leave_as_one_message():
    celery = FakeCelery()
    jobs = [{"id": f"j{i}"} for i in range(5)]
    assert send_all(GroupingSender(celery, window=0.01), jobs) == ["sent"] * 5
    [(name, args, options)] = celery.sent
    assert name == EMBED_MANY_TASK and args == [jobs]
    assert options["queue"] == "ferry.m" and options["priority"] == 9 and options["expires"] == 60


def test_groups_are_capped_and_other_tasks_pass_through():
    celery = FakeCelery()
    sender = GroupingSender(celery, window=0.01, max_jobs=2)
    send_all(sender, [{"id": f"j{i}"} for i in range(5)])
    assert [len(args[0]) for _, args, _ in celery.sent] == [2, 2, 1]
    celery.sent.clear()
    send_all(sender, [{"id": "g"}], name=GENERATE_TASK)
    assert celery.sent == [(GENERATE_TASK, [{"id": "g"}],
                            {"queue": "ferry.m", "priority": 9, "task_id": "g", "expires": 60})]


def test_a_failed_send_fails_every_job_in_it():
    results = send_all(GroupingSender(FakeCelery(fail=True), window=0.01),
                       [{"id": "a"}, {"id": "b"}])
    assert results == ["broker down", "broker down"]
