"""The CPU backend: a GGUF model run by llama.cpp through llama-cpp-python.

One ``Llama`` per worker process (llama.cpp contexts are not thread-safe; the worker runs one
job at a time). Sampling is set in full on every call: llama-cpp-python's defaults (top_k 40,
min_p 0.05) are not OpenAI's, which has neither.
"""

from __future__ import annotations

import codecs
import os
import random
from collections.abc import Iterator

from pydantic import BaseModel, ConfigDict

from config.errors import ContextLengthExceeded, InvalidRequest
from config.settings import ModelEntry
from models.base import Backend, Cancelled
from models.events import Delta, Done, Event, Finish, Started
from models.job import GenerationJob
from models.stops import StopMatcher
from models.templates import ChatTemplate


class LlamaCppOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # 0: every core but one, which is left to the web process and Redis.
    n_threads: int = 0
    # Prompt tokens evaluated per llama_decode call.
    n_batch: int = 512


class LlamaCppBackend(Backend):
    supports_logprobs = True

    def __init__(self, entry: ModelEntry):
        super().__init__(entry)
        import llama_cpp

        opts = LlamaCppOptions.model_validate(entry.options)
        threads = opts.n_threads or max(1, (os.cpu_count() or 2) - 1)
        path = entry.weights_path()
        if not path.is_file():
            raise FileNotFoundError(f"model {entry.name!r}: weights not found at {path}")
        self.llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=entry.num_ctx, n_batch=opts.n_batch,
            n_threads=threads, n_threads_batch=threads, verbose=False,
        )
        vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self._is_eog = lambda tok: bool(llama_cpp.llama_vocab_is_eog(vocab, tok))
        meta = self.llm.metadata
        self._bos = self._special_piece(self.llm.token_bos())
        source = meta.get("tokenizer.chat_template")
        self.template = source and ChatTemplate(
            source, bos_token=self._bos, eos_token=self._special_piece(self.llm.token_eos())
        )

    def _special_piece(self, tok: int) -> str:
        if tok < 0:
            return ""
        return self.llm.detokenize([tok], special=True).decode("utf-8", "replace")

    def prompt_tokens(self, job: GenerationJob) -> list[int]:
        if job.messages is not None:
            if not self.template:
                raise InvalidRequest(f"The model '{job.model}' has no chat template; use "
                                     "/v1/completions.", param="messages")
            text = self.template.render(job.messages)
            add_bos = not (self._bos and text.startswith(self._bos))
            return self.llm.tokenize(text.encode(), add_bos=add_bos, special=True)
        if isinstance(job.prompt, list):
            return list(job.prompt)
        return self.llm.tokenize((job.prompt or "").encode(), add_bos=True, special=True)

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

    def generate(self, job: GenerationJob, cancelled: Cancelled) -> Iterator[Event]:
        prompt = self.prompt_tokens(job)
        max_tokens = self._budget(job, len(prompt))
        yield Started(worker="", prompt_tokens=len(prompt))
        base_seed = job.sampling.seed if job.sampling.seed is not None else random.getrandbits(31)
        total = 0
        for index in range(job.n):
            if cancelled():
                yield Finish(index, "cancelled", 0)
                continue
            finish = yield from self._choice(job, index, prompt, max_tokens, base_seed + index,
                                             cancelled)
            total += finish.completion_tokens
            yield finish
        yield Done(prompt_tokens=len(prompt), completion_tokens=total)

    def _choice(self, job: GenerationJob, index: int, prompt: list[int], max_tokens: int,
                seed: int, cancelled: Cancelled):
        s = job.sampling
        if s.seed is not None or s.temperature == 0:
            # Reproducible requests evaluate the prompt from scratch: reusing a cached prefix
            # changes the batch shape and so, in the last bits, the logits.
            self.llm.reset()
        self.llm.set_seed(seed)
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        stops = StopMatcher(job.stop)
        tokens = pending = 0
        reason = "length"
        gen = self.llm.generate(
            prompt, temp=s.temperature, top_p=s.top_p, top_k=0, min_p=0.0, typical_p=1.0,
            repeat_penalty=1.0, frequency_penalty=s.frequency_penalty,
            presence_penalty=s.presence_penalty,
        )
        try:
            while tokens < max_tokens:
                if cancelled():
                    reason = "cancelled"
                    break
                tok = next(gen)
                if self._is_eog(tok):
                    reason = "stop"
                    break
                tokens += 1
                pending += 1
                text = stops.feed(decoder.decode(self.llm.detokenize([tok])))
                if text:
                    yield Delta(index, text, tokens=pending)
                    pending = 0
                if stops.stopped:
                    reason = "stop"
                    break
        finally:
            gen.close()
        tail = stops.feed(decoder.decode(b"", final=True)) + stops.flush()
        if tail or pending:
            yield Delta(index, tail, tokens=pending)
        return Finish(index, reason, tokens)

    def close(self) -> None:
        self.llm.close()
