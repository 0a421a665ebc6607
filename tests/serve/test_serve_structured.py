"""Structured output: `response_format` JSON schemas and forced tool calls, decoded under
a grammar (inference/grammar.py) by the real engine on a random tiny model at temperature 1,
so the replies are valid because of the grammar, not the model; the app in-process."""

import asyncio
import json
import queue

import httpx2
import jax
import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest

from flaxformer_lite import data
from flaxformer_lite.data.chat import ChatTemplate
from flaxformer_lite.inference import engine as engine_module
from flaxformer_lite.inference.engine import Engine, SamplingParams
from flaxformer_lite.inference.grammar import Grammars, mask_words, unpack
from flaxformer_lite.interop import hf
from flaxformer_lite.models import build_model
from flaxformer_lite.runtime.host import BACKEND_COMPILE_EVENT
from flaxformer_lite.serve import app, tools
from serve_helpers import CHATML

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "size": {"enum": ["small", "large"]},
        "count": {"type": "integer", "minimum": -3, "maximum": 250},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "size", "count", "tags"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Lyon", "Paris"]}, "days": {"type": "integer",
                                                                                     "minimum": 1, "maximum": 7}},
        "required": ["city", "days"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "stop_timer", "parameters": {
        "type": "object", "properties": {"now": {"type": "boolean"}}, "required": ["now"],
        "additionalProperties": False}}},
]
USER = [{"role": "user", "content": "Answer in JSON."}]


@pytest.fixture(scope="module")
def served(hf_dir):
    cfg, params = hf.load(hf_dir)
    engine = Engine(build_model(cfg), params, hf.load_tokenizer(hf_dir), max_batch=4, max_len=256, chunk=32)
    engine.start()
    yield app.Served(name="m", tokenizer=engine.tokenizer, max_len=256, engine=engine, tool_parser="hermes",
                     chat_template=ChatTemplate(source=CHATML, special_tokens={"bos_token": "<s>",
                                                                               "eos_token": "</s>"}))
    engine.stop()


def _post(served, route, body):
    """(status, JSON body or the list of server-sent events) of one request, in-process."""
    async def go():
        transport = httpx2.ASGITransport(app=app.build_app(served))
        async with httpx2.AsyncClient(transport=transport, base_url="http://test", timeout=300) as client:
            return await client.post(route, json=body)

    response = asyncio.run(go())
    if body.get("stream") and response.status_code == 200:
        lines = [line[len("data: "):] for line in response.text.split("\n") if line.startswith("data: ")]
        return 200, [json.loads(line) for line in lines if line != "[DONE]"]
    return response.status_code, response.json()


def test_json_schema_replies_follow_the_schema_streamed_or_not(served):
    body = {"messages": USER, "temperature": 1.0, "max_tokens": 140, "n": 3, "seed": 7,
            "response_format": {"type": "json_schema", "json_schema": {"name": "item", "schema": SCHEMA,
                                                                       "strict": True}}}
    status, reply = _post(served, "/v1/chat/completions", body)
    assert status == 200, reply
    texts = [c["message"]["content"] for c in reply["choices"]]
    for choice, text in zip(reply["choices"], texts):
        assert choice["finish_reason"] == "stop", text  # the grammar completed, and ended the reply
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len(set(texts)) > 1  # sampled, not forced to one text

    status, events = _post(served, "/v1/chat/completions", {**body, "stream": True})
    streamed = ["", "", ""]
    for event in events:
        for choice in event["choices"]:
            streamed[choice["index"]] += choice["delta"].get("content") or ""
    assert streamed == texts  # the same seeds, the same text, in pieces

    status, reply = _post(served, "/v1/completions", {"prompt": "{", "temperature": 1.0, "max_tokens": 60,
                                                      "seed": 1, "response_format": {"type": "json_object"}})
    assert status == 200 and isinstance(json.loads(reply["choices"][0]["text"]), dict), reply


def test_forced_tool_calls_call_the_tools_with_valid_arguments(served):
    body = {"messages": USER, "tools": TOOLS, "tool_choice": "required", "temperature": 1.0, "max_tokens": 120,
            "n": 3, "seed": 3, "parallel_tool_calls": False}
    status, reply = _post(served, "/v1/chat/completions", body)
    assert status == 200, reply
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for choice in reply["choices"]:
        assert choice["finish_reason"] == "tool_calls", choice
        (call,) = choice["message"]["tool_calls"]
        jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])

    named = {**body, "tool_choice": {"type": "function", "function": {"name": "stop_timer"}}, "stream": True}
    status, events = _post(served, "/v1/chat/completions", named)
    calls = [c for e in events for ch in e["choices"] for c in ch["delta"].get("tool_calls", [])]
    assert len(calls) == 3 and {c["function"]["name"] for c in calls} == {"stop_timer"}
    for c in calls:
        jsonschema.validate(json.loads(c["function"]["arguments"]), schemas["stop_timer"])


@pytest.mark.parametrize("body, param, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format.json_schema.schema", "nonsense"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "'json_schema' is given with type"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "fly"}}}, "tool_choice",
     "'fly', which is not among 'tools'"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format",
     "send one of the two"),
])
def test_schemas_and_choices_that_cannot_be_followed_are_400s_naming_the_field(served, body, param, message):
    status, reply = _post(served, "/v1/chat/completions", {"messages": USER, **body})
    assert status == 400 and reply["error"]["param"] == param and message in reply["error"]["message"], reply


def _greedy(engine, prompts, neighbour=None):
    """Greedy texts of `prompts` run together, beside a sampled sequence under `neighbour`'s grammar."""
    events = queue.SimpleQueue()
    for i, p in enumerate(prompts):
        engine.submit(p, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True), lambda e, i=i: events.put((i, e)))
    if neighbour is not None:
        engine.submit([5, 9, 14], SamplingParams(max_tokens=40, temperature=1.0, seed=5, grammar=neighbour),
                      lambda e: events.put((-1, e)))
    done = {}
    while len(done) < len(prompts) + (neighbour is not None):
        i, e = events.get(timeout=120)
        if e["type"] == "done":
            done[i] = e
    return [done[i]["text"] for i in range(len(prompts))], done.get(-1)


def test_unconstrained_slots_decode_the_same_beside_a_constrained_one(served):
    engine = served.engine
    rng = np.random.default_rng(0)
    prompts = [rng.integers(4, 300, size=k).tolist() for k in (7, 19, 33)]
    grammar = engine.grammars.json_schema(SCHEMA, "schema")
    steps = engine_module._step._cache_size()
    compiled = []  # nothing compiles once the engine is warm: not the step, nor a mask's transfer
    armed = [True]
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: compiled.append(event) if armed[0] and event == BACKEND_COMPILE_EVENT else None)
    alone, _ = _greedy(engine, prompts)
    beside, neighbour = _greedy(engine, prompts, grammar)
    armed[0] = False
    assert beside == alone and neighbour["finish_reason"] in ("stop", "length")
    assert engine_module._step._cache_size() == steps  # the constrained step compiled nothing new
    assert compiled == []


def test_masks_allow_eos_only_where_the_grammar_may_end_and_the_step_applies_them():
    tok = data.ByteTokenizer(num_sentinels=4)
    V = tok.vocab_size
    grammars = Grammars(tok, vocab_size=V, eos_ids=(tok.eos_id,))
    matcher = grammars.json_schema({"type": "integer"}, "schema").start()
    allowed = np.zeros((2, mask_words(V)), np.int32)
    grammars.fill([(matcher, 1)], allowed)
    first = unpack(allowed, V)[1]
    assert not first[tok.eos_id] and first[tok.encode("7")[0]] and not first[tok.encode("a")[0]]
    assert matcher.consume_token(tok.encode("7")[0])
    grammars.fill([(matcher, 1)], allowed)
    assert unpack(allowed, V)[1][tok.eos_id]  # "7" is a whole integer: it may end here

    rng = np.random.default_rng(1)  # the step's unpacking and masking against numpy's
    logits = rng.normal(size=(3, V)).astype(np.float32)
    packed = rng.integers(-2**31, 2**31, size=(3, mask_words(V)), dtype=np.int64).astype(np.int32)
    constrained = np.array([True, False, True])
    got = jax.jit(engine_module._allow)(jnp.asarray(logits), packed, constrained)
    expected = np.where(unpack(packed, V) | ~constrained[:, None], logits, -np.inf)
    np.testing.assert_array_equal(np.asarray(got), expected)


@pytest.mark.parametrize("parser, calls, bad", [
    ("hermes", '<tool_call>\n{"name":"stop_timer","arguments":{"now":true}}\n</tool_call>',
     '<tool_call>\n{"name":"stop_timer","arguments":{"now":1'),
    ("llama3_json", '{"name":"get_weather","parameters":{"city":"Lyon","days":2}};'
     '{"name":"stop_timer","parameters":{"now":false}}', '{"name":"fly'),
])
def test_tool_call_grammars_take_the_parsers_format_with_valid_arguments_only(parser, calls, bad):
    tok = data.ByteTokenizer(num_sentinels=0)
    grammar = Grammars(tok, vocab_size=tok.vocab_size, eos_ids=(tok.eos_id,)).tool_calls(parser, TOOLS, parallel=True)
    matcher = grammar.start()
    assert matcher.consume_tokens(tok.encode(calls)) and matcher.is_accepting()
    assert len(tools.parse(parser, calls)[1]) == calls.count('"name"')  # the parser reads them back
    assert not grammar.start().consume_tokens(tok.encode(bad))
