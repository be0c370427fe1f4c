"""A scripted token source: a test and benchmark instrument, never a served model.

The prompt (or the last message) is a JSON script, so tests can drive the whole pipeline
(queue, pub/sub, SSE, cancel, dead workers) without a real model's timing:
``{"tokens": ["a", "b"], "delay": 0.01, "fail": "msg", "crash": true, "hang": true,
"count": 100, "rate": 50, "pad": 0}``. ``count``/``rate`` produce ``count`` tokens at ``rate`` per
second, each followed by ``pad`` x's (long tokens, to fill a slow reader's socket);
``"silent": true`` paces and counts them but sends none (what pacing alone costs a worker);
``"lockstep": true`` paces them on a clock shared by every job (each token at the next
multiple of 1/rate s), as a batching engine's step yields a token for all its jobs at once.
Registry option ``threads`` (default 1): run that many jobs at once in a Celery threads
pool, as batching GPU backends do, so the pool's plumbing is tested without a GPU.

A test double of a vision model when its registry entry says ``vision = true``: it accepts
image parts, and ``{"describe_images": true}`` makes it reply with what reached it — the
number of images and the sha256 of each one's bytes — so tests can follow image bytes from
the HTTP request into the worker's job. It looks at nothing else in them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import time
from collections.abc import Iterator

from config.errors import GenerationFailed, InvalidRequest
from config.settings import ModelEntry
from models.base import Backend, Cancelled
from config.contract.events import Delta, Done, Event, Finish, Started
from config.contract.job import GenerationJob
from models.stops import StopMatcher
from models.templates import flatten_content


class SyntheticBackend(Backend):
    supports_echo = True

    def __init__(self, entry: ModelEntry):
        super().__init__(entry)
        self.supports_vision = entry.vision

    @classmethod
    def worker_pool(cls, entry: ModelEntry) -> tuple[str, int]:
        threads = int(entry.options.get("threads", 1))
        return ("threads", threads) if threads > 1 else ("solo", 1)

    def _script(self, job: GenerationJob) -> dict:
        if job.messages is not None:
            text = flatten_content(job.messages[-1].get("content")) if job.messages else ""
        else:
            text = job.prompt if isinstance(job.prompt, str) else ""
        try:
            script = json.loads(text)
        except ValueError:
            script = None
        if not isinstance(script, dict):
            raise InvalidRequest("The synthetic backend takes a JSON script as its prompt.",
                                 param="messages" if job.messages is not None else "prompt")
        return script

    def count_prompt(self, job: GenerationJob) -> int:
        return int(self._script(job).get("prompt_tokens", 1))

    def generate(self, job: GenerationJob, cancelled: Cancelled) -> Iterator[Event]:
        script = self._script(job)
        tokens = script.get("tokens")
        if script.get("describe_images"):
            tokens = [f"{len(job.images)} images"] + [
                " " + hashlib.sha256(base64.b64decode(img)).hexdigest() for img in job.images]
        if tokens is None:
            pad = "x" * int(script.get("pad", 0))
            tokens = [f"t{i} {pad}" for i in range(int(script.get("count", 8)))]
        delay = 1.0 / script["rate"] if script.get("rate") else float(script.get("delay", 0))
        limit = job.max_tokens if job.max_tokens is not None else len(tokens)
        lockstep = bool(script.get("lockstep"))
        yield Started(worker="", prompt_tokens=int(script.get("prompt_tokens", 1)))
        total = 0
        for index in range(job.n):
            if job.echo:
                yield Delta(index, job.prompt if isinstance(job.prompt, str) else "", tokens=0,
                            prompt=True)
            stops, n, reason = StopMatcher(job.stop), 0, "length"
            for piece in tokens:
                if n >= limit:
                    break
                if cancelled():
                    reason = "cancelled"
                    break
                if delay:
                    time.sleep(delay - time.monotonic() % delay if lockstep else delay)
                n += 1
                if script.get("silent"):
                    continue  # paced and counted, not sent: the pacing's own cost (bench)
                text = stops.feed(piece)
                if text:
                    yield Delta(index, text)
                if stops.stopped:
                    reason = "stop"
                    break
            else:
                reason = "stop"
            if script.get("fail"):
                raise GenerationFailed(str(script["fail"]))
            if script.get("crash"):
                os.kill(os.getpid(), signal.SIGKILL)
            while script.get("hang") and not cancelled():
                time.sleep(0.01)
            tail = stops.flush()
            if tail:
                yield Delta(index, tail, tokens=0)
            total += n
            yield Finish(index, "cancelled" if cancelled() else reason, n,
                         stops.matched if reason == "stop" else None)
        yield Done(prompt_tokens=int(script.get("prompt_tokens", 1)), completion_tokens=total)
