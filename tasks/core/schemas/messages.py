"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's request, with its field names
(anthropic-sdk-python's ``types/message_create_params.py``, ``message_count_tokens_params.py``).

Unknown top-level fields are a 400 naming them, as Anthropic's API answers ("x: Extra inputs
are not permitted"): a misspelt ``stop_sequence`` must not be dropped. Inside content blocks
and tools, unknown keys are ignored, so that a reply's blocks (which carry ``citations`` and
the like) can be sent back as they came. Fields of the SDK's request that Ferry cannot honour
(``thinking`` unless disabled, ``container``, ``mcp_servers``, ``context_management``) are
refused by name; ``cache_control`` (prefix reuse is automatic), ``service_tier``, ``speed``,
``inference_geo``, ``diagnostics`` and ``output_config.effort`` are accepted and ignored.
``temperature``, ``top_p`` and ``top_k`` are no longer in the 2.x SDK's signature (send them in
``extra_body``), but the API and older clients take them, and so does Ferry.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from config.errors import InvalidRequest, Unsupported
from tasks.core.schemas.chat import Name

# ``anthropic-beta`` values accepted and ignored, with why each changes nothing here. Any
# other is a 400 naming it: a beta that is not understood may change what the answer means.
IGNORED_BETAS = {
    "prompt-caching-2024-07-31": "prefix reuse is automatic",
    "fine-grained-tool-streaming-2025-05-14": "tool input is streamed as it is generated",
    "token-efficient-tools-2025-02-19": "how Anthropic's models spell tool calls",
    "interleaved-thinking-2025-05-14": "thinking is refused by itself",
    "claude-code-20250219": "names the client",
    "oauth-2025-04-20": "Ferry's keys are its own",
    "output-128k-2025-02-19": "Ferry's token budgets are its own (max_job_tokens)",
    "max-tokens-3-5-sonnet-2024-07-15": "Ferry's token budgets are its own (max_job_tokens)",
}


class _Block(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextBlock(_Block):
    type: Literal["text"]
    text: str


class Base64Source(_Block):
    type: Literal["base64"]
    media_type: Literal["image/jpeg", "image/png", "image/gif", "image/webp"]
    data: str


class URLSource(_Block):
    type: Literal["url"]
    url: str


class ImageBlock(_Block):
    type: Literal["image"]
    source: Annotated[Base64Source | URLSource, Field(discriminator="type")]

    @property
    def url(self) -> str:
        """As the chat core takes images: a data URL or an http(s) URL."""
        s = self.source
        return f"data:{s.media_type};base64,{s.data}" if isinstance(s, Base64Source) else s.url


class ToolUseBlock(_Block):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


ResultContent = Annotated[TextBlock | ImageBlock, Field(discriminator="type")]


class ToolResultBlock(_Block):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[ResultContent] | None = None
    is_error: bool = False


ContentBlock = Annotated[TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock,
                         Field(discriminator="type")]


class MessageParam(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["user", "assistant"]
    content: str | Annotated[list[ContentBlock], Field(min_length=1)]

    @property
    def blocks(self) -> list[TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock]:
        if isinstance(self.content, str):
            return [TextBlock(type="text", text=self.content)]
        return list(self.content)


class ToolParam(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["custom"] | None = None
    name: Name
    description: str | None = None
    input_schema: dict[str, Any]


class ChoiceAuto(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["auto"]
    # One call per reply is all the core makes, so either value is honoured.
    disable_parallel_tool_use: bool | None = None


class ChoiceAny(ChoiceAuto):
    type: Literal["any"]


class ChoiceTool(ChoiceAuto):
    type: Literal["tool"]
    name: str


class ChoiceNone(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["none"]


ToolChoice = Annotated[ChoiceAuto | ChoiceAny | ChoiceTool | ChoiceNone,
                       Field(discriminator="type")]


class Metadata(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: Annotated[str, Field(max_length=256)] | None = None


class JSONOutputFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["json_schema"]
    # ``schema`` would shadow a pydantic method name; the alias keeps Anthropic's spelling.
    json_schema: dict[str, Any] = Field(alias="schema")


class OutputConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: JSONOutputFormat | None = None
    # How hard a reasoning model thinks; no reasoning happens here.
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None


# Fields of Anthropic's request that Ferry cannot honour: a 400 naming them.
_REFUSED = ("container", "mcp_servers", "context_management")


class MessageInput(BaseModel):
    """What renders the prompt: the fields a create and a count share."""

    model_config = ConfigDict(extra="forbid")

    model: str
    messages: Annotated[list[MessageParam], Field(min_length=1)]
    system: str | list[TextBlock] | None = None
    # Checked one by one in ``client_tools`` (so that a server tool's type is named).
    tools: Annotated[list[dict[str, Any]], Field(max_length=128)] | None = None
    tool_choice: ToolChoice | None = None
    output_config: OutputConfig | None = None
    thinking: dict[str, Any] | None = None
    # Accepted and ignored (see the module's docstring).
    cache_control: Any = None
    speed: Literal["standard", "fast"] | None = None
    container: Any = None
    mcp_servers: Any = None
    context_management: Any = None

    def check(self) -> None:
        for name in _REFUSED:
            if getattr(self, name) is not None:
                raise Unsupported(f"{name} is not supported by this server.", param=name)
        if self.thinking is not None and self.thinking.get("type") != "disabled":
            raise Unsupported("thinking is not supported by this server: its models produce "
                              "no thinking blocks. Leave it out or send {\"type\": "
                              "\"disabled\"} (Claude Code sends it while thinking is on: "
                              "turn it off with Tab or alwaysThinkingEnabled: false in its "
                              "settings, and leave MAX_THINKING_TOKENS unset).",
                              param="thinking")
        if self.prefill:
            self._check_prefill()

    @property
    def prefill(self) -> bool:
        """The last message is an assistant turn, which the reply continues."""
        return self.messages[-1].role == "assistant"

    def _check_prefill(self) -> None:
        if not all(isinstance(b, TextBlock) for b in self.messages[-1].blocks):
            raise Unsupported("A last assistant message (a prefill to continue) may hold text "
                              "blocks only.", param="messages")
        # The tool and output grammars constrain a reply from its first token.
        calls = self.tools and not isinstance(self.tool_choice, ChoiceNone)
        if calls or (self.output_config and self.output_config.format):
            raise Unsupported("A last assistant message (a prefill to continue) cannot be "
                              "combined with tools the model may call or with "
                              "output_config.format: end with a user message, or send "
                              "tool_choice none.", param="messages")

    @property
    def system_text(self) -> str | None:
        if isinstance(self.system, list):
            return "\n".join(b.text for b in self.system) or None
        return self.system or None

    def client_tools(self) -> list[ToolParam]:
        out = []
        for i, tool in enumerate(self.tools or ()):
            kind = tool.get("type")
            if kind not in (None, "custom"):
                raise Unsupported(f"The tool type '{kind}' is not supported: only client "
                                  "tools (name, description, input_schema) are.",
                                  param=f"tools.{i}.type")
            try:
                out.append(ToolParam.model_validate(tool))
            except ValueError as e:
                err = e.errors()[0]
                where = ".".join(str(p) for p in err["loc"])
                raise InvalidRequest(f"tools.{i}.{where}: {err['msg']}",
                                     param=f"tools.{i}.{where}") from None
        return out


class CountMessageTokensRequest(MessageInput):
    pass


class CreateMessageRequest(MessageInput):
    max_tokens: Annotated[int, Field(ge=1)]
    stop_sequences: Annotated[list[str], Field(max_length=4)] | None = None
    temperature: Annotated[float, Field(ge=0, le=1)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    metadata: Metadata | None = None
    stream: bool = False
    service_tier: Literal["auto", "standard_only"] | None = None
    inference_geo: str | None = None
    # Asks for a cache-miss reason in the reply; none is given (the field is left out).
    diagnostics: dict[str, Any] | None = None


def check_betas(header: str | None) -> None:
    """``anthropic-beta``: a 400 naming each value that is not one of ``IGNORED_BETAS``."""
    unknown = [b for b in (v.strip() for v in (header or "").split(",")) if b
               and b not in IGNORED_BETAS]
    if unknown:
        raise Unsupported(f"anthropic-beta {', '.join(unknown)} is not supported by this "
                          f"server (accepted: {', '.join(sorted(IGNORED_BETAS))}).",
                          param="anthropic-beta")
