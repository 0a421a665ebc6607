"""The server's protocol as typed models with bounds: OpenAI's request and response shapes.

    request = parse(CompletionRequest, raw_body)   # ApiError 400 naming the field, else a model
    document = openapi(title, version)             # GET /openapi.json, built from the same models

A request body is parsed straight from its bytes by pydantic (its Rust JSON reader), which
refuses what json.loads would let through to break a handler later: nesting deeper than
200, a lone UTF-16 surrogate ("\\ud800"), NaN and Infinity. Bounds are OpenAI's documented
ones where it has them (temperature [0, 2], top_p (0, 1], penalties [-2, 2], logit_bias up
to 300 token ids with a bias in [-100, 100], up to 4 stop strings, 128 tools, n <= 128 in
the API and 64 here) and ours elsewhere; limits that depend on the model (max_tokens within
the context, top_k and token ids within the vocabulary, the prompt's length) are checked by
the app and the engine. Unknown fields are ignored, as OpenAI's own server does with fields
a client adds from a newer API version.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Optional, Union

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from flaxformer_lite.errors import UserError

MAX_INT = 2**31 - 1  # ids, counts and lengths fit the engine's int32 arrays
MAX_STOP = 4  # OpenAI: "up to 4 sequences"
MAX_STOP_CHARS = 256
MAX_PROMPTS = 64  # prompts in one completions request (ours)
MAX_MESSAGES = 1024  # messages in one chat request (ours)
MAX_TOOLS = 128  # OpenAI's limit
MAX_LOGIT_BIAS = 300  # OpenAI's limit (and the engine's table size)
MAX_N = 64  # choices per prompt (ours; OpenAI allows 128)
MAX_TOP_LOGPROBS = 5  # what the engine returns (OpenAI: 5 for completions, 20 for chat)
# Arguments the server itself passes to the chat template: a request may not set them.
RESERVED_TEMPLATE_KWARGS = ("messages", "add_generation_prompt", "tools")


class ApiError(UserError):
    """An OpenAI-style error with HTTP status `http_status` (400 unless given)."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.http_status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        """{"error": {"message", "type", "param", "code"}}, as OpenAI's API writes errors."""
        kind = {401: "authentication_error", 429: "rate_limit_error", 503: "service_unavailable",
                500: "server_error"}.get(self.http_status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class _Model(BaseModel):
    # strict: "5" is not 5 and 1.0 is not 1 (OpenAI refuses both); finite floats only.
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


TokenId = Annotated[int, Field(ge=0, le=MAX_INT)]
TokenIdKey = Annotated[str, Field(pattern=r"^[0-9]{1,10}$")]  # ASCII digits only: "²" is no id
Text = Annotated[str, Field(min_length=1)]
Stop = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class StreamOptions(_Model):
    include_usage: Optional[bool] = None


class JsonSchemaFormat(_Model):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: Optional[str] = None
    schema_: dict[str, Any] = Field({}, alias="schema", description="the JSON Schema the reply follows")
    strict: Optional[bool] = Field(None, description="followed whatever its value: the grammar allows nothing else")


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None

    @pydantic.model_validator(mode="after")
    def _schema_with_its_type(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("'json_schema' is given with type 'json_schema', and only then")
        return self


class SamplingFields(_Model):
    """Fields completions and chat share."""

    model: Optional[str] = None
    max_tokens: Optional[Annotated[int, Field(ge=0, le=MAX_INT)]] = Field(
        None, description="tokens to generate (default 16); prompt + max_tokens must fit the context")
    temperature: Optional[Annotated[float, Field(ge=0, le=2)]] = Field(None, description="0: greedy")
    top_p: Optional[Annotated[float, Field(gt=0, le=1)]] = None
    top_k: Optional[Annotated[int, Field(ge=-1, le=MAX_INT)]] = Field(
        None, description="vLLM's: -1 or 0 off, else at most the vocabulary's size")
    presence_penalty: Optional[Annotated[float, Field(ge=-2, le=2)]] = None
    frequency_penalty: Optional[Annotated[float, Field(ge=-2, le=2)]] = None
    repetition_penalty: Optional[Annotated[float, Field(gt=0, le=100)]] = Field(None, description="vLLM's: 1 off")
    logit_bias: Optional[Annotated[dict[TokenIdKey, Annotated[float, Field(ge=-100, le=100)]],
                                   Field(max_length=MAX_LOGIT_BIAS)]] = None
    seed: Optional[Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]] = None
    stop: Union[Stop, Annotated[list[Stop], Field(max_length=MAX_STOP)], None] = None
    stop_token_ids: Optional[Annotated[list[TokenId], Field(max_length=MAX_LOGIT_BIAS)]] = None
    ignore_eos: Optional[bool] = None
    n: Optional[Annotated[int, Field(ge=1, le=MAX_N)]] = None
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    response_format: Optional[ResponseFormat] = Field(
        None, description='{"type": "text"}, {"type": "json_object"} or {"type": "json_schema", "json_schema": '
        '{"name", "schema", "strict"}}')
    # OpenAI's fields this server does not implement: refused unless neutral (app._unsupported).
    best_of: Optional[Annotated[int, Field(ge=1, le=MAX_N)]] = None


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: Union[Text, Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS)],
                  Annotated[list[TokenId], Field(min_length=1)],
                  Annotated[list[Annotated[list[TokenId], Field(min_length=1)]],
                            Field(min_length=1, max_length=MAX_PROMPTS)]] = Field(
        description="a string, a list of strings, a list of token ids, or a list of such lists")
    echo: Optional[bool] = None
    logprobs: Optional[Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)]] = None
    suffix: Optional[str] = None


class TextPart(_Model):
    type: Literal["text"]
    text: str


class FunctionCall(_Model):
    name: str
    arguments: str


class ToolCallRef(_Model):
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Model):
    role: Annotated[str, Field(min_length=1, max_length=64)]
    content: Union[str, Annotated[list[TextPart], Field(max_length=MAX_MESSAGES)], None] = Field(
        None, description="text, or a list of {\"type\": \"text\", \"text\": ...} parts")
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCallRef]] = None
    tool_call_id: Optional[str] = None
    reasoning_content: Optional[str] = None

    def text(self) -> Optional[str]:
        """The content as one string (text parts joined)."""
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content


class Function(_Model):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class Tool(_Model):
    type: Literal["function"]
    function: Function


class NamedToolChoice(_Model):
    type: Literal["function"]
    function: dict[str, str]


def _template_kwargs(value: Optional[dict]) -> Optional[dict]:
    for key in RESERVED_TEMPLATE_KWARGS:
        if value and key in value:
            raise ValueError(f"'{key}' is set by the server, not the request: leave it out of chat_template_kwargs")
    return value


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]
    logprobs: Optional[bool] = None
    top_logprobs: Optional[Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)]] = None
    max_completion_tokens: Optional[Annotated[int, Field(ge=0, le=MAX_INT)]] = None
    tools: Optional[Annotated[list[Tool], Field(max_length=MAX_TOOLS)]] = Field(
        None, description='a list of {"type": "function", "function": {"name", "description", "parameters"}}')
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: Optional[bool] = None
    chat_template_kwargs: Annotated[Optional[dict[str, Any]], pydantic.AfterValidator(_template_kwargs)] = Field(
        None, description="extra variables for the chat template (not messages, add_generation_prompt or tools)")
    # OpenAI's deprecated form of tools: refused by name (app._unsupported).
    functions: Optional[list[Any]] = None
    function_call: Union[str, dict[str, Any], None] = None


class EmbeddingRequest(_Model):
    """POST /v1/embeddings."""

    model: Optional[str] = None
    input: Union[Text, Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS * 32)],
                 Annotated[list[TokenId], Field(min_length=1)],
                 Annotated[list[Annotated[list[TokenId], Field(min_length=1)]],
                           Field(min_length=1, max_length=MAX_PROMPTS * 32)]] = Field(
        description="a string, a list of strings, a list of token ids, or a list of such lists; none empty")
    encoding_format: Literal["float", "base64"] = "float"
    user: Optional[str] = None


AdapterName = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^\S+$",
                                    description="the name requests pass as 'model' (no spaces)")]


class LoadLoraAdapterRequest(_Model):
    """POST /v1/load_lora_adapter (vLLM's): a PEFT LoRA folder on the server's disk."""

    lora_name: AdapterName
    lora_path: Annotated[str, Field(min_length=1, max_length=4096)] = Field(
        description="a PEFT LoRA folder (adapter_config.json, adapter_model.safetensors) on the server, made for "
        "its base model")


class UnloadLoraAdapterRequest(_Model):
    """POST /v1/unload_lora_adapter (vLLM's)."""

    lora_name: AdapterName


# ------------------------------------------------------------------------ responses (the document)


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens read from the prefix cache, not computed


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int
    prompt_tokens_details: Optional[PromptTokensDetails] = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[Optional[float]]
    top_logprobs: list[Optional[dict[str, float]]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[Literal["stop", "length"]] = None


class Completion(BaseModel):
    """The body of a non-streamed completion; streamed, each event is one with part of the text."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class ChatMessage(BaseModel):
    role: Literal["assistant"]
    content: Optional[str] = None
    reasoning_content: Optional[str] = None
    tool_calls: Optional[list[ToolCallRef]] = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: Optional[dict[str, Any]] = None
    finish_reason: Optional[Literal["stop", "length", "tool_calls"]] = None


class ChatCompletion(BaseModel):
    """The body of a non-streamed chat completion (streamed: chat.completion.chunk events)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class EmbeddingItem(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: Union[list[float], str]


class EmbeddingList(BaseModel):
    object: Literal["list"]
    model: str
    data: list[EmbeddingItem]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int
    root: Optional[str] = None  # an adapter's folder
    parent: Optional[str] = None  # an adapter's base model


class AdapterStatus(BaseModel):
    """The reply of the adapter routes."""

    id: str
    object: Literal["lora_adapter"]
    status: Literal["loaded", "unloaded"]


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# ------------------------------------------------------------------------ parsing and the document

_TYPE_TAG = re.compile(r"^([A-Z]\w*|str|int|float|bool|none|.*\[.*\])$")  # pydantic's union branch names


def _path(loc: tuple) -> str:
    """messages[0].content from pydantic's ('messages', 0, 'content'), union branch names left out."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _TYPE_TAG.match(part):
            out += f".{part}" if out else part
    return out


def parse(model: type[BaseModel], raw: bytes) -> Any:
    """The request `model` from a JSON body; ApiError 400 naming the first bad field."""
    try:
        return model.model_validate_json(raw)
    except pydantic.ValidationError as e:
        errors = e.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        detail = first["msg"].removeprefix("Invalid JSON: ")
        hint = " (a lone UTF-16 surrogate such as \\ud800 is not text)" if "escape" in detail else ""
        raise ApiError(400, f"the request body is not valid JSON: {detail}{hint}")
    if first["type"] == "model_type" and not first["loc"]:
        raise ApiError(400, "the request body must be a JSON object")
    field = str(first["loc"][0]) if first["loc"] else None
    path = _path(first["loc"])
    same_field = [err for err in errors if err["loc"][:1] == first["loc"][:1]]
    described = model.model_fields.get(field) if field else None
    shape = described.description if described is not None else None
    if len(same_field) > 1 and shape:  # a union: each branch's complaint would mislead
        message = f"'{field}' is invalid: it must be {shape}"
    else:
        message = f"'{path}': {first['msg'].removeprefix('Value error, ')}"
        if first["type"] not in ("missing", "extra_forbidden") and "input" in first:
            message += f", got {_short(first['input'])}"
        if shape and path != field:
            message += f" ('{field}' must be {shape})"
    raise ApiError(400, message, field)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_ROUTES = {
    "/v1/completions": ("post", CompletionRequest, Completion, "Complete a prompt (OpenAI's legacy completions)"),
    "/v1/chat/completions": ("post", ChatCompletionRequest, ChatCompletion, "Reply to a conversation"),
    "/v1/embeddings": ("post", EmbeddingRequest, EmbeddingList, "Embed text (encoder models)"),
    "/v1/models": ("get", None, ModelList, "The base model and its adapters"),
    "/v1/load_lora_adapter": ("post", LoadLoraAdapterRequest, AdapterStatus, "Load a LoRA adapter (--max-adapters)"),
    "/v1/unload_lora_adapter": ("post", UnloadLoraAdapterRequest, AdapterStatus, "Unload a LoRA adapter"),
}
_ERRORS = {"400": "bad request (the field is named)", "401": "no or wrong API key",
           "404": "a model (or adapter) the server does not hold is named",
           "409": "every adapter entry is in use (--max-adapters)", "413": "the body exceeds --max-body-bytes",
           "415": "the body is not application/json", "429": "the queue is full (Retry-After)",
           "503": "the server is draining"}


def openapi(title: str, version: str, *, secured: bool) -> dict:
    """The OpenAPI 3.1 document of the /v1 routes, from the models above."""
    models = [(m, mode) for _, req, resp, _ in _ROUTES.values() for m, mode in ((req, "validation"),
                                                                               (resp, "serialization")) if m]
    refs, defs = pydantic.json_schema.models_json_schema(models + [(ErrorResponse, "serialization")],
                                                         ref_template="#/components/schemas/{model}")
    error = {"description": "", "content": {"application/json": {"schema": refs[(ErrorResponse, "serialization")]}}}
    paths = {}
    for route, (method, req, resp, summary) in _ROUTES.items():
        op = {"summary": summary, "operationId": route.strip("/").replace("/", "_"),
              "responses": {"200": {"description": "OK", "content": {
                  "application/json": {"schema": refs[(resp, "serialization")]}}},
                  **{code: {**error, "description": text} for code, text in _ERRORS.items()
                     if req is not None or code in ("401", "503")}}}
        if req is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": refs[(req, "validation")]}}}
        if secured:
            op["security"] = [{"apiKey": []}]
        paths[route] = {method: op}
    paths["/health"] = {"get": {"summary": "Liveness and load (open without a key)", "operationId": "health",
                                "responses": {"200": {"description": "serving"},
                                              "503": {"description": "draining"}}}}
    components = {"schemas": defs.get("$defs", {})}
    if secured:
        components["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
    return {"openapi": "3.1.0", "info": {"title": title, "version": version}, "paths": paths,
            "components": components}
