"""ExLlamaV2Backend: the Backend contract on top of the batching loop.

``generate`` runs in a Celery task thread (the worker uses a threads pool, see ``pool``):
it renders and tokenizes the prompt, checks it against the context and the cache, submits
one job per choice to the loop and yields the events the loop sends back. Several task
threads do this at once; the loop decodes their jobs together.

Constrained output (response_format, tool calls) is compiled by ``models.guidance``, as on
llama.cpp, with the llguidance tokenizer of the model directory's tokenizer.json (built once,
when the worker loads), and applied as a token mask by one fresh filter per job
(``grammar.py``); tool calls come out as the same ToolCallDeltas. Vision models (registry
``vision = true``) get their images' embeddings from the loop thread (``vision.py``),
aliases in the prompt.
"""

from __future__ import annotations

import logging
import queue
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

from config.errors import FerryError, GenerationFailed, InvalidRequest
from config.settings import ModelEntry
from models import constraints, guidance, tools
from models.base import Backend, Cancelled, completion_budget, context_exceeded
from config.contract.events import Done, Event, Started
from models.exllamav2.loop import BatchLoop, Ticket
from models.exllamav2.model_dir import ModelDir
from models.exllamav2.options import ExLlamaV2Options, Limits
from models.exllamav2.results import ChoiceStream
from models.exllamav2.sampling import settings_fields, token_bias
from models.exllamav2.spec import JobSpec
from models.exllamav2.stops import stop_conditions
from models.exllamav2.vision import EmbeddingCache, decode_images, image_parts, with_aliases
from config.contract.job import GenerationJob
from models.output import Outbox, follow_choices

log = logging.getLogger(__name__)

# How often a waiting task thread looks at a plain cancelled() callable: a cancel reaches
# the loop within this time plus one generator step. The worker's runtime gives a
# ``CancelFlag``, which wakes the thread when set instead (``models.output.follow_choices``).
POLL = 0.05
# How long a task thread waits for the loop thread to embed its images.
EMBED_TIMEOUT = 120.0


class ExLlamaV2Backend(Backend):
    supports_logprobs = True
    # Through ExLlamaV2's dense token_bias (models/exllamav2/sampling.py).
    supports_logit_bias = True
    supports_top_k = True
    # llguidance masks (models/guidance.py, through models/exllamav2/grammar.py).
    supports_constraints = True
    # The loop thread hands each job's deltas over as it makes them (models/output.py Outbox).
    supports_direct = True

    @classmethod
    def worker_pool(cls, entry: ModelEntry) -> tuple[str, int]:
        return "threads", ExLlamaV2Options.model_validate(entry.options).worker_threads()

    def __init__(self, entry: ModelEntry, engine: Any = None):
        """``engine``: for tests, a stand-in for ``engine.Exl2Engine`` (which needs CUDA)."""
        super().__init__(entry)
        opts = ExLlamaV2Options.model_validate(entry.options)
        self.limits: Limits = opts.limits(entry.num_ctx)
        self.files = ModelDir.read(entry.weights)
        self.template = self.files.chat_template(opts.chat_template)
        self.default_max_tokens = opts.default_max_tokens
        self.supports_vision = self._check_vision(entry, opts)
        if engine is None:
            from models.exllamav2.engine import Exl2Engine

            engine = Exl2Engine(self.files.path, self.limits, opts, vision=self.supports_vision)
        self.engine = engine
        # Loop thread only: embeddings of recent images, reused for prefix-cache hits.
        self.embeddings = EmbeddingCache(engine.image_embedding) if self.supports_vision else None
        end = self.files.eos_ids()
        if engine.eos_token_id is not None:
            end.add(engine.eos_token_id)
        eot = self.files.end_of_turn_id(self.template)
        if eot is not None:
            end.add(eot)
        self.end_ids = frozenset(end)
        self.grammar_tokenizer = self._grammar_tokenizer(entry)
        self.loop = BatchLoop(engine)
        engine.warmup(self.loop.generator)
        self.loop.start()

    def _check_vision(self, entry: ModelEntry, opts: ExLlamaV2Options) -> bool:
        """Vision only when the registry asks for it (the web decides by the registry) and
        the model has a tower exllamav2 knows; anything else is a configuration error."""
        arch = self.files.vision_architecture()
        if not entry.vision:
            if arch is not None:
                log.info("model %r is a vision model (%s); it serves text only until its "
                         "registry entry says vision = true", entry.name, arch)
            return False
        if arch is None:
            raise ValueError(f"model {entry.name!r}: vision = true, but {self.files.path} is not "
                             "a vision model exllamav2 supports (Pixtral, Mistral 3, Qwen2-VL, "
                             "Qwen2.5-VL or Gemma 3, with preprocessor_config.json)")
        if opts.draft is not None:
            raise ValueError(f"model {entry.name!r}: exllamav2 cannot use a draft model with "
                             "image input; remove options.draft or vision")
        return True

    def _grammar_tokenizer(self, entry: ModelEntry) -> Any:
        """llguidance's tokenizer of tokenizer.json, with masks as wide as the model's head
        (which may exceed the tokenizer) and every token id the directory names; any end id
        may end a complete constrained reply. One llguidance cannot read leaves the model
        serving text, and structured output refused with a 400 (``check``)."""
        end = sorted(self.end_ids)
        self.mask_width = max([self.engine.vocab_size, *(i + 1 for i in end),
                               *(i + 1 for i in self.files.added_tokens.values())])
        try:
            return guidance.tokenizer_from_hf((self.files.path / "tokenizer.json").read_text(),
                                              self.mask_width, end)
        except (OSError, ValueError) as e:
            log.error("model %r: llguidance cannot read %s/tokenizer.json (%s); it serves "
                      "no structured output or tool calls", entry.name, self.files.path, e)
            self.supports_constraints = False
            return None

    @property
    def tool_format(self) -> tools.ToolFormat:
        return self.template.tool_format if self.template else tools.FERRY

    # --- preparing a request (task thread) ------------------------------------------------

    def prompt_ids(self, job: GenerationJob) -> list[int]:
        ids, _ = self.prompt(job)
        return ids

    def prompt(self, job: GenerationJob) -> tuple[list[int], list[Any]]:
        """The prompt's token ids, and the image embeddings whose ids are among them."""
        embeddings: list[Any] = []
        if job.messages is not None:
            if self.template is None:
                raise InvalidRequest(f"The model '{job.model}' has no chat template; use "
                                     "/v1/completions.", param="messages")
            t = self.template
            messages = tools.prepare_messages(job.messages, job.tools, job.tool_choice,
                                              t.renders_tool_calls, t.tool_format)
            if any(True for _ in image_parts(messages)):
                embeddings = self._image_embeddings(messages, job.images)
            messages = with_aliases(messages, [e.text_alias for e in embeddings])
            native = t.tool_format.native and job.calls_tools
            text = t.render(messages, tools=tools.template_tools(job.tools) if native else None,
                            continue_final_message=job.continue_final_message)
            bos = self.files.bos_token
            ids = self.engine.encode(text, add_bos=self.files.add_bos and not text.startswith(bos),
                                     embeddings=embeddings or None)
        elif isinstance(job.prompt, list):
            ids = list(job.prompt)
            if any(not 0 <= t < self.engine.vocab_size for t in ids):
                raise InvalidRequest("The prompt has token ids outside the vocabulary.",
                                     param="prompt")
        else:
            ids = self.engine.encode(job.prompt or "", add_bos=self.files.add_bos)
        if not ids:
            raise InvalidRequest("The prompt is empty.",
                                 param="messages" if job.messages is not None else "prompt")
        return ids, embeddings

    def _image_embeddings(self, messages: list[dict[str, Any]], images: list[str]) -> list[Any]:
        """One embedding per image part, computed (or found) on the loop thread."""
        decoded = decode_images(messages, images)
        future = self.loop.call(lambda: self.embeddings.embeddings(decoded))
        try:
            return future.result(timeout=EMBED_TIMEOUT)
        except AssertionError as e:  # exllamav2's own checks on the image
            raise InvalidRequest(f"The model cannot take this image: {e}",
                                 param=decoded[0].param) from None
        except TimeoutError:
            future.cancel()
            raise GenerationFailed("The model did not embed the images in time.") from None
        except FerryError:
            raise
        except Exception:
            log.exception("the vision tower failed")
            raise GenerationFailed("The model could not read the images.") from None

    def budget(self, job: GenerationJob, n_prompt: int) -> int:
        """max_tokens for the job, after checking prompt + completion against the context
        and the cache (exllamav2 reserves pages for both when a job starts)."""
        n_ctx = self.limits.max_seq_len
        rest = max(0, n_ctx - n_prompt)
        # default_max_tokens stands in for a max_tokens the request did not give.
        room = rest if job.max_tokens is not None else min(rest, self.default_max_tokens or rest)
        wanted = completion_budget(self.entry, job, room)
        draft = self.limits.num_draft_tokens
        fits_ctx = n_prompt + max(wanted, 1) <= n_ctx
        fits_cache = (self.limits.pages(n_prompt + wanted + draft)
                      <= self.limits.pages(self.limits.cache_tokens))
        if not (fits_ctx and fits_cache):
            raise context_exceeded(job, n_ctx, n_prompt, wanted)
        return wanted

    def specs(self, job: GenerationJob, prompt: list[int], max_tokens: int,
              grammar: guidance.Grammar | None = None, embeddings: list[Any] = ()
              ) -> list[JobSpec]:
        s = job.sampling
        base_seed = s.seed if s.seed is not None else random.getrandbits(31)
        # A complete constrained reply allows only the end ids, each a stop condition.
        stops = stop_conditions(self.end_ids, job.stop)
        # exllamav2 ends a job at new_tokens >= max_new_tokens - num_draft_tokens.
        max_new = max_tokens + self.limits.num_draft_tokens
        return [JobSpec(input_ids=tuple(prompt), max_new_tokens=max_new,
                        settings=settings_fields(s, token_bias(s.logit_bias, self.engine.vocab_size)),
                        seed=base_seed + i, stop_conditions=stops, top_logprobs=job.top_logprobs,
                        # Grammars hold parse state: every choice gets its own filter.
                        filters=tuple(self.engine.new_filters(grammar))
                        if grammar is not None else (),
                        embeddings=tuple(embeddings))
                for i in range(job.n)]

    def _grammar(self, constraint: constraints.Constraint | None) -> guidance.Grammar | None:
        """Compiled here, in the task thread: a schema llguidance refuses is a 400 before
        anything is queued, and the loop thread never waits for a compilation."""
        if constraint is None:
            return None
        param = "tools" if constraint.is_tool_call else "response_format"
        return guidance.compile_grammar(constraint, self.grammar_tokenizer, self.mask_width,
                                        param, self.entry.max_integer_digits)

    def _calls(self, constraint: constraints.Constraint | None) -> tools.CallParser | None:
        if constraint is None or not constraint.is_tool_call:
            return None
        return tools.CallParser(constraint.text_allowed, self.tool_format)

    # --- generating -------------------------------------------------------------------------

    def count_prompt(self, job: GenerationJob) -> int:
        return len(self.prompt(job)[0])

    def generate(self, job: GenerationJob, cancelled: Cancelled,
                 direct: Callable[[Event], None] | None = None) -> Iterator[Event]:
        constraint = constraints.for_job(job, self.tool_format)
        grammar = self._grammar(constraint)
        prompt, embeddings = self.prompt(job)
        max_tokens = self.budget(job, len(prompt))
        specs = self.specs(job, prompt, max_tokens, grammar, embeddings)
        yield Started(worker="", prompt_tokens=len(prompt))
        out = Outbox(direct)
        logprobs = job.top_logprobs is not None
        stop_by = time.time() + self.entry.max_job_seconds
        calls = self._calls(constraint)
        tickets = [Ticket(spec, ChoiceStream(i, self.engine.piece, logprobs, calls),
                          out=out, deadline=job.deadline, stop_by=stop_by)
                   for i, spec in enumerate(specs)]
        for t in tickets:
            self.loop.submit(t)
        total = yield from self._follow(tickets, out, cancelled)
        # The generator shares a prompt's cached pages among the n choices of a job and
        # with later jobs, for as long as this one generator lives (it is rebuilt only
        # after a failure): the choice that found least in cache speaks for the request.
        yield Done(prompt_tokens=len(prompt), completion_tokens=total,
                   cached_tokens=min(t.stream.cached for t in tickets))

    def _follow(self, tickets: list[Ticket], out: queue.Queue, cancelled: Cancelled):
        """Yield the choices' events until each has finished; returns the tokens generated."""
        return (yield from follow_choices(out, {t.stream.index: t for t in tickets},
                                          self.loop.cancel, cancelled, POLL))

    def close(self) -> None:
        self.loop.close()
        self.engine.close()
