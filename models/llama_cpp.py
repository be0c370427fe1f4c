"""The CPU backend: a GGUF model run by llama.cpp through llama-cpp-python.

One ``Llama`` per worker process (llama.cpp contexts are not thread-safe; the worker runs one
job at a time). Sampling is set in full on every call (``models.llama_engine``):
llama-cpp-python's defaults (top_k 40, min_p 0.05) are not OpenAI's, which has neither.
The choices of a job are generated one after another; each reuses the prompt's KV cache.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import llama_cpp
from pydantic import BaseModel, ConfigDict

from config.errors import ContextLengthExceeded, InvalidRequest
from config.settings import ModelEntry
from models import constraints, logprobs, tools
from models.base import Backend, Cancelled
from models.events import Delta, Done, Event, Finish, Started, TokenLogprob
from models.constraints import Constraint
from models.gbnf import compile_gbnf
from models.job import GenerationJob
from models.llama_engine import ChainSpec, FerryLlama, check_grammar
from models.output import ChoiceWriter
from models.templates import ChatTemplate


class LlamaCppOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # 0: every core but one, which is left to the web process and Redis.
    n_threads: int = 0
    # Prompt tokens evaluated per llama_decode call.
    n_batch: int = 512


class LlamaCppBackend(Backend):
    supports_logprobs = True
    supports_constraints = True
    supports_logit_bias = True
    supports_echo = True

    def __init__(self, entry: ModelEntry):
        super().__init__(entry)
        opts = LlamaCppOptions.model_validate(entry.options)
        threads = opts.n_threads or max(1, (os.cpu_count() or 2) - 1)
        path = entry.weights_path()
        if not path.is_file():
            raise FileNotFoundError(f"model {entry.name!r}: weights not found at {path}")
        self.llm = FerryLlama(
            model_path=str(path), n_ctx=entry.num_ctx, n_batch=opts.n_batch,
            n_threads=threads, n_threads_batch=threads, verbose=False,
        )
        vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self._is_eog = lambda tok: bool(llama_cpp.llama_vocab_is_eog(vocab, tok))
        self._fim = (llama_cpp.llama_vocab_fim_pre(vocab), llama_cpp.llama_vocab_fim_suf(vocab),
                     llama_cpp.llama_vocab_fim_mid(vocab))
        self.supports_fim = all(t >= 0 for t in self._fim)
        self._bos = self._special_piece(self.llm.token_bos())
        source = self.llm.metadata.get("tokenizer.chat_template")
        self.template = source and ChatTemplate(
            source, bos_token=self._bos, eos_token=self._special_piece(self.llm.token_eos())
        )

    def _special_piece(self, tok: int) -> str:
        if tok < 0:
            return ""
        return self.llm.detokenize([tok], special=True).decode("utf-8", "replace")

    def _piece(self, tok: int) -> bytes:
        """A token's bytes as text; control tokens (which have none) by their name."""
        return self.llm.detokenize([tok]) or self.llm.detokenize([tok], special=True)

    def check(self, job: GenerationJob) -> None:
        super().check(job)
        n_vocab = self.llm.n_vocab()
        for param, ids in (("logit_bias", job.sampling.logit_bias),
                           ("prompt", job.prompt if isinstance(job.prompt, list) else ())):
            bad = next((t for t in ids if not 0 <= t < n_vocab), None)
            if bad is not None:
                raise InvalidRequest(f"{param}: token id {bad} is not in the vocabulary of "
                                     f"'{job.model}' (0..{n_vocab - 1}).", param=param)

    # -- prompt ---------------------------------------------------------------------------

    def prompt_tokens(self, job: GenerationJob) -> list[int]:
        if job.messages is not None:
            return self._chat_tokens(job)
        if job.suffix is not None:
            return self._infill_tokens(job)
        if isinstance(job.prompt, list):
            return list(job.prompt)
        return self.llm.tokenize((job.prompt or "").encode(), add_bos=True, special=True)

    def _chat_tokens(self, job: GenerationJob) -> list[int]:
        if not self.template:
            raise InvalidRequest(f"The model '{job.model}' has no chat template; use "
                                 "/v1/completions.", param="messages")
        t = self.template
        messages = tools.prepare_messages(job.messages, job.tools, job.tool_choice,
                                          t.renders_tool_calls, t.tool_format)
        native = t.tool_format.native and job.calls_tools
        text = t.render(messages, tools=tools.template_tools(job.tools) if native else None)
        add_bos = not (self._bos and text.startswith(self._bos))
        return self.llm.tokenize(text.encode(), add_bos=add_bos, special=True)

    def _infill_tokens(self, job: GenerationJob) -> list[int]:
        """Prefix-suffix-middle order, as llama.cpp's server builds infill prompts."""
        pre, suf, mid = self._fim

        def tok(text: str | list[int] | None) -> list[int]:
            if isinstance(text, list):
                return list(text)
            return self.llm.tokenize((text or "").encode(), add_bos=False, special=False)

        bos = self.llm.tokenize(b"", add_bos=True, special=False)
        return [*bos, pre, *tok(job.prompt), suf, *tok(job.suffix), mid]

    def _budget(self, job: GenerationJob, n_prompt: int) -> int:
        n_ctx = self.entry.num_ctx
        wanted = job.max_tokens if job.max_tokens is not None else max(0, n_ctx - n_prompt)
        if n_prompt + max(wanted, 1) > n_ctx:
            field = "messages" if job.messages is not None else "prompt"
            raise ContextLengthExceeded(
                f"This model's maximum context length is {n_ctx} tokens. However, you "
                f"requested {n_prompt + wanted} tokens ({n_prompt} in the {field}, {wanted} in "
                "the completion). Please reduce the length of the prompt or completion.",
                param=field,
            )
        return wanted

    def _grammar(self, constraint: Constraint | None) -> str | None:
        if constraint is None:
            return None
        param = "tools" if constraint.is_tool_call else "response_format"
        gbnf = compile_gbnf(constraint, param)
        check_grammar(self.llm, gbnf)
        return gbnf

    # -- generation -----------------------------------------------------------------------

    def generate(self, job: GenerationJob, cancelled: Cancelled) -> Iterator[Event]:
        prompt = self.prompt_tokens(job)
        max_tokens = self._budget(job, len(prompt))
        fmt = self.template.tool_format if self.template else tools.FERRY
        constraint = constraints.for_job(job, fmt)
        grammar = self._grammar(constraint)
        yield Started(worker="", prompt_tokens=len(prompt))
        base_seed = job.sampling.seed if job.sampling.seed is not None else random.getrandbits(31)
        echo = self._echo(job, prompt) if job.echo else None
        total = 0
        for index in range(job.n):
            if echo is not None:
                yield Delta(index, echo[0], tokens=0, logprobs=echo[1], prompt=True)
            if cancelled():
                yield Finish(index, "cancelled", 0)
                continue
            chain = ChainSpec(job.sampling, base_seed + index, grammar, self.entry.num_ctx)
            calls = tools.CallParser(constraint.text_allowed, fmt) \
                if constraint is not None and constraint.is_tool_call else None
            writer = ChoiceWriter(index, job.stop, calls)
            fresh = echo is not None and echo[1] is not None and index == 0
            finish = yield from self._choice(job, writer, prompt, max_tokens, chain, cancelled,
                                             fresh)
            total += finish.completion_tokens
            yield finish
        yield Done(prompt_tokens=len(prompt), completion_tokens=total)

    def _echo(self, job: GenerationJob, prompt: list[int]
              ) -> tuple[str, list[TokenLogprob] | None]:
        text = job.prompt if isinstance(job.prompt, str) else \
            self.llm.detokenize(prompt).decode("utf-8", "replace")
        if job.top_logprobs is None:
            return text, None
        return text, self.llm.prompt_logprobs(prompt, job.top_logprobs, self._piece)

    def _choice(self, job: GenerationJob, writer: ChoiceWriter, prompt: list[int],
                max_tokens: int, chain: ChainSpec, cancelled: Cancelled, fresh: bool):
        """One choice; ``fresh``: the prompt has just been evaluated from scratch."""
        s = job.sampling
        if (s.seed is not None or s.temperature == 0) and not fresh:
            # Reproducible requests evaluate the prompt from scratch: reusing a cached prefix
            # changes the batch shape and so, in the last bits, the logits.
            self.llm.reset()
        reason = "length"
        self.llm.chain = chain
        gen = self.llm.generate(prompt, temp=s.temperature)
        try:
            while writer.tokens < max_tokens:
                if cancelled():
                    reason = "cancelled"
                    break
                tok = next(gen)
                if self._is_eog(tok):
                    reason = "stop"
                    break
                lp = None
                if job.top_logprobs is not None:
                    lp = logprobs.entry(self.llm.last_logprobs(), tok, job.top_logprobs,
                                        self._piece)
                yield from writer.add(self.llm.detokenize([tok]), lp)
                if writer.stopped:
                    reason = "stop"
                    break
        finally:
            gen.close()
            self.llm.chain = None
        events = writer.finish(reason)
        yield from events[:-1]
        return events[-1]

    def close(self) -> None:
        self.llm.close()
