"""POST /v1/chat/completions."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from config.errors import InvalidRequest
from models.constraints import SchemaLimits, check_schema
from config.contract.job import FunctionTool, NamedToolChoice, ResponseFormat, ToolChoice
from tasks.core.schemas.common import GenerationFields

# OpenAI's rule for function and schema names.
Name = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    # Checked by ``tasks.core.content`` (it needs the server's image size limit).
    url: str
    detail: Literal["auto", "low", "high"] = "auto"


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL

    @field_validator("image_url", mode="before")
    @classmethod
    def _bare_url(cls, value: Any) -> Any:
        # Ollama's examples send the URL (or bare base64) as a string.
        return {"url": value} if isinstance(value, str) else value


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def for_template(self, i: int) -> dict[str, Any]:
        """The message as chat templates expect it: text content (parts kept only when they
        hold images), ``developer`` as system, tool-call arguments parsed."""
        content = self.content
        if isinstance(content, list) and not self.has_images():
            content = "".join(p.text for p in content)
        elif isinstance(content, list):
            content = [p.model_dump() for p in content]
        msg: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                               "content": content or ""}
        for key in ("name", "tool_call_id"):
            if getattr(self, key) is not None:
                msg[key] = getattr(self, key)
        if self.tool_calls:
            msg["tool_calls"] = [self._call(i, j, c) for j, c in enumerate(self.tool_calls)]
        return msg

    @staticmethod
    def _call(i: int, j: int, call: ToolCall) -> dict[str, Any]:
        try:
            arguments = json.loads(call.function.arguments or "{}")
        except ValueError:
            raise InvalidRequest("Tool call arguments must be a JSON string.",
                                 param=f"messages[{i}].tool_calls[{j}].function.arguments") from None
        return {"id": call.id, "type": "function",
                "function": {"name": call.function.name, "arguments": arguments}}

    def has_images(self) -> bool:
        return isinstance(self.content, list) and any(isinstance(p, ImagePart) for p in self.content)


class JSONSchemaFormat(BaseModel):
    name: Name
    description: str | None = None
    # ``schema`` would shadow a pydantic method name; the alias keeps OpenAI's spelling.
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextFormat(BaseModel):
    type: Literal["text"]


class JSONObjectFormat(BaseModel):
    type: Literal["json_object"]


class JSONSchemaResponseFormat(BaseModel):
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat


AnyResponseFormat = Annotated[TextFormat | JSONObjectFormat | JSONSchemaResponseFormat,
                              Field(discriminator="type")]


class FunctionDefinition(BaseModel):
    name: Name
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    name: str


class NamedTool(BaseModel):
    type: Literal["function"]
    function: FunctionName


class CreateChatCompletionRequest(GenerationFields):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    response_format: AnyResponseFormat | None = None
    tools: Annotated[list[ChatTool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedTool | None = None
    # One call per reply is always allowed, so both values are honoured.
    parallel_tool_calls: bool | None = None
    # The pre-tools API: named so that it is refused, not silently ignored.
    functions: Any = None
    function_call: Any = None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def check(self) -> None:
        """Rules across fields, each a 400 naming its parameter."""
        if self.functions is not None or self.function_call is not None:
            raise InvalidRequest("functions and function_call are deprecated; use tools and "
                                 "tool_choice.", param="functions" if self.functions is not None
                                 else "function_call")
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs set to true.", param="top_logprobs")
        if self.tool_choice is not None and not self.tools:
            raise InvalidRequest("tool_choice is only allowed when tools are given.",
                                 param="tool_choice")
        if isinstance(self.tool_choice, NamedTool) and self.tool_choice.function.name not in {
                t.function.name for t in self.tools}:
            raise InvalidRequest(f"tool_choice names '{self.tool_choice.function.name}', which "
                                 "is not among the tools.", param="tool_choice")
        for i, m in enumerate(self.messages):
            if m.role == "tool" and not m.tool_call_id:
                raise InvalidRequest("A tool message needs tool_call_id.",
                                     param=f"messages[{i}].tool_call_id")

    @property
    def has_schemas(self) -> bool:
        """Whether ``check_schemas`` has anything to check."""
        return bool(self.tools) or isinstance(self.response_format, JSONSchemaResponseFormat)

    def check_schemas(self, limits: SchemaLimits) -> None:
        """The JSON schemas (tools' parameters, response_format): bounded by ``limits``,
        then checked. Pure computation, free of any request context, so that the web can
        run it off its event loop."""
        for i, tool in enumerate(self.tools or ()):
            if tool.function.parameters is not None:
                _check_parameters(tool.function.parameters, f"tools[{i}].function.parameters",
                                  limits)
        rf = self.response_format
        if isinstance(rf, JSONSchemaResponseFormat) and rf.json_schema.json_schema is not None:
            check_schema(rf.json_schema.json_schema, "response_format.json_schema.schema",
                         limits)

    @property
    def top_logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def job_response_format(self) -> ResponseFormat | None:
        rf = self.response_format
        if isinstance(rf, JSONObjectFormat):
            return ResponseFormat(type="json_object")
        if isinstance(rf, JSONSchemaResponseFormat):
            return ResponseFormat(type="json_schema", json_schema=rf.json_schema.json_schema,
                                  name=rf.json_schema.name)
        return None

    def job_tools(self) -> list[FunctionTool]:
        return [FunctionTool(name=t.function.name, description=t.function.description,
                             parameters=t.function.parameters or
                             {"type": "object", "properties": {}})
                for t in self.tools or ()]

    def job_tool_choice(self) -> ToolChoice:
        c = self.tool_choice
        if isinstance(c, NamedTool):
            return NamedToolChoice(name=c.function.name)
        return c or "auto"


def _check_parameters(schema: dict[str, Any], param: str, limits: SchemaLimits) -> None:
    check_schema(schema, param, limits)
    if schema.get("type", "object") != "object":
        raise InvalidRequest("A function's parameters must be a JSON schema of type object.",
                             param=param)
