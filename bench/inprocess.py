"""The in-process baseline: Ferry's own llama.cpp backend (models/llama_cpp.py) called directly,
with no queue, no Redis and no HTTP, on the same GGUF, threads and sampling as a worker.

``Paired`` runs the same chat request both ways, alternating which goes first, so that noise
from a shared machine falls on both sides alike.
"""

from __future__ import annotations

import time
import uuid

import aiohttp

from bench.client import StreamResult, connector, stream
from bench.common import CheckFailed
from config.settings import ModelEntry
from config.contract.events import Delta, Finish
from config.contract.job import GenerationJob, Sampling


class InProcess:
    def __init__(self, entry: ModelEntry):
        from models.llama_cpp import LlamaCppBackend

        self.entry = entry
        self.backend = LlamaCppBackend(entry)

    def run(self, messages: list[dict], max_tokens: int) -> StreamResult:
        job = GenerationJob(id=uuid.uuid4().hex, model=self.entry.name, messages=messages,
                            max_tokens=max_tokens, sampling=Sampling(temperature=0.0))
        res = StreamResult(sent=time.monotonic())
        for ev in self.backend.generate(job, lambda: False):
            if isinstance(ev, Delta) and ev.text:
                now = time.monotonic()
                if res.ttft is None:
                    res.ttft = now - res.sent
                res.times.append(now)
                res.text += ev.text
                res.chunks += 1
            elif isinstance(ev, Finish):
                res.usage_tokens, res.finish_reason = ev.completion_tokens, ev.finish_reason
        res.end, res.done = time.monotonic(), True
        return res

    def close(self) -> None:
        self.backend.close()


class Paired:
    """One request, in process and through Ferry's HTTP API, ``runs`` times each."""

    def __init__(self, local: InProcess, url: str, messages: list[dict], max_tokens: int):
        self.local, self.url = local, url
        self.messages, self.max_tokens = messages, max_tokens
        self.body = {"model": local.entry.name, "messages": messages, "max_tokens": max_tokens,
                     "temperature": 0, "stream_options": {"include_usage": True}}

    async def run(self, runs: int, warmup: int = 2) -> tuple[list[StreamResult], list[StreamResult]]:
        local, ferry = [], []
        async with aiohttp.ClientSession(connector=connector(1, fresh=True)) as session:
            for i in range(warmup + runs):
                pair = []
                for side in ((0, 1) if i % 2 == 0 else (1, 0)):
                    if side == 0:
                        pair.append((0, self.local.run(self.messages, self.max_tokens)))
                    else:
                        pair.append((1, await stream(session, self.url, self.body, 120)))
                if i >= warmup:
                    for side, res in pair:
                        (local if side == 0 else ferry).append(res)
        self.check(local, ferry)
        return local, ferry

    def check(self, local: list[StreamResult], ferry: list[StreamResult]) -> None:
        """Every Ferry stream complete, with exactly the in-process text and token count."""
        want = local[0]
        if not want.text or (want.tokens != self.max_tokens and want.finish_reason != "stop"):
            raise CheckFailed(f"in-process run gave {want.tokens} tokens: {want.text!r}")
        for res in local + ferry:
            if res.error:
                raise CheckFailed(f"Ferry stream failed: {res.error}")
            if res.text != want.text or res.tokens != want.tokens:
                raise CheckFailed(f"output differs from the in-process run: {res.tokens} tokens "
                                  f"{res.text[:80]!r} vs {want.tokens} tokens {want.text[:80]!r}")
