"""Test doubles of exllamav2 0.3.2's dynamic generator, job and engine (no GPU here).

``GeneratorDouble`` follows the contract the batching loop relies on, as documented in
/work/shared/docs/exllamav2.md and the 0.3.2 source: ``enqueue`` (AssertionError when the
job can never fit the cache), ``iterate`` (start pending jobs while batch slots and pages
allow, one prefill chunk per prefilling job, one decode step per generating job), ``cancel``
(emits nothing), ``num_remaining_jobs``, and the result dicts' keys. Tokens come from a
script, not a model: nothing here pretends to be ExLlamaV2 computing anything.

``JobDouble`` has ``ExLlamaV2DynamicJob``'s signature *without* its ``**kwargs``, so a
misspelt keyword fails here instead of being silently ignored as the real class does.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import SimpleNamespace

import torch

from models.exllamav2.spec import JobSpec, job_kwargs

PAGE = 256


class JobDouble:
    def __init__(self, input_ids, max_new_tokens, min_new_tokens=0, max_skips=4,
                 gen_settings=None, seed=None, stop_conditions=None,
                 decode_special_tokens=False, return_top_tokens=0, return_logits=False,
                 return_probs=False, filters=None, filter_prefer_eos=False, token_healing=False,
                 identifier=None, banned_strings=None, embeddings=None):
        assert input_ids.device.type == "cpu", "input_ids must reside in system memory"
        assert input_ids.dim() == 2 and input_ids.shape[0] == 1 and input_ids.shape[-1] > 0
        self.input_ids = input_ids
        self.max_new_tokens = max_new_tokens
        self.gen_settings = gen_settings
        self.seed = seed
        self.identifier = identifier
        self.return_top_tokens = return_top_tokens
        self.return_probs = return_probs
        self.return_logits = return_logits
        self.stop_tokens, self.stop_strings = set(), set()
        for c in stop_conditions or ():
            if isinstance(c, int):
                self.stop_tokens.add(c)
            elif isinstance(c, str):
                self.stop_strings.add(c)
            else:
                raise ValueError("Unsupported type in stop_conditions")
        self.new_tokens = 0
        self.serial_number = None
        self.prefilled = 0
        self.held_text = ""
        self.held_ids: list[int] = []
        self.full_completion = ""
        self.time_enqueue = None

    @property
    def prompt_len(self) -> int:
        return self.input_ids.shape[-1]

    def pages(self) -> int:
        return -(-(self.prompt_len + self.max_new_tokens) // PAGE)


class GeneratorDouble:
    """``script(job) -> list[int]``: the tokens a job "samples", in order."""

    def __init__(self, vocab: list[str], script: Callable[[JobDouble], list[int]], *,
                 max_batch_size: int = 8, cache_tokens: int = 4096, chunk: int = 2048,
                 step: float = 0.0):
        self.vocab, self.script, self.step = vocab, script, step
        self.max_batch_size, self.chunk = max_batch_size, chunk
        self.max_pages = cache_tokens // PAGE
        self.pending: list[JobDouble] = []
        self.active: list[JobDouble] = []
        self.cancelled: list[JobDouble] = []
        self.decode_steps: list[list] = []  # identifiers decoded together, per iterate()
        self.fail_on_iterate: int | None = None  # raise on this iterate() call (1-based)
        self.iterations = 0
        self._serial = 0

    # --- the contract -------------------------------------------------------------------

    def num_remaining_jobs(self) -> int:
        return len(self.pending) + len(self.active)

    def enqueue(self, job: JobDouble) -> int:
        assert job.pages() <= self.max_pages, (
            f"Job requires {job.pages()} pages (only {self.max_pages} available) and cannot "
            "be enqueued.")
        job.serial_number, self._serial = self._serial, self._serial + 1
        job.time_enqueue = time.time()
        self.pending.append(job)
        return job.serial_number

    def cancel(self, job: JobDouble) -> None:
        if job in self.pending:
            self.pending.remove(job)
        elif job in self.active:
            self.active.remove(job)
        self.cancelled.append(job)

    def iterate(self) -> list[dict]:
        self.iterations += 1
        if self.step:
            time.sleep(self.step)
        if self.fail_on_iterate == self.iterations:
            raise RuntimeError("CUDA error: an illegal memory access was encountered (double)")
        results: list[dict] = []
        self._start_jobs(results)
        for job in self.active:
            if job.prefilled < job.prompt_len - 1:
                job.prefilled = min(job.prompt_len - 1, job.prefilled + self.chunk)
                results.append(self._result(job, "prefill", curr_progress=job.prefilled,
                                            max_progress=job.prompt_len - 1))
        decoding = [j for j in self.active if j.prefilled >= j.prompt_len - 1]
        self.decode_steps.append([j.identifier for j in decoding])
        for job in decoding:
            self._decode(job, results)
        return results

    # --- inside -----------------------------------------------------------------------------

    def _free_pages(self) -> int:
        return self.max_pages - sum(j.pages() for j in self.active)

    def _start_jobs(self, results: list[dict]) -> None:
        for job in list(self.pending):
            if len(self.active) >= self.max_batch_size or job.pages() > self._free_pages():
                continue
            self.pending.remove(job)
            self.active.append(job)
            results.append(self._result(job, "started"))

    def _result(self, job: JobDouble, stage: str, eos: bool = False, **extra) -> dict:
        r = {"job": job, "stage": stage, "eos": eos, "serial": job.serial_number, **extra}
        if job.identifier is not None:
            r["identifier"] = job.identifier
        return r

    def _decode(self, job: JobDouble, results: list[dict]) -> None:
        planned = self.script(job)
        token = planned[job.new_tokens] if job.new_tokens < len(planned) else 0
        job.new_tokens += 1
        # As exllamav2 does: the token joins the held text and ids before any stop check.
        job.held_text += self.vocab[token]
        job.held_ids.append(token)
        if token in job.stop_tokens:
            # Nothing is released; what was held goes under "held" (stop token included).
            held = {"text": job.held_text,
                    "token_ids": torch.tensor([job.held_ids], dtype=torch.long)}
            job.held_text, job.held_ids = "", []
            return self._end(job, results, "stop_token", held=held,
                             eos_triggering_token_id=token,
                             eos_triggering_token_str=self.vocab[token])
        if job.new_tokens >= job.max_new_tokens:
            return self._end(job, results, "max_new_tokens", **self._release(job))
        for s in job.stop_strings:
            at = job.held_text.find(s)
            if at >= 0:
                job.held_text = job.held_text[:at]
                return self._end(job, results, "stop_string", eos_triggering_string=s,
                                 **self._release(job))
        if any(job.held_text.endswith(s[:k]) for s in job.stop_strings for k in range(1, len(s))):
            results.append(self._result(job, "streaming"))  # held: neither text nor tokens
            return
        results.append(self._result(job, "streaming", **self._release(job)))

    def _release(self, job: JobDouble) -> dict:
        out: dict = {}
        if job.held_text:
            out["text"] = job.held_text
            job.full_completion += job.held_text
        if job.held_ids:
            ids = torch.tensor([job.held_ids], dtype=torch.long)
            out["token_ids"] = ids
            if job.return_probs:
                out["token_probs"] = torch.full(ids.shape, 0.5)
            if job.return_top_tokens:
                k = job.return_top_tokens
                out["top_k_tokens"] = torch.stack([ids] * k, dim=-1)
                out["top_k_probs"] = torch.full((*ids.shape, k), 0.5)
        job.held_text, job.held_ids = "", []
        return out

    def _end(self, job: JobDouble, results: list[dict], reason: str, **keys) -> None:
        self.active.remove(job)
        results.append(self._result(
            job, "streaming", eos=True, eos_reason=reason, **keys,
            full_completion=job.full_completion, new_tokens=job.new_tokens,
            prompt_tokens=job.prompt_len, cached_tokens=0, cached_pages=0,
            time_enqueued=0.0, time_prefill=0.0, time_generate=0.0))


class EngineDouble:
    """Stands in for ``engine.Exl2Engine``: builds GeneratorDoubles and JobDoubles, and a
    character-level tokenizer over ``vocab`` (unknown characters are added on the fly)."""

    def __init__(self, vocab: list[str], script: Callable[[JobDouble], list[int]], *,
                 eos_token_id: int | None = None, bos_token_id: int | None = None,
                 step: float = 0.0, **generator_kwargs):
        self.vocab, self.script = vocab, script
        self.eos_token_id, self.bos_token_id = eos_token_id, bos_token_id
        self.generator_kwargs = generator_kwargs
        self.step = step  # seconds each iterate() takes, as a GPU step would
        self.generators: list[GeneratorDouble] = []
        self.jobs: list[JobDouble] = []
        self.encoded: list[tuple[str, bool]] = []  # (text, add_bos) of every encode()
        self.warmed = self.closed = False

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def new_generator(self) -> GeneratorDouble:
        self.generators.append(GeneratorDouble(self.vocab, self.script, step=self.step,
                                               **self.generator_kwargs))
        return self.generators[-1]

    def new_job(self, spec: JobSpec, identifier: int) -> JobDouble:
        ids = torch.tensor([spec.input_ids], dtype=torch.long)
        job = JobDouble(**job_kwargs(spec, identifier, ids, SimpleNamespace(**spec.settings)))
        self.jobs.append(job)
        return job

    def encode(self, text: str, add_bos: bool) -> list[int]:
        self.encoded.append((text, add_bos))
        ids = [self.bos_token_id] if add_bos and self.bos_token_id is not None else []
        for ch in text:
            if ch not in self.vocab:
                self.vocab.append(ch)
            ids.append(self.vocab.index(ch))
        return ids

    def piece(self, token: int) -> str:
        return self.vocab[token]

    def warmup(self, generator: GeneratorDouble) -> None:
        self.warmed = True

    def close(self) -> None:
        self.closed = True
