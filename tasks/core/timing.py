"""Token timings as a client sees them (queueing included), observed by the relay as each
request's events arrive; exported at the web's GET /metrics (``web/metrics.py``)."""

from __future__ import annotations

import bisect
import time

from prometheus_client import Counter, Gauge, Histogram

from config.contract import events

TTFT = Histogram("ferry_time_to_first_token_seconds", "From enqueue to the first token",
                 ["model"], buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
ITL = Histogram("ferry_inter_token_latency_seconds", "Between token deliveries to a request",
                ["model"], buckets=(.001, .0025, .005, .01, .02, .04, .08, .16, .32, .64, 1.5))
TOKENS = Counter("ferry_tokens_generated", "Completion tokens generated", ["model"])
# source="evaluated": prompt tokens the model evaluated (a prompt shared by n choices once);
# source="cached": prompt tokens read from its prefix cache instead (usage cached_tokens).
PROMPT_TOKENS = Counter("ferry_prompt_tokens", "Prompt tokens of generation requests, "
                        "evaluated or read from the prefix cache", ["model", "source"])
# route="worker": sent to the worker holding the prompt's prefix (reason "hit"); "shared":
# to the model's queue, with why (miss, dead, busy, single, off, unkeyed: tasks/routing.py).
ROUTED = Counter("ferry_routed", "Generation and embedding jobs by the queue they were sent "
                 "to", ["model", "route", "reason"])
ACTIVE = Gauge("ferry_active_requests", "Requests waiting for or receiving tokens",
               multiprocess_mode="livesum")


class Timing:
    """Observes one request's token timings as its events arrive (see tasks/core/relay.py).

    The inter-token gaps are counted into the histogram's buckets here and added to it every
    ``FLUSH_EVERY`` gaps and when the request closes: one ``observe`` per token costs ~4 µs
    (in multiprocess mode each writes the sum and a bucket to a shared file), a bucket count
    here 0.2. The histogram's counts are those of per-gap observes, arriving later."""

    # Gaps held before they are added: a long stream still shows in /metrics as it runs.
    FLUSH_EVERY = 200

    def __init__(self, model: str):
        self.model, self.start, self.last = model, time.monotonic(), None
        self._itl = None
        ACTIVE.inc()

    def tokens(self) -> None:
        now = time.monotonic()
        if self.last is None:
            TTFT.labels(self.model).observe(now - self.start)
            self._itl = _Gaps(ITL.labels(self.model))  # labels() once: it costs an observe
        else:
            itl = self._itl
            itl.add(now - self.last)
            if len(itl.held) >= self.FLUSH_EVERY:
                itl.flush()
        self.last = now

    def done(self, usage: events.Done) -> None:
        TOKENS.labels(self.model).inc(usage.completion_tokens)
        PROMPT_TOKENS.labels(self.model, "evaluated").inc(usage.prompt_evaluated)
        PROMPT_TOKENS.labels(self.model, "cached").inc(usage.cached_tokens)

    def close(self) -> None:
        if self._itl is not None:
            self._itl.flush()
        ACTIVE.dec()


class _Gaps:
    """Observations of one histogram child held, then counted per bucket and added to it by
    ``flush``. Uses the child's ``_upper_bounds``, ``_buckets`` and ``_sum``, which its own
    ``observe`` updates the same way (prometheus_client has no observe-many);
    tests/test_timing_units.py holds the result to that of one ``observe`` per value.
    ``add`` is the held list's own ``append``: per token, no Python call."""

    def __init__(self, child):
        self.child, self.bounds = child, child._upper_bounds
        self.held: list[float] = []
        self.add = self.held.append

    def flush(self) -> None:
        if not self.held:
            return
        counts = [0] * len(self.bounds)
        for value in self.held:
            counts[bisect.bisect_left(self.bounds, value)] += 1
        for i, n in enumerate(counts):
            if n:
                self.child._buckets[i].inc(n)
        self.child._sum.inc(sum(self.held))
        self.held.clear()
