"""Several jobs read as one subscription: a completions request with several prompts.

One job per prompt, so the prompts run in parallel on whatever workers are free. Their
events are read prompt after prompt, which keeps choices in OpenAI's prompt-major order:
choice ``i`` of prompt ``p`` becomes index ``p * per_prompt + i``. The first ``Started`` and
one final ``Done`` (usage summed over the prompts) are passed on; a ``Failed`` from any job
ends the whole response, and the jobs not yet finished are then cancelled.
"""

from __future__ import annotations

import dataclasses

from models import events
from web.relay import Subscription


class MergedSubscription:
    def __init__(self, request_id: str, subs: list[Subscription], per_prompt: int):
        self.subs, self.per_prompt = subs, per_prompt
        self.job_id = request_id
        self._current = 0
        self._started = False
        self._usage = events.Done(0, 0, evaluated_tokens=0)

    def next(self, timeout: float | None = None) -> events.Event | None:
        while True:
            ev = self.subs[self._current].next(timeout)
            if ev is None or isinstance(ev, events.Failed):
                return ev
            if isinstance(ev, events.Started):
                if self._started:
                    continue
                self._started = True
                return ev
            if isinstance(ev, events.Done):
                u = self._usage
                self._usage = events.Done(u.prompt_tokens + ev.prompt_tokens,
                                          u.completion_tokens + ev.completion_tokens,
                                          u.cached_tokens + ev.cached_tokens,
                                          u.evaluated_tokens + ev.prompt_evaluated)
                self._current += 1
                if self._current == len(self.subs):
                    return self._usage
                continue
            return dataclasses.replace(ev, index=self._current * self.per_prompt + ev.index)

    def pending(self) -> int:
        return self.subs[min(self._current, len(self.subs) - 1)].pending()

    def cancel(self) -> None:
        for sub in self.subs:
            sub.cancel()

    def close(self) -> None:
        for sub in self.subs:
            if not sub.finished:
                sub.cancel()
            sub.close()
