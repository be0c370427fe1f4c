"""What a backend is asked to do: one generation or embedding job, independent of HTTP and
Celery.

Every field is something any backend can be asked for; a backend that cannot do one says so
through its capability flags (``models.base.Backend``), and ``Backend.check`` turns the ask
into a 400 before anything is generated.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Sampling(BaseModel):
    model_config = ConfigDict(frozen=True)

    temperature: float = 1.0
    top_p: float = 1.0
    # Only the k most likely tokens are drawn from; 0: all (OpenAI has no top_k; Anthropic's
    # Messages API does). Backends without it refuse a non-zero value (``supports_top_k``).
    top_k: int = 0
    seed: int | None = None
    # OpenAI's penalties: over the tokens generated so far (not the prompt), subtracted from
    # the logits once per occurrence (frequency) or once per distinct token (presence).
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    # Token id -> bias added to its logit; -100 bans the token, +100 all but forces it.
    logit_bias: dict[int, float] = {}


class ResponseFormat(BaseModel):
    """A constraint on the reply. ``json_object``: any JSON object. ``json_schema``: JSON that
    validates against ``json_schema`` (already unwrapped from OpenAI's ``{name, schema,
    strict}``); the schema uses only keywords ``models.constraints`` can enforce."""

    model_config = ConfigDict(frozen=True)

    type: Literal["json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None
    name: str | None = None


class FunctionTool(BaseModel):
    """A function the model may call; ``parameters`` is the JSON schema of its arguments."""

    model_config = ConfigDict(frozen=True)

    name: str
    description: str | None = None
    parameters: dict[str, Any] = {"type": "object", "properties": {}}


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str


# none: never call a tool. auto: the model chooses between a reply and one call.
# required: exactly one call, to any tool. NamedToolChoice: exactly one call to that tool.
ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class GenerationJob(BaseModel):
    """Exactly one of ``messages`` (chat: rendered with the model's template) or ``prompt``."""

    model_config = ConfigDict(frozen=True)

    id: str
    model: str
    # The web process's channel for its events (``protocol.reply_channel``); None: only the
    # job's own channel (nobody waits for it synchronously).
    reply_to: str | None = None
    # False: nobody reads its tokens as they come (a request answered with one body, a batch
    # line): the worker may hold them (``FERRY_UNSTREAMED_HOLD_MS``). True for jobs of
    # /v1/jobs, whose watchers follow them, and from a web that does not set it.
    streamed: bool = True
    # As chat templates expect them: ``content`` a string, or a list of OpenAI content parts
    # when it holds images; assistant ``tool_calls`` with ``function.arguments`` already
    # parsed into objects; ``tool`` messages with ``tool_call_id``.
    messages: list[dict[str, Any]] | None = None
    # The images of a vision model's messages, as base64 of the image files: the web process
    # decodes data URLs and fetches http(s) URLs before enqueueing (workers never reach out
    # to the network), and each image part of ``messages`` becomes ``{"type": "image",
    # "image": k}``, standing for ``images[k]``.
    images: list[str] = []
    prompt: str | list[int] | None = None
    # Fill-in-the-middle: the text after the completion (completions' ``suffix``).
    suffix: str | None = None
    # None: as many as fit in the context.
    max_tokens: int | None = None
    # ``max_tokens`` is an upper bound, as llama.cpp's server and Ollama take it (Anthropic's
    # Messages door: coding agents send 32000 or 64000 against small contexts): the worker
    # lowers it to what ``max_tokens=None`` gets (the rest of the context, at most
    # ``max_job_tokens // n``) instead of refusing a larger ask.
    fit_max_tokens: bool = False
    # The last message is an assistant turn that the reply continues (a prefill, Anthropic's
    # last assistant message): rendered open, without its end of turn; the reply's text is
    # what follows it.
    continue_final_message: bool = False
    stop: list[str] = []
    n: int = Field(default=1, ge=1)
    sampling: Sampling = Sampling()
    # Top alternatives per token when log probabilities are asked for, else None.
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    # Each choice starts with the prompt (a ``Delta`` with ``prompt=True``, carrying the
    # prompt tokens' log probabilities when ``top_logprobs`` is set).
    echo: bool = False
    response_format: ResponseFormat | None = None
    tools: list[FunctionTool] = []
    tool_choice: ToolChoice = "auto"
    # Unix time after which nobody waits for this job any more.
    deadline: float | None = None
    # Only count the prompt's tokens (rendered and tokenized exactly as for generating):
    # ``Started`` then ``Done`` with ``completion_tokens`` 0, nothing generated. Anthropic's
    # ``/v1/messages/count_tokens``; only the worker holds the model's template and tokenizer.
    count_only: bool = False

    @property
    def calls_tools(self) -> bool:
        """Whether the reply may (or must) be a tool call."""
        return bool(self.tools) and self.tool_choice != "none"


class EmbeddingJob(BaseModel):
    """Vectors for ``input``: texts, or token-id lists in the model's own vocabulary."""

    model_config = ConfigDict(frozen=True)

    id: str
    model: str
    # The web process's channel for its events (``protocol.reply_channel``); None: only the
    # job's own channel (nobody waits for it synchronously).
    reply_to: str | None = None
    input: list[str | list[int]] = Field(min_length=1)
    # Shorten the vectors to this many components (re-normalised); None: the model's size.
    dimensions: int | None = None
    deadline: float | None = None
    # Bulk work (the Batch API): it waits behind interactive requests in the worker.
    bulk: bool = False


class EmbeddingPart(BaseModel):
    """One request of an ``EmbeddingPartsJob``."""

    model_config = ConfigDict(frozen=True)

    input: list[str | list[int]] = Field(min_length=1)
    dimensions: int | None = None


class EmbeddingPartsJob(BaseModel):
    """Several embedding requests run as one job: one message, one record, their inputs in
    shared forward passes, and each request still answered, or failed, on its own. The Batch
    API sends a chunk's lines this way; per line, the overhead of a job would cost more than
    the model's work on a short sentence."""

    model_config = ConfigDict(frozen=True)

    id: str
    model: str
    # The web process's channel for its events (``protocol.reply_channel``); None: only the
    # job's own channel (nobody waits for it synchronously).
    reply_to: str | None = None
    parts: list[EmbeddingPart] = Field(min_length=1)
    deadline: float | None = None
    bulk: bool = True
