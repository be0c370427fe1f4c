"""Benchmark 11, the hand-over from a batching loop: a GPU engine makes one token for each of
its jobs every step, on its own thread, and each token must reach the publisher. Before, the
loop queued every token and each job's task thread woke to take it (``pull``); then the loop
handed each delta over itself (``models.output.Outbox``), and a task thread woke for its
choices' finishes and every 50 ms to look at its cancel (``polled``); now it sleeps until
its finish or its cancel (``direct``, ``models.base.CancelFlag``).

Ferry's own parts, as a worker runs them: the llama.cpp backend's batching loop
(``models/llama_batch.py``) around a stand-in engine whose decode step sleeps ``--step-ms``
(the GPU's time: the GIL is free meanwhile) and samples token 1, always; each job's
``ChoiceWriter``, ``follow_choices`` on its own thread, the runtime's per-event path
(``tasks.runtime._Flow``: the job's outcome, the token meter) and a real ``Publisher``
writing to a real redis-server. Reported per mode: process CPU per token (every thread of
this process: loop, task threads, publisher), the steps the loop made per second against
the nominal 1000/step-ms, and the p50/p99 of the loop's own time per step beyond the
engine's sleep (what the GIL's hand-offs add to a step).

    python -m bench.handover [--jobs 32] [--tokens 300] [--step-ms 16]
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np

from bench.common import CheckFailed, print_table, save
from bench.stack import Stack
from config.contract.events import Finish
from config.contract.job import Sampling
from config.contract.protocol import connect
from models.base import CancelFlag
from models.llama_batch import BatchLoop, Choice
from models.llama_sampling import ChainSpec
from models.output import ChoiceWriter, Outbox, follow_choices
from tasks.cluster import TokenMeter
from tasks.jobs.shapes import Outcome
from tasks.publisher import Publisher
from tasks.runtime import _Flow


class _Chain:
    def __init__(self, spec: ChainSpec):
        self.spec = spec

    def close(self) -> None:
        pass


class StandInEngine:
    """What ``BatchLoop`` calls of ``LlamaEngine``: a decode that sleeps ``step`` seconds
    per call and a sampler that always picks token 1 (" x"); nothing is ever the end."""

    n_batch = 4096

    def __init__(self, slots: int, step: float):
        self.slots, self.step = slots, step
        self.steps: list[float] = []  # when each decode of a step began

    def new_chain(self, spec):
        return _Chain(spec)

    def decode(self, rows) -> None:
        if len(rows) > 0 and all(r.logits for r in rows):
            self.steps.append(time.monotonic())
        time.sleep(self.step)

    def logits(self, i):
        return np.zeros(2, dtype=np.float32)

    def sample(self, chain, i) -> int:
        return 1

    def clear(self, seq=None) -> None:
        pass

    def keep(self, seq, n) -> int:
        return 0

    def copy(self, src, dst) -> None:
        pass

    def piece(self, tok) -> bytes:
        return b" x"

    text_piece = piece

    def is_eog(self, tok) -> bool:
        return False


class _Runtime:
    """What ``_Flow`` reads of the worker's runtime."""

    def __init__(self, publisher: Publisher):
        self.meter = TokenMeter("ferry.bench")
        self.publisher = publisher


class _Job:
    def __init__(self, i: int):
        self.id, self.reply_to = f"handover-{i}-{time.monotonic_ns()}", "ferry:reply:bench"


# pull: every token queued to its job's thread (before round 5); polled: deltas handed over
# by the loop, the task thread looking at its cancel every 50 ms (round 5); direct: handed
# over, the task thread asleep until its finish or its cancel (as served).
MODES = ("pull", "polled", "direct")


def one_mode(mode: str, publisher: Publisher, jobs: int, tokens: int, step: float) -> dict:
    engine = StandInEngine(jobs, step)
    loop = BatchLoop(engine, reuse=False, idle_wait=0.05).start()
    runtime = _Runtime(publisher)
    done: list[int] = []

    def task(i: int) -> None:
        job, outcome = _Job(i), Outcome()
        cancel = CancelFlag()
        flow = _Flow(runtime, job, outcome, None, cancel, shared=mode != "pull")
        out = Outbox(flow.direct if mode != "pull" else None)
        choice = Choice(index=0, prompt=[1], max_tokens=tokens,
                        chain=ChainSpec(Sampling(temperature=0), i),
                        writer=ChoiceWriter(0, []), out=out)
        loop.submit(choice)
        n = 0
        # "direct" as served: the task thread sleeps until its finish or its cancel; the
        # others look at a plain callable every 50 ms (ExLlamaV2's POLL), as before.
        cancelled = cancel if mode == "direct" else cancel.__call__
        for ev in follow_choices(out, {0: choice}, loop.cancel, cancelled, 0.05):
            flow.take(ev, type(ev))
            if type(ev) is Finish:
                n = ev.completion_tokens
        flow.close()
        done.append(n)

    threads = [threading.Thread(target=task, args=(i,)) for i in range(jobs)]
    cpu0, t0 = time.process_time(), time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    publisher.flush()
    wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
    loop.close()
    if sum(done) != jobs * tokens:
        raise CheckFailed(f"{mode}: {sum(done)} tokens made, {jobs * tokens} asked")
    # A step's own time: from one step's decode to the next, less the engine's sleep.
    beyond = np.diff(np.array(engine.steps)) - step
    steady = beyond[len(beyond) // 10:]  # past the admission of the jobs' prompts
    return {"mode": mode, "tokens": sum(done), "wall_s": wall,
            "cpu_us_per_token": 1e6 * cpu / sum(done),
            "steps_per_s": len(engine.steps) / wall,
            "step_beyond_p50_ms": 1e3 * float(np.percentile(steady, 50)),
            "step_beyond_p99_ms": 1e3 * float(np.percentile(steady, 99))}


def run(jobs: int = 32, tokens: int = 300, step_ms: float = 16.0, rounds: int = 2) -> dict:
    step = step_ms / 1000
    rows = []
    with Stack("handover") as stack:
        url = stack.redis()
        publisher = Publisher(connect(url), log_max=10000, log_ttl_ms=600_000,
                              window_s=0.005, window_tokens=16)
        for _ in range(rounds):  # alternated: the machine's speed drifts
            for mode in MODES:
                rows.append(one_mode(mode, publisher, jobs, tokens, step))
    by = {m: [r for r in rows if r["mode"] == m] for m in MODES}
    mean = {m: {k: float(np.mean([r[k] for r in rs])) for k in rs[0] if k != "mode"}
            for m, rs in by.items()}
    print_table(f"Hand-over from a batching loop: {jobs} jobs x {tokens} tokens, a "
                f"{step_ms:g} ms engine step (nominal {1000 / step_ms:.1f} steps/s), real "
                f"Publisher and redis-server; {rounds} rounds alternated, means",
                ["mode", "CPU µs/token", "steps/s", "step beyond engine p50 ms", "p99 ms"],
                [[m, v["cpu_us_per_token"], v["steps_per_s"], v["step_beyond_p50_ms"],
                  v["step_beyond_p99_ms"]] for m, v in mean.items()])
    cpu = {m: v["cpu_us_per_token"] for m, v in mean.items()}
    ratio = cpu["pull"] / cpu["direct"]
    print(f"direct: {ratio:.2f}x less CPU per token than pull, {cpu['polled'] / cpu['direct']:.2f}x "
          f"less than polled; steps/s {mean['direct']['steps_per_s'] / mean['pull']['steps_per_s']:.2f}x "
          "pull's")
    data = {"jobs": jobs, "tokens": tokens, "step_ms": step_ms, "rows": rows, "mean": mean,
            "cpu_ratio_pull_over_direct": ratio}
    save("handover", data)
    return data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=32)
    p.add_argument("--tokens", type=int, default=300)
    p.add_argument("--step-ms", type=float, default=16.0)
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    run(a.jobs, a.tokens, a.step_ms, a.rounds)


if __name__ == "__main__":
    main()
