"""Tool calls in chat completions: the request's `tools` go to the chat template, and the
reply's tool calls are read back out of its text by a parser for the model's format.

    content, calls = parse("hermes", '<tool_call>\\n{"name": "f", "arguments": {"x": 1}}\\n</tool_call>')
    # content None, calls [ToolCall(name="f", arguments='{"x": 1}')]

Models write tool calls as text, each family its own way, and the server is told which
(`serve --tool-call-parser`), as vLLM's option of that name:
  - `hermes`: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks, any text
    around them being the reply's content (Qwen 2.5 and 3, Hermes and their fine-tunes);
  - `llama3_json`: the whole reply one JSON object, or several joined by ";", with
    `name` and `parameters` (Llama 3.1 to 3.3's JSON tool calling; a leading
    `<|python_tag|>` is allowed).
A reply whose would-be call is not valid JSON with a name is kept as plain content.
Streamed, the content before a call goes out as it comes (`streamable`): only text that
may be a call waits for the reply's end.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Optional

from flaxformer_lite.inference.text import held_back

PARSERS = ("hermes", "llama3_json")
HERMES_OPEN = "<tool_call>"
PYTHON_TAG = "<|python_tag|>"
_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """One call: the function's name and its arguments as a JSON string (OpenAI's form)."""

    name: str
    arguments: str


def _call(value: Any, argument_keys: tuple[str, ...]) -> Optional[ToolCall]:
    """A ToolCall from a decoded {"name", <arguments>} object, None if it is not one."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = next((value[k] for k in argument_keys if k in value), {})
    if isinstance(arguments, str):  # some models write the arguments already encoded
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    return ToolCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def _decoded(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _objects(text: str) -> Optional[list]:
    """The JSON values `text` holds one after another (whitespace or ";" between), None if
    anything else is there."""
    decoder, values, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and (text[i].isspace() or text[i] == ";"):
            i += 1
        if i == len(text):
            return values
        try:
            value, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return None
        values.append(value)


def streamable(parser: str, text: str) -> int:
    """How many leading characters of a reply's text so far are content for certain, to be
    streamed before the reply ends: all but what is or may become a tool call."""
    if parser == "hermes":
        start = text.find(HERMES_OPEN)
        return start if start >= 0 else len(text) - held_back(text, [HERMES_OPEN])
    head = text.lstrip()
    if not head or head.startswith("{") or head.startswith(PYTHON_TAG) or PYTHON_TAG.startswith(head):
        return 0  # a llama3_json call is the whole reply: it may be one
    return len(text)


def parse(parser: str, text: str) -> tuple[Optional[str], list[ToolCall]]:
    """(content, tool calls) of a reply's text under `parser` (see PARSERS): the content is
    the text without its calls, as written (None when only whitespace is left)."""
    calls: list = []
    content = text
    if parser == "hermes":
        for match in _HERMES_CALL.finditer(text):
            calls.append(_call(_decoded(match.group(1)), ("arguments", "parameters")))
        content = _HERMES_CALL.sub("", text)
    elif parser == "llama3_json":
        body = text.strip().removeprefix(PYTHON_TAG).strip()
        values = _objects(body) if body.startswith("{") else None
        calls, content = [_call(v, ("parameters", "arguments")) for v in values or []], ""
    else:
        raise ValueError(f"unknown tool-call parser {parser!r}: use one of {', '.join(PARSERS)}")
    if not calls or not all(calls):
        return text, []
    return (content if content.strip() else None), calls


def template_messages(messages: list) -> list:
    """The conversation as chat templates read it: an assistant message's
    `tool_calls[].function.arguments`, a JSON string in OpenAI's API, decoded to the
    object templates format (`arguments | tojson`), as transformers and vLLM pass them."""
    out = []
    for message in messages:
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        if isinstance(calls, list):
            fixed = []
            for call in calls:
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                    decoded = _decoded(function["arguments"])
                    if decoded is not None:
                        call = {**call, "function": {**function, "arguments": decoded}}
                fixed.append(call)
            message = {**message, "tool_calls": fixed}
        out.append(message)
    return out
