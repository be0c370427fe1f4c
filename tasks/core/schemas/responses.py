"""POST /v1/responses: the request, with OpenAI's field names (openai-python's
``types/responses/response_create_params.py``).

Only function tools exist here; a built-in tool (``web_search``, ``file_search``, ...) is a
400 naming its type, never dropped. Fields Ferry cannot honour (``conversation``, ``prompt``,
``top_logprobs``) are refused by name; ``reasoning`` is accepted and ignored, as no reasoning
items are produced.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from config.errors import InvalidRequest, Unsupported
from tasks.core.schemas.chat import Name


class InputText(BaseModel):
    type: Literal["input_text"]
    text: str


class OutputText(BaseModel):
    """An earlier assistant reply, sent back as input."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["output_text"]
    text: str


class InputImage(BaseModel):
    type: Literal["input_image"]
    image_url: str | None = None
    file_id: str | None = None
    detail: Literal["auto", "low", "high"] = "auto"


InputContent = Annotated[InputText | OutputText | InputImage, Field(discriminator="type")]


class MessageItem(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["message"]
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputContent]
    id: str | None = None


class FunctionCallItem(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None


class FunctionCallOutputItem(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function_call_output"]
    call_id: str
    output: str | list[InputText]
    id: str | None = None

    @property
    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(p.text for p in self.output)


InputItem = Annotated[MessageItem | FunctionCallItem | FunctionCallOutputItem,
                      Field(discriminator="type")]


class FunctionToolParam(BaseModel):
    type: Literal["function"]
    name: Name
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(BaseModel):
    type: Literal["function"]
    name: str


class TextFormatText(BaseModel):
    type: Literal["text"]


class TextFormatJSONObject(BaseModel):
    type: Literal["json_object"]


class TextFormatJSONSchema(BaseModel):
    type: Literal["json_schema"]
    name: Name
    # ``schema`` would shadow a pydantic method name; the alias keeps OpenAI's spelling.
    json_schema: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")

    format: Annotated[TextFormatText | TextFormatJSONObject | TextFormatJSONSchema,
                      Field(discriminator="type")] | None = None


# Fields of OpenAI's request that Ferry cannot honour: a 400 naming them.
_REFUSED = ("conversation", "prompt", "top_logprobs")


class CreateResponseRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    input: str | Annotated[list[InputItem], Field(min_length=1)]
    instructions: str | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    # Not OpenAI's (the chat path has it): reproducible sampling.
    seed: int | None = None
    metadata: Annotated[dict[str, Annotated[str, Field(max_length=512)]],
                        Field(max_length=16)] | None = None
    user: str | None = None
    stream: bool = False
    store: bool = True
    background: bool = False
    previous_response_id: str | None = None
    # Checked one by one in ``function_tools`` (so that a built-in tool's type is named).
    tools: Annotated[list[dict[str, Any]], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    truncation: Literal["disabled", "auto"] | None = None
    reasoning: Any = None
    conversation: Any = None
    prompt: Any = None
    top_logprobs: Any = None

    @field_validator("input", mode="before")
    @classmethod
    def _easy_messages(cls, value: Any) -> Any:
        # An "easy" input message ({"role", "content"}) may leave out its type.
        if isinstance(value, list):
            return [{**v, "type": "message"} if isinstance(v, dict) and "type" not in v
                    and "role" in v else v for v in value]
        return value

    def check(self) -> None:
        for name in _REFUSED:
            if getattr(self, name) is not None:
                raise Unsupported(f"{name} is not supported by this server.", param=name)
        if self.truncation == "auto":
            raise Unsupported("truncation 'auto' is not supported: a prompt that does not fit "
                              "is a 400 (context_length_exceeded).", param="truncation")
        if self.background and self.stream:
            raise Unsupported("background responses are not streamed when created; create, "
                              "then GET /v1/responses/{id}?stream=true.", param="stream")
        if self.background and not self.store:
            raise InvalidRequest("background responses must be stored (store: true).",
                                 param="store")
        if isinstance(self.input, list):
            for i, item in enumerate(self.input):
                for j, part in enumerate(getattr(item, "content", None) or ()):
                    if isinstance(part, InputImage) and part.image_url is None:
                        raise Unsupported("Images are taken as image_url (a data or http(s) "
                                          "URL), not file_id.",
                                          param=f"input[{i}].content[{j}].file_id")

    def function_tools(self) -> list[FunctionToolParam]:
        out = []
        for i, tool in enumerate(self.tools or ()):
            kind = tool.get("type")
            if kind != "function":
                raise Unsupported(f"The tool type '{kind}' is not supported: only function "
                                  "tools are.", param=f"tools[{i}].type")
            try:
                out.append(FunctionToolParam.model_validate(tool))
            except ValueError as e:
                raise InvalidRequest(f"Invalid function tool: {e.errors()[0]['msg']}",
                                     param=f"tools[{i}]") from None
        return out

    def named_choice(self) -> str | None:
        """The function ``tool_choice`` names, if it names one."""
        choice = self.tool_choice
        if not isinstance(choice, dict):
            return None
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise Unsupported(f"tool_choice of type '{choice.get('type')}' is not supported: "
                              "only none, auto, required or a function.", param="tool_choice")
        return choice["name"]

    @property
    def items(self) -> list[MessageItem | FunctionCallItem | FunctionCallOutputItem]:
        if isinstance(self.input, str):
            return [MessageItem(type="message", role="user", content=self.input)]
        return list(self.input)
