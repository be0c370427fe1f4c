"""Sends the embedding jobs of a batch worker's lines to their model queue in groups.

Every batch line runs through Ferry's own handlers (``tasks/batch_lines.py``), and each
embeddings line would be one Celery message; a model worker's consumer takes a few hundred
messages a second, fewer than the model embeds short sentences. So in the batch worker this
stands in for the in-process app's Celery app: embedding jobs sent to one queue within
``window`` seconds of each other leave as one ``embed_many`` message (``tasks/embedding.py``).
Nothing else changes: each job keeps its id, events and errors, and each sender returns
once its message is sent, or raises its error, as a direct send would.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import gevent
import gevent.event
from celery import Celery

from tasks.protocol import EMBED_MANY_TASK, EMBED_TASK


@dataclass
class _Group:
    options: dict[str, Any]
    jobs: list[dict] = field(default_factory=list)
    sent: gevent.event.Event = field(default_factory=gevent.event.Event)
    error: Exception | None = None


class GroupingSender:
    def __init__(self, celery: Celery, *, window: float = 0.005, max_jobs: int = 256):
        self._celery, self.window, self.max_jobs = celery, window, max_jobs
        self._open: dict[tuple, _Group] = {}

    def send_task(self, name: str, args=None, *, queue: str, priority: int | None = None,
                  task_id: str | None = None, **options: Any) -> None:
        if name != EMBED_TASK:
            self._celery.send_task(name, args=args, queue=queue, priority=priority,
                                   task_id=task_id, **options)
            return
        key = (queue, priority)
        group = self._open.get(key)
        if group is None:
            group = self._open[key] = _Group({"queue": queue, "priority": priority, **options})
            gevent.spawn_later(self.window, self._send, key, group)
        group.jobs.append(args[0])
        if len(group.jobs) >= self.max_jobs:
            self._send(key, group)
        group.sent.wait()
        if group.error is not None:
            raise group.error

    def _send(self, key: tuple, group: _Group) -> None:
        if self._open.get(key) is not group:
            return  # already sent (full before its window ended)
        del self._open[key]
        try:
            self._celery.send_task(EMBED_MANY_TASK, args=[group.jobs],
                                   task_id=f"embm-{uuid.uuid4().hex}", **group.options)
        except Exception as e:
            group.error = e
        group.sent.set()
