"""Test doubles of exllamav2 0.3.2's dynamic generator, job and engine (no GPU here).

``GeneratorDouble`` follows the contract the batching loop relies on, as documented in
/work/shared/docs/exllamav2.md and the 0.3.2 source: ``enqueue`` (AssertionError when the
job can never fit the cache), ``iterate`` (start pending jobs while batch slots and pages
allow, one prefill chunk per prefilling job, one decode step per generating job), ``cancel``
(emits nothing), ``num_remaining_jobs``, and the result dicts' keys. Tokens come from a
script, not a model: nothing here pretends to be ExLlamaV2 computing anything.

Prompt caching as the generator does it across jobs: a job starting reuses the whole 256-token
pages of its prompt that an earlier job's prompt began with (the last token is always
evaluated), and reports them as ``cached_tokens`` / ``cached_pages``; only a new generator
(``new_generator``) starts empty.

``JobDouble`` has ``ExLlamaV2DynamicJob``'s signature *without* its ``**kwargs``, so a
misspelt keyword fails here instead of being silently ignored as the real class does.

Filters are applied as 0.3.2's generator and sampler apply them (begin at the first token,
the logit-mask path when every filter can mask, else the allowed-token path with
``filter_prefer_eos``, then feed, then the next mask scheduled in a thread pool when every
filter can mask and uses the background worker): the double "samples" the scripted token
when the filters allow it, else the allowed token the script ranks next. The filters are
Ferry's own (models/exllamav2/grammar.py) over real llguidance grammars, so they really
constrain the double's output. ``HFEngineDouble`` tokenizes with a model directory's real
tokenizer.json (the vocabulary its grammars are compiled for). ``EmbeddingDouble`` has the
parts of ``ExLlamaV2MMEmbedding`` the backend uses (text alias, token ids from 10^9 upward,
unique per object).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import torch

from models.exllamav2.grammar import MaskFilterLogic
from models.exllamav2.spec import JobSpec, job_kwargs
from models.guidance import Grammar

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
        self.filters = filters or []
        self.filter_prefer_eos = filter_prefer_eos
        self.embeddings = embeddings or []
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
        self.cached_tokens = 0
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
                 step: float = 0.0, eos_token_id: int | None = None):
        self.vocab, self.script, self.step = vocab, script, step
        self.eos_token_id = eos_token_id
        self.max_batch_size, self.chunk = max_batch_size, chunk
        self.max_pages = cache_tokens // PAGE
        self.pending: list[JobDouble] = []
        self.active: list[JobDouble] = []
        self.cancelled: list[JobDouble] = []
        self.decode_steps: list[list] = []  # identifiers decoded together, per iterate()
        self.fail_on_iterate: int | None = None  # raise on this iterate() call (1-based)
        # new_tokens -> a token "sampled" whatever the filters allow: a grammar that then
        # refuses the token its own mask let through.
        self.forced: dict[int, int] = {}
        self.iterations = 0
        self._serial = 0
        self._cached_prompts: list[list[int]] = []  # prompts whose pages the cache holds
        self.filter_pool = ThreadPoolExecutor(max_workers=2)  # as filter_background_eval

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
            self._reuse_pages(job)
            results.append(self._result(job, "started"))

    def _reuse_pages(self, job: JobDouble) -> None:
        ids = job.input_ids[0].tolist()
        shared = max((next((i for i, (a, b) in enumerate(zip(p, ids)) if a != b),
                           min(len(p), len(ids))) for p in self._cached_prompts), default=0)
        job.cached_tokens = min(shared, job.prompt_len - 1) // PAGE * PAGE
        job.prefilled = job.cached_tokens
        self._cached_prompts.append(ids)

    def _result(self, job: JobDouble, stage: str, eos: bool = False, **extra) -> dict:
        r = {"job": job, "stage": stage, "eos": eos, "serial": job.serial_number, **extra}
        if job.identifier is not None:
            r["identifier"] = job.identifier
        return r

    def _sample(self, job: JobDouble, planned: list[int]) -> int:
        """The scripted token, unless the job's filters refuse it: then the allowed token
        the script names next, else the allowed token with the lowest id."""
        want = planned[job.new_tokens] if job.new_tokens < len(planned) else 0
        if not job.filters:
            return want
        if job.new_tokens == 0:
            for f in job.filters:
                f.background_drop()
                f.begin("")
        if job.new_tokens in self.forced:
            for f in job.filters:
                f.background_drop()
            return self.forced[job.new_tokens]
        n = len(self.vocab)
        logits = -torch.arange(n, dtype=torch.float) / n   # lower ids first...
        for rank, tok in enumerate(planned[job.new_tokens:job.new_tokens + 64]):
            logits[tok] = max(float(logits[tok]), 100.0 - rank)   # ...after the script's
        if all(f.can_mask_logits() for f in job.filters):
            for f in job.filters:
                assert f.get_next(mask=True) is True
                logits = f.mask_logits(logits)
        else:
            allowed = None
            for f in job.filters:
                pt, _ = f.get_next()
                if pt is not None:
                    allowed = set(pt) if allowed is None else allowed & set(pt)
            if allowed is not None:
                assert allowed, "Filter excluded all tokens"
                if job.filter_prefer_eos and self.eos_token_id in allowed:
                    return self.eos_token_id
                keep = torch.full((n,), float("-inf"))
                keep[sorted(allowed)] = 0.0
                logits = logits + keep
        return int(torch.argmax(logits))

    def _decode(self, job: JobDouble, results: list[dict]) -> None:
        planned = self.script(job)
        token = self._sample(job, planned)
        for f in job.filters:  # 0.3.2 feeds the sampled (1, 1) tensor
            f.feed(torch.tensor([[token]], dtype=torch.long))
        # ...and schedules the next masks (as iterate() does once the forward pass is queued).
        if job.filters and all(f.can_mask_logits() and f.use_background_worker()
                               for f in job.filters):
            for f in job.filters:
                f.background_prepare_logit_mask(self.filter_pool)
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
            prompt_tokens=job.prompt_len, cached_tokens=job.cached_tokens,
            cached_pages=job.cached_tokens // PAGE,
            time_enqueued=0.0, time_prefill=0.0, time_generate=0.0))


class FilterBaseDouble:
    """What the generator uses of ``ExLlamaV2Filter``'s base class (0.3.2
    generator/filters/base.py), without background threads."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.sequence_str = ""
        self.background_result = None

    def background_prepare_logit_mask(self, pool):
        assert self.background_result is None
        self.background_result = pool.submit(self.prepare_logit_mask)

    def background_drop(self):
        if self.background_result is not None:
            self.background_result.result()
            self.background_result = None

    def get_next(self, mask: bool = False):
        if self.background_result is None:
            return self.prepare_logit_mask() if mask else self.next()
        r = self.background_result.result()
        self.background_result = None
        return r


class MaskFilterDouble(MaskFilterLogic, FilterBaseDouble):
    """Ferry's mask filter on the base-class double (engine.py uses ExLlamaV2Filter)."""


_embedding_ids = itertools.count(1_000_000_000, 1000)


class EmbeddingDouble:
    def __init__(self, image, length: int = 4):
        self.image, self.length = image, length
        self.first_index = next(_embedding_ids)
        self.text_alias = f"<$EMB_{self.first_index}$>"

    def get_ids(self) -> list[int]:
        return list(range(self.first_index, self.first_index + self.length))


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
        self.encoded_embeddings: list[list | None] = []  # embeddings= of every encode()
        self.grammars: list[Grammar] = []  # of every new_filters()
        self.filters: list[MaskFilterDouble] = []
        self.embedded: list[tuple[object, str]] = []  # (image, thread) of image_embedding()
        self.warmed = self.closed = False

    def new_filters(self, grammar: Grammar) -> list:
        """As engine.Exl2Engine.new_filters, on the base-class double."""
        self.grammars.append(grammar)
        f = MaskFilterDouble(None, SimpleNamespace(eos_token_id=self.eos_token_id), grammar)
        self.filters.append(f)
        return [f]

    def image_embedding(self, image) -> EmbeddingDouble:
        self.embedded.append((image, threading.current_thread().name))
        return EmbeddingDouble(image)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def new_generator(self) -> GeneratorDouble:
        self.generators.append(GeneratorDouble(self.vocab, self.script, step=self.step,
                                               eos_token_id=self.eos_token_id,
                                               **self.generator_kwargs))
        return self.generators[-1]

    def new_job(self, spec: JobSpec, identifier: int) -> JobDouble:
        ids = torch.tensor([spec.input_ids], dtype=torch.long)
        job = JobDouble(**job_kwargs(spec, identifier, ids, SimpleNamespace(**spec.settings)))
        self.jobs.append(job)
        return job

    def encode(self, text: str, add_bos: bool, embeddings: list | None = None) -> list[int]:
        """Characters; as exllamav2's tokenizer does, each embedding's alias becomes its ids."""
        self.encoded.append((text, add_bos))
        self.encoded_embeddings.append(embeddings)
        ids = [self.bos_token_id] if add_bos and self.bos_token_id is not None else []
        aliases = {e.text_alias: e for e in embeddings or ()}
        i = 0
        while i < len(text):
            alias = next((a for a in aliases if text.startswith(a, i)), None)
            if alias is not None:
                ids += aliases[alias].get_ids()
                i += len(alias)
                continue
            if text[i] not in self.vocab:
                self.vocab.append(text[i])
            ids.append(self.vocab.index(text[i]))
            i += 1
        return ids

    def piece(self, token: int) -> str:
        return self.vocab[token]

    def warmup(self, generator: GeneratorDouble) -> None:
        self.warmed = True

    def close(self) -> None:
        self.closed = True


class HFEngineDouble(EngineDouble):
    """An EngineDouble whose tokens are those of ``model_dir``'s tokenizer.json (encoded and
    decoded by Hugging Face ``tokenizers``, as exllamav2's tokenizer does)."""

    def __init__(self, model_dir: Path, script: Callable[[JobDouble], list[int]], **kw):
        from tokenizers import Tokenizer

        self.hf = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        vocab = [self.hf.decode([i], skip_special_tokens=False)
                 for i in range(self.hf.get_vocab_size())]
        super().__init__(vocab, script, **kw)

    def encode(self, text: str, add_bos: bool, embeddings: list | None = None) -> list[int]:
        self.encoded.append((text, add_bos))
        self.encoded_embeddings.append(embeddings)
        bos = [self.bos_token_id] if add_bos and self.bos_token_id is not None else []
        return bos + self.hf.encode(text, add_special_tokens=False).ids
