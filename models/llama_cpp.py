"""The CPU backend: a GGUF model run by llama.cpp through llama-cpp-python, with continuous
batching.

One engine per worker process (``models.llama_engine``): one model and one llama.cpp context
of ``parallel`` sequences, owned by one loop thread (``models.llama_batch``). The worker runs
a Celery threads pool; ``generate`` runs in a task thread: it renders and tokenizes the
prompt, checks it, submits one ``Choice`` per choice to the loop and yields the events the
loop sends back. Concurrent requests — and the ``n`` choices of one — are decoded together,
one token each per llama_decode. A finished sequence keeps its KV cache for the next prompt
that starts with the same tokens (``models.prefix``; option ``prefix_reuse``). Sampling is set in full for every choice
(``models.llama_sampling``): llama-cpp-python's defaults (top_k 40, min_p 0.05) are not
OpenAI's, which has neither.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Iterator

from pydantic import BaseModel, ConfigDict, Field

from config.errors import InvalidRequest
from config.settings import ModelEntry
from models import constraints, tools
from models.base import Backend, Cancelled, completion_budget, context_exceeded
from models.constraints import Constraint
from config.contract.events import Done, Event, Started
from config.contract.job import GenerationJob
from models.guidance import Grammar
from models.llama_batch import BatchLoop, Choice
from models.llama_engine import LlamaEngine
from models.llama_sampling import ChainSpec
from models.output import ChoiceWriter, Outbox, follow_choices
from models.templates import ChatTemplate

log = logging.getLogger(__name__)

# How often a task thread waiting for its choices looks at a plain cancelled() callable when
# no event comes. The worker's runtime gives a ``CancelFlag``, which wakes it when set
# instead (``models.output.follow_choices``): its deltas go direct, so a running choice
# sends the thread nothing until it finishes.
POLL = 0.1


class LlamaCppOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # 0: every core but one, which is left to the web process and Redis.
    n_threads: int = 0
    # Prompt tokens evaluated per llama_decode call.
    n_batch: int = 512
    # Sequences decoded together (slots), each with num_ctx tokens of KV cache: 4 keeps a
    # new request from waiting behind up to 3 others at 4x the cache of one.
    parallel: int = Field(default=4, ge=1, le=64)
    # A finished sequence keeps its KV cache for the next prompt that starts with the same
    # tokens (a chat's next turn), and n choices share one evaluation of their prompt. Off:
    # every prompt is evaluated whole, as before (the benchmark's baseline; an escape hatch).
    prefix_reuse: bool = True

    def threads(self) -> int:
        return self.n_threads or max(1, (os.cpu_count() or 2) - 1)


class LlamaCppBackend(Backend):
    supports_logprobs = True
    supports_constraints = True
    supports_logit_bias = True
    supports_top_k = True
    supports_echo = True
    supports_direct = True

    @classmethod
    def worker_pool(cls, entry: ModelEntry) -> tuple[str, int]:
        # A task thread per slot, and two more whose jobs are tokenized and waiting when a
        # slot frees. With one slot, such waiting jobs would only be held back from another
        # worker that could start them: one job at a time, as the loop runs it anyway.
        parallel = LlamaCppOptions.model_validate(entry.options).parallel
        return ("threads", parallel + 2) if parallel > 1 else ("solo", 1)

    def __init__(self, entry: ModelEntry):
        super().__init__(entry)
        opts = LlamaCppOptions.model_validate(entry.options)
        path = entry.weights_path()
        if not path.is_file():
            raise FileNotFoundError(f"model {entry.name!r}: weights not found at {path}")
        self.engine = LlamaEngine(str(path), num_ctx=entry.num_ctx, slots=opts.parallel,
                                  n_batch=opts.n_batch, n_threads=opts.threads())
        self._fim = self.engine.fim_tokens()
        self.supports_fim = all(t >= 0 for t in self._fim)
        self._bos = self._special_piece(self.engine.token_bos())
        source = self.engine.metadata.get("tokenizer.chat_template")
        self.template = source and ChatTemplate(
            source, bos_token=self._bos, eos_token=self._special_piece(self.engine.token_eos())
        )
        self.loop = BatchLoop(self.engine, reuse=opts.prefix_reuse).start()
        log.info("llama.cpp: %d sequences of %d tokens decoded together, %d threads, "
                 "prefix reuse %s", opts.parallel, entry.num_ctx, opts.threads(),
                 "on" if opts.prefix_reuse else "off")

    def _special_piece(self, tok: int) -> str:
        if tok < 0:
            return ""
        return self.engine.detokenize([tok], special=True).decode("utf-8", "replace")

    def check(self, job: GenerationJob) -> None:
        super().check(job)
        n_vocab = self.engine.n_vocab
        for param, ids in (("logit_bias", job.sampling.logit_bias),
                           ("prompt", job.prompt if isinstance(job.prompt, list) else ())):
            bad = next((t for t in ids if not 0 <= t < n_vocab), None)
            if bad is not None:
                raise InvalidRequest(f"{param}: token id {bad} is not in the vocabulary of "
                                     f"'{job.model}' (0..{n_vocab - 1}).", param=param)

    # -- prompt ---------------------------------------------------------------------------

    def prompt_tokens(self, job: GenerationJob) -> list[int]:
        if job.messages is not None:
            tokens = self._chat_tokens(job)
        elif job.suffix is not None:
            tokens = self._infill_tokens(job)
        elif isinstance(job.prompt, list):
            tokens = list(job.prompt)
        else:
            tokens = self.engine.tokenize((job.prompt or "").encode(), add_bos=True,
                                          special=True)
        if not tokens:
            raise InvalidRequest("The prompt is empty.",
                                 param="messages" if job.messages is not None else "prompt")
        return tokens

    def count_prompt(self, job: GenerationJob) -> int:
        return len(self.prompt_tokens(job))

    def _chat_tokens(self, job: GenerationJob) -> list[int]:
        if not self.template:
            raise InvalidRequest(f"The model '{job.model}' has no chat template; use "
                                 "/v1/completions.", param="messages")
        t = self.template
        messages = tools.prepare_messages(job.messages, job.tools, job.tool_choice,
                                          t.renders_tool_calls, t.tool_format)
        native = t.tool_format.native and job.calls_tools
        text = t.render(messages, tools=tools.template_tools(job.tools) if native else None,
                        continue_final_message=job.continue_final_message)
        add_bos = not (self._bos and text.startswith(self._bos))
        return self.engine.tokenize(text.encode(), add_bos=add_bos, special=True)

    def _infill_tokens(self, job: GenerationJob) -> list[int]:
        """Prefix-suffix-middle order, as llama.cpp's server builds infill prompts."""
        pre, suf, mid = self._fim

        def tok(text: str | list[int] | None) -> list[int]:
            if isinstance(text, list):
                return list(text)
            return self.engine.tokenize((text or "").encode(), add_bos=False, special=False)

        bos = self.engine.tokenize(b"", add_bos=True, special=False)
        return [*bos, pre, *tok(job.prompt), suf, *tok(job.suffix), mid]

    def _budget(self, job: GenerationJob, n_prompt: int) -> int:
        """max_tokens, after checking prompt + completion against one sequence's context."""
        n_ctx = self.entry.num_ctx
        wanted = completion_budget(self.entry, job, max(0, n_ctx - n_prompt))
        if n_prompt + max(wanted, 1) > n_ctx:
            raise context_exceeded(job, n_ctx, n_prompt, wanted)
        return wanted

    def _grammar(self, constraint: Constraint | None) -> Grammar | None:
        """Compiled here, in the task thread, not on the loop that decodes every stream."""
        if constraint is None:
            return None
        param = "tools" if constraint.is_tool_call else "response_format"
        return self.engine.compile_grammar(constraint, param, self.entry.max_integer_digits)

    # -- generation -----------------------------------------------------------------------

    def choices(self, job: GenerationJob, prompt: list[int], max_tokens: int,
                direct: Callable[[Event], None] | None = None) -> list[Choice]:
        """One ``Choice`` per choice of the job, all reading into one queue (``Outbox``)."""
        fmt = self.template.tool_format if self.template else tools.FERRY
        constraint = constraints.for_job(job, fmt)
        grammar = self._grammar(constraint)
        s = job.sampling
        base_seed = s.seed if s.seed is not None else random.getrandbits(31)
        echo = self._echo_text(job, prompt) if job.echo else None
        stop_by = time.time() + self.entry.max_job_seconds
        out = Outbox(direct)
        made = []
        for index in range(job.n):
            calls = tools.CallParser(constraint.text_allowed, fmt) \
                if constraint is not None and constraint.is_tool_call else None
            made.append(Choice(
                index=index, prompt=prompt, max_tokens=max_tokens,
                chain=ChainSpec(s, base_seed + index, grammar, self.entry.num_ctx),
                writer=ChoiceWriter(index, job.stop, calls), top_logprobs=job.top_logprobs,
                echo=echo, deadline=job.deadline, stop_by=stop_by, out=out))
        return made

    def _echo_text(self, job: GenerationJob, prompt: list[int]) -> str:
        if isinstance(job.prompt, str):
            return job.prompt
        return self.engine.detokenize(prompt).decode("utf-8", "replace")

    def generate(self, job: GenerationJob, cancelled: Cancelled,
                 direct: Callable[[Event], None] | None = None) -> Iterator[Event]:
        prompt = self.prompt_tokens(job)
        max_tokens = self._budget(job, len(prompt))
        choices = self.choices(job, prompt, max_tokens, direct)
        yield Started(worker="", prompt_tokens=len(prompt))
        self.loop.submit_all(choices)
        total = yield from self._follow(choices, cancelled)
        yield Done(prompt_tokens=len(prompt), completion_tokens=total,
                   cached_tokens=min(c.cached for c in choices),
                   evaluated_tokens=sum(c.evaluated for c in choices))

    def _follow(self, choices: list[Choice], cancelled: Cancelled):
        """Yield the choices' events until each has finished; returns the tokens generated."""
        return (yield from follow_choices(choices[0].out, {c.index: c for c in choices},
                                          self.loop.cancel, cancelled, POLL))

    def close(self) -> None:
        self.loop.close()
        self.engine.close()
