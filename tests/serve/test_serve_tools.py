"""Tool calls and reasoning in chat completions: the parsers on model text, and the app
in-process over an engine that replies with a scripted text (a random model writes no
tool calls and no thinking), so the request's tools reaching the template, the reply's
calls coming back as OpenAI's tool_calls and its thinking as reasoning_content are
checked exactly, streamed and not."""

import asyncio
import json
import re

import httpx2
import pytest

from flaxformer_lite import data
from flaxformer_lite.data.chat import ChatTemplate
from flaxformer_lite.serve import app, reasoning, tools
from serve_helpers import ScriptedEngine

# Qwen 2.5's way with tools, cut down: the tool list in a system turn, calls as
# <tool_call> blocks whose arguments are rendered as JSON objects, results as user turns.
HERMES_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n<tools>{% for tool in tools %}{{ tool | tojson }}{% endfor %}</tools>"
    "<|im_end|>\n{% endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant\n"
    "{% for call in message.tool_calls %}<tool_call>\n{\"name\": \"{{ call.function.name }}\", \"arguments\": "
    "{{ call.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>{{ message.content }}</tool_response>"
    "<|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
REPLY = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.mark.parametrize("parser, text, ready", [
    ("hermes", "Let me check.\n<tool_", len("Let me check.\n")),  # may be a call's start
    ("hermes", "Let me check.\n<tool_call>{\"na", len("Let me check.\n")),
    ("hermes", "a < b", len("a < b")),
    ("llama3_json", "  {\"name\"", 0),
    ("llama3_json", "<|python", 0),
    ("llama3_json", "It is warm.", len("It is warm.")),
])
def test_only_what_may_be_a_call_waits_when_streamed(parser, text, ready):
    assert tools.streamable(parser, text) == ready


def test_parsers_read_calls_and_leave_other_text_as_content():
    content, calls = tools.parse("hermes", REPLY + '<tool_call>{"name": "f", "arguments": "{\\"x\\": [1, 2]}"}</tool_call>')
    assert content == "Let me check.\n"  # the text around the calls, as written
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}), ("f", {"x": [1, 2]})]
    assert tools.parse("hermes", "<tool_call>{not json}</tool_call>") == ("<tool_call>{not json}</tool_call>", [])
    assert tools.parse("hermes", "No tools needed.") == ("No tools needed.", [])
    content, calls = tools.parse(
        "llama3_json", '<|python_tag|>{"name": "f", "parameters": {"s": "a;b"}}; {"name": "g", "parameters": {}}')
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {"s": "a;b"}), ("g", {})]
    assert tools.parse("llama3_json", '{"answer": 42}') == ('{"answer": 42}', [])  # no name: not a call
    assert tools.parse("llama3_json", "It is {warm}.") == ("It is {warm}.", [])
    with pytest.raises(ValueError, match="unknown tool-call parser 'xml'"):
        tools.parse("xml", "")


_Scripted = ScriptedEngine


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    data.train_tokenizer(data.builtin_documents()[:20], kind="bpe", vocab_size=300, out_path=folder, num_sentinels=0)
    return data.load_tokenizer(folder)


def _post(served, body):
    """(status, JSON body or the list of server-sent events) of one chat request, in-process."""
    async def go():
        transport = httpx2.ASGITransport(app=app.build_app(served))
        async with httpx2.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/v1/chat/completions", json=body)

    response = asyncio.run(go())
    if body.get("stream") and response.status_code == 200:
        lines = [line[len("data: "):] for line in response.text.split("\n") if line.startswith("data: ")]
        return 200, [json.loads(line) for line in lines if line != "[DONE]"]
    return response.status_code, response.json()


def _served(tokenizer, text, parser="hermes", thinking=None, piece=1000):
    return app.Served(name="m", tokenizer=tokenizer, max_len=512, engine=_Scripted(text, piece),
                      chat_template=ChatTemplate(source=HERMES_TEMPLATE, special_tokens={}), tool_parser=parser,
                      reasoning_parser=thinking)


CONVERSATION = [
    {"role": "user", "content": "Weather in Lyon?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Lyon"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    {"role": "user", "content": "And Paris?"},
]


def test_tools_reach_the_template_and_calls_come_back_as_tool_calls(tokenizer):
    served = _served(tokenizer, REPLY, piece=2)
    status, body = _post(served, {"messages": CONVERSATION, "tools": [WEATHER]})
    assert status == 200, body
    prompt = tokenizer.decode(served.engine.prompts[0])
    assert json.dumps(WEATHER) in prompt  # the tool list, as the template writes it
    assert '"arguments": {"city": "Lyon"}' in prompt  # OpenAI's string arguments, as an object
    assert "<tool_response>sunny</tool_response>" in prompt
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Let me check.\n"
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "Paris"}

    status, events = _post(served, {"messages": CONVERSATION, "tools": [WEATHER], "stream": True})
    deltas = [e["choices"][0]["delta"] for e in events]
    assert deltas[0]["role"] == "assistant"
    assert "".join(d.get("content", "") for d in deltas) == "Let me check.\n"
    # The content before the call streamed as it came (2 characters a token); the call
    # waited for the end.
    assert sum(bool(d.get("content")) for d in deltas[:-1]) >= 6 and "tool_calls" not in deltas[-2]
    (streamed,) = [c for d in deltas for c in d.get("tool_calls", [])]
    assert streamed["index"] == 0 and streamed["function"] == call["function"]
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"

    # A reply without a call is plain content; tool_choice 'none' renders the tools, parses nothing.
    status, body = _post(_served(tokenizer, "It is sunny."), {"messages": CONVERSATION, "tools": [WEATHER]})
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "It is sunny."}
    assert body["choices"][0]["finish_reason"] == "stop"
    status, body = _post(served, {"messages": CONVERSATION, "tools": [WEATHER], "tool_choice": "none"})
    assert body["choices"][0]["message"] == {"role": "assistant", "content": REPLY}


@pytest.mark.parametrize("request_body, parser, message", [
    ({"tools": [WEATHER]}, None, "start it with --tool-call-parser .hermes or llama3_json"),
    ({"tools": [WEATHER], "tool_choice": "required"}, None, "start it with --tool-call-parser"),
    ({"tools": [{"type": "function"}]}, "hermes", "'tools' must be a list of"),
    ({"tool_choice": "auto", "tools": None, "parallel_tool_calls": True}, "hermes", None),
    ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "hermes", "'tool_choice' needs 'tools'"),
    ({"functions": [WEATHER["function"]]}, "hermes", "deprecated form of tools: send 'tools'"),
    ({"response_format": {"type": "json"}}, "hermes", "'response_format.type': Input should be 'text'"),
    ({"response_format": {"type": "text"}}, "hermes", None),
])
def test_requests_the_server_cannot_honour_are_400s(tokenizer, request_body, parser, message):
    status, body = _post(_served(tokenizer, "ok", parser), {"messages": CONVERSATION[:1], **request_body})
    if message is None:
        assert status == 200 and body["choices"][0]["message"]["content"] == "ok"
    else:
        assert status == 400 and body["error"]["param"] in ("tools", "tool_choice", "functions", "response_format")
        assert re.search(message, body["error"]["message"]), body


THOUGHT = "<think>\nThe user wants the weather; a tool gives it.\n</think>\n\n"


@pytest.mark.parametrize("parser, text, expected", [
    ("qwen3", THOUGHT + "It is sunny.", ("\nThe user wants the weather; a tool gives it.\n", "It is sunny.")),
    ("qwen3", "It is sunny.", ("", "It is sunny.")),  # thinking off: no <think> in the reply
    ("qwen3", "<thi", ("", "<thi")),
    ("deepseek_r1", "Weather needs a tool.</think>\n\nIt is sunny.", ("Weather needs a tool.", "It is sunny.")),
    ("deepseek_r1", "<think>x</think>y", ("x", "y")),
    ("deepseek_r1", "cut off while thinking", ("cut off while thinking", "")),
])
def test_reasoning_splits_alike_whole_and_in_any_pieces(parser, text, expected):
    assert reasoning.split(parser, text) == expected
    for piece in (1, 2, 3, 7):
        splitter, parts = reasoning.Splitter(parser), []
        for start in range(0, len(text), piece):
            parts.append(splitter.feed(text[start:start + piece]))
        parts.append(splitter.finish())
        assert ("".join(r for r, _ in parts), "".join(c for _, c in parts)) == expected


def test_reasoning_comes_back_apart_and_tool_calls_are_read_after_it(tokenizer):
    served = _served(tokenizer, THOUGHT + "It is sunny.", parser=None, thinking="qwen3", piece=3)
    status, body = _post(served, {"messages": CONVERSATION[:1]})
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "It is sunny.",
                                             "reasoning_content": "\nThe user wants the weather; a tool gives it.\n"}
    status, events = _post(served, {"messages": CONVERSATION[:1], "stream": True})
    deltas = [e["choices"][0]["delta"] for e in events]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == body["choices"][0]["message"]["reasoning_content"]
    assert "".join(d.get("content", "") for d in deltas) == "It is sunny."
    # The reasoning streams as it comes: it arrives over several chunks, before the answer.
    first_content = next(i for i, d in enumerate(deltas) if d.get("content"))
    assert sum("reasoning_content" in d for d in deltas[:first_content]) > 3

    served = _served(tokenizer, THOUGHT + REPLY, thinking="qwen3", piece=3)
    for stream in (False, True):
        status, out = _post(served, {"messages": CONVERSATION, "tools": [WEATHER], "stream": stream})
        if stream:
            deltas = [e["choices"][0]["delta"] for e in out]
            thought = "".join(d.get("reasoning_content", "") for d in deltas)
            (call,) = [c for d in deltas for c in d.get("tool_calls", [])]
            finish = out[-1]["choices"][0]["finish_reason"]
        else:
            thought = out["choices"][0]["message"]["reasoning_content"]
            (call,) = out["choices"][0]["message"]["tool_calls"]
            finish = out["choices"][0]["finish_reason"]
        assert thought == "\nThe user wants the weather; a tool gives it.\n" and finish == "tool_calls"
        assert call["function"]["name"] == "get_weather"
