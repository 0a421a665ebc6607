"""The HTTP side: OpenAI's /v1 routes as a Starlette (ASGI) app over the engine.

    app = build_app(Served(name, engine=engine, tokenizer=tok, ...))
    # POST /v1/completions, /v1/chat/completions, /v1/embeddings; GET /v1/models, /health

Handlers run on the event loop and never call JAX: they validate the JSON, tokenize,
submit sequences to the engine (which runs JAX on its own thread) and turn its events,
handed over with `loop.call_soon_threadsafe`, into a JSON body or server-sent events.
Errors have OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 bad
parameters, 404 unknown model, 429 (with Retry-After) when the queue is full, 503 while
the server drains, 500 when the model fails on a request (non-finite logits).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import functools
import json
import secrets
import time
import uuid
from typing import Any, Callable, Optional

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from flaxformer_lite.errors import UserError
from flaxformer_lite.inference.engine import EngineError, SamplingParams
from flaxformer_lite.serve import reasoning
from flaxformer_lite.serve import tools as tool_calls

RETRY_AFTER_S = 1
DISCONNECT_CHECK_S = 1.0  # how often a request looks for its client having gone
# Sampling knobs OpenAI defines that this server does not implement: any value but the
# neutral one is refused by name rather than ignored.
_NEUTRAL = {"best_of": 1, "suffix": ""}


class ApiError(UserError):
    """An OpenAI-style error response with HTTP status `http_status`."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.http_status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = {400: "invalid_request_error", 404: "invalid_request_error", 429: "rate_limit_error",
                503: "service_unavailable", 500: "server_error"}.get(self.http_status, "server_error")
        headers = {"Retry-After": str(RETRY_AFTER_S)} if self.http_status in (429, 503) else None
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.http_status, headers=headers)


@dataclasses.dataclass
class Served:
    """What one server serves: a model name and either an engine (decoder-only models:
    completions and chat) or an embedder (encoders: embeddings)."""

    name: str
    tokenizer: Any
    max_len: int
    engine: Any = None  # serve.engine.Engine
    embedder: Any = None  # serve.embeddings.Embedder
    chat_template: Any = None  # data.chat.ChatTemplate or None
    add_bos: bool = False
    sampling: dict = dataclasses.field(default_factory=dict)  # the checkpoint's defaults (data.sampling_defaults)
    tool_parser: Optional[str] = None  # serve.tools.PARSERS: how the model writes tool calls
    reasoning_parser: Optional[str] = None  # serve.reasoning.PARSERS: how it marks its thinking
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    compilations: Callable[[], int] = lambda: 0

    @property
    def draining(self) -> bool:
        worker = self.engine or self.embedder
        return worker.draining


# ------------------------------------------------------------------------ request parsing


def _get(body: dict, key: str, kind, default, check: Optional[Callable[[Any], bool]] = None, rule: str = ""):
    value = body.get(key, default)
    if value is None:
        value = default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool) and kind is not bool):
        raise ApiError(400, f"'{key}' must be {kind.__name__ if not isinstance(kind, tuple) else 'a string or a list'}"
                       f", got {value!r}", key)
    if value is not None and check is not None and not check(value):
        raise ApiError(400, f"'{key}'={value!r} is out of range: it must be {rule}", key)
    return value


def _check_model(served: Served, body: dict) -> None:
    model = body.get("model")
    if model is not None and model != served.name:
        raise ApiError(404, f"The model '{model}' does not exist: this server serves '{served.name}' (GET /v1/models)",
                       "model", "model_not_found")


def _unsupported(body: dict) -> None:
    for key, neutral in _NEUTRAL.items():
        value = body.get(key)
        if value is not None and value != neutral:
            raise ApiError(400, f"'{key}' is not supported by this server; leave it out (or at {neutral!r})", key)
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise ApiError(400, f"response_format={json.dumps(response_format)[:80]} needs constrained decoding, which "
                       "this server lacks: leave it out (or {\"type\": \"text\"}), ask for JSON in the prompt and "
                       "parse the reply", "response_format")
    for legacy in ("functions", "function_call"):
        if body.get(legacy) is not None:
            raise ApiError(400, f"'{legacy}' is OpenAI's deprecated form of tools: send 'tools' (and 'tool_choice')",
                           legacy)


def _logit_bias(body: dict) -> tuple:
    """OpenAI's {"token id": bias} as (id, bias) pairs; the engine checks their ranges."""
    pairs = []
    for key, value in _get(body, "logit_bias", dict, {}).items():
        if not str(key).isdigit() or isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ApiError(400, f"'logit_bias' maps token ids (as strings) to numbers, e.g. {{\"50256\": -100}}; got "
                           f"{key!r}: {value!r}", "logit_bias")
        pairs.append((int(key), float(value)))
    return tuple(pairs)


def _sampling(body: dict, defaults: dict, *, logprobs: Optional[int], echo_logprobs: bool
              ) -> tuple[SamplingParams, int]:
    """(SamplingParams, n) from the request body; temperature, top_p, top_k and
    repetition_penalty it leaves out come from `defaults` (the checkpoint's
    generation_config.json), else OpenAI's (vLLM's for its extensions)."""
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a non-empty string or a list of them", "stop")
    top_k = _get(body, "top_k", int, defaults.get("top_k", 0))
    seed = _get(body, "seed", int, None)
    max_tokens = _get(body, "max_completion_tokens", int, None)
    max_tokens = _get(body, "max_tokens", int, 16 if max_tokens is None else max_tokens)
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=_get(body, "temperature", float, defaults.get("temperature", 1.0)),
        top_p=_get(body, "top_p", float, defaults.get("top_p", 1.0)),
        top_k=0 if top_k == -1 else top_k,  # vLLM spells "off" as -1
        repetition_penalty=_get(body, "repetition_penalty", float, defaults.get("repetition_penalty", 1.0)),
        presence_penalty=_get(body, "presence_penalty", float, 0.0),
        frequency_penalty=_get(body, "frequency_penalty", float, 0.0),
        logit_bias=_logit_bias(body),
        seed=secrets.randbits(32) if seed is None else seed,
        stop=tuple(stop),
        stop_token_ids=tuple(_get(body, "stop_token_ids", list, [])),
        ignore_eos=_get(body, "ignore_eos", bool, False),
        logprobs=logprobs,
        echo_logprobs=echo_logprobs,
    )
    n = _get(body, "n", int, 1, lambda v: 1 <= v <= 64, "in [1, 64]")
    return params, n


def _prompts(served: Served, prompt) -> list[list[int]]:
    """Token ids of each prompt: a string, a list of strings, a list of ids or of id lists."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise ApiError(400, "'prompt' must be a non-empty string, list of strings, or list of token ids", "prompt")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompt = [prompt]
    out = []
    for p in prompt:
        if isinstance(p, str):
            if not p:
                raise ApiError(400, "the prompt is empty: give at least one character of text", "prompt")
            out.append(served.tokenizer.encode(p, bos=served.add_bos))
        elif isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            out.append(list(p))
        else:
            raise ApiError(400, "'prompt' must be a string, a list of strings, or token ids", "prompt")
    return out


# ------------------------------------------------------------------------ running sequences


class _Run:
    """The sequences of one request and their events, on the event loop."""

    def __init__(self, served: Served, request: Request):
        self.served, self.request = served, request
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.handles = []

    def submit(self, prompts: list[list[int]], params: SamplingParams, n: int) -> None:
        engine = self.served.engine
        try:
            for p in prompts:
                engine.check(p, params)
            for i, p in enumerate(prompts):
                for j in range(n):
                    sink = functools.partial(self._sink, i * n + j)
                    self.handles.append(engine.submit(p, dataclasses.replace(params, choice=j), sink))
        except EngineError as e:
            self.cancel()
            raise ApiError(e.http_status, str(e)) from None

    def _sink(self, index: int, event: dict) -> None:
        """Called on the engine thread: hand the event to the event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (index, event))
        except RuntimeError:  # the loop has closed (the server stopped): nobody is waiting
            pass

    def cancel(self) -> None:
        for h in self.handles:
            h.cancel()

    async def events_until_done(self):
        """(index, event) pairs until every sequence is done; cancels all if the client leaves."""
        open_ = len(self.handles)
        next_check = self.loop.time() + DISCONNECT_CHECK_S
        try:
            while open_:
                try:
                    index, event = await asyncio.wait_for(self.events.get(), max(0.0, next_check - self.loop.time()))
                except asyncio.TimeoutError:
                    index, event = None, None
                if self.loop.time() >= next_check:
                    if await self.request.is_disconnected():
                        return
                    next_check = self.loop.time() + DISCONNECT_CHECK_S
                if event is None:
                    continue
                if event["type"] == "done":
                    open_ -= 1
                yield index, event
        finally:
            if open_:
                self.cancel()


def _failure(events: list[dict]) -> Optional[ApiError]:
    for event in events:
        if event["finish_reason"] == "error":
            return ApiError(500, event["error"], code="model_error")
        if event["finish_reason"] == "cancelled":
            return ApiError(503, "the server shut down before this request finished")
    return None


async def _collect(run: _Run) -> Optional[tuple[dict, dict]]:
    """A non-streaming request's results: (token infos, done event) per sequence index;
    None if the client went away first. Raises the first sequence's failure."""
    infos, done = {}, {}
    async for index, event in run.events_until_done():
        if event["type"] == "token":
            infos.setdefault(index, []).extend(event["tokens"])
        else:
            done[index] = event
    if len(done) < len(run.handles):
        return None
    failure = _failure(list(done.values()))
    if failure:
        raise failure
    return infos, done


def _usage(done: list[dict], prompts: list[list[int]]) -> dict:
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(e["completion_tokens"] for e in done)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class _Stream(StreamingResponse):
    """Server-sent events whose sequences are cancelled when the response ends early
    (the client went away): their slots free at the engine's next step."""

    def __init__(self, content, run: _Run):
        super().__init__(content, media_type="text/event-stream")
        self._run = run

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._run.cancel()


def _sse(payload) -> bytes:
    return b"data: " + (payload if isinstance(payload, bytes) else json.dumps(payload).encode()) + b"\n\n"


# ------------------------------------------------------------------------ completions


def _completion_logprobs(infos: list, offset: int) -> dict:
    """OpenAI's completions `logprobs` object for TokenInfos; prompt ones may be None (first)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for info in infos:
        text = "" if info is None else info.text
        out["tokens"].append(text)
        out["token_logprobs"].append(None if info is None else info.logprob)
        out["top_logprobs"].append(None if info is None else dict(info.top))
        out["text_offset"].append(offset)
        offset += len(text)
    return out


async def completions(request: Request) -> Response:
    served: Served = request.app.state.served
    body = await _json_body(request, served)
    if served.engine is None:
        raise ApiError(400, f"'{served.name}' is an encoder: it serves /v1/embeddings, not completions", "model")
    _unsupported(body)
    prompts = _prompts(served, body.get("prompt"))
    echo = _get(body, "echo", bool, False)
    logprobs = _get(body, "logprobs", int, None)
    params, n = _sampling(body, served.sampling, logprobs=logprobs, echo_logprobs=echo and logprobs is not None)
    stream = _get(body, "stream", bool, False)
    run = _Run(served, request)
    run.submit(prompts, params, n)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    prompt_texts = [served.tokenizer.decode(p) for p in prompts] if echo else None

    def prompt_logprobs(done: dict) -> list:
        return (done.get("prompt_logprobs") or []) if echo else []

    if stream:
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def sse():
            chunk = {"id": rid, "object": "text_completion", "created": created, "model": served.name}
            done_events, offsets = [], {}
            async for index, event in run.events_until_done():
                choice = {"index": index, "text": "", "logprobs": None, "finish_reason": None}
                if echo and index not in offsets:
                    choice["text"] = prompt_texts[index // n]
                offsets.setdefault(index, len(choice["text"]))
                if event["type"] == "token":
                    choice["text"] += event["text"]
                    if logprobs is not None:
                        choice["logprobs"] = _completion_logprobs(event["tokens"], offsets[index])
                    offsets[index] += len(event["text"])
                else:
                    failure = _failure([event])
                    if failure:
                        yield _sse({"error": {"message": failure.message, "code": failure.code}})
                        run.cancel()
                        return
                    done_events.append(event)
                    choice["finish_reason"] = event["finish_reason"]
                    if logprobs is not None and echo:
                        choice["logprobs"] = _completion_logprobs(prompt_logprobs(event), 0)
                yield _sse({**chunk, "choices": [choice]})
            if include_usage:
                yield _sse({**chunk, "choices": [], "usage": _usage(done_events, prompts)})
            yield _sse(b"[DONE]")

        return _Stream(sse(), run)

    collected = await _collect(run)
    if collected is None:
        return Response(status_code=499)  # the client has gone
    infos, done = collected
    choices = []
    for index in sorted(done):
        event = done[index]
        text = event["text"]
        lp = None
        if echo:
            text = prompt_texts[index // n] + text
        if logprobs is not None:
            prompt_part = prompt_logprobs(event)
            lp = _completion_logprobs(prompt_part + infos.get(index, []), 0)
        choices.append({"index": index, "text": text, "logprobs": lp, "finish_reason": event["finish_reason"]})
    return JSONResponse({
        "id": rid, "object": "text_completion", "created": created, "model": served.name,
        "choices": choices, "usage": _usage(list(done.values()), prompts),
    })


# ------------------------------------------------------------------------ chat


def _tools(served: Served, body: dict) -> tuple[Optional[list], bool]:
    """(the request's `tools` for the template, whether to parse tool calls from the reply)."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools is None:
        if choice not in (None, "none", "auto"):
            raise ApiError(400, "'tool_choice' needs 'tools'", "tool_choice")
        return None, False
    if not isinstance(tools, list) or not all(
            isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str) for t in tools):
        raise ApiError(400, "'tools' must be a list of {\"type\": \"function\", \"function\": {\"name\", "
                       "\"description\", \"parameters\"}}", "tools")
    if choice == "none":
        return tools, False
    if choice not in (None, "auto"):
        raise ApiError(400, f"tool_choice={choice!r} is not supported: use 'auto' or 'none' (forcing a call needs "
                       "constrained decoding, which this server lacks)", "tool_choice")
    if served.tool_parser is None:
        raise ApiError(400, "this server reads no tool calls from replies: start it with --tool-call-parser "
                       f"({' or '.join(tool_calls.PARSERS)}, the model's format), or send tool_choice 'none'", "tools")
    return tools, True


class _Reply:
    """One chat choice's text as the client gets it: the thinking split off into
    `reasoning_content` (--reasoning-parser) and tool calls read out (--tool-call-parser),
    the same whether the text comes in deltas or whole."""

    def __init__(self, served: Served, parse_calls: bool):
        self.splitter = reasoning.Splitter(served.reasoning_parser) if served.reasoning_parser else None
        self.parser = served.tool_parser if parse_calls else None
        self.content, self.sent = "", 0  # with tool calls to read: the content so far, and how much went out

    def feed(self, text: str) -> dict:
        """Delta fields to send for this piece of text."""
        thought, content = self.splitter.feed(text) if self.splitter else ("", text)
        fields = {"reasoning_content": thought} if thought else {}
        if self.parser:
            self.content += content
            ready = tool_calls.streamable(self.parser, self.content)
            if ready > self.sent:
                fields["content"], self.sent = self.content[self.sent:ready], ready
        elif content or not self.splitter:
            fields["content"] = content
        return fields

    def finish(self, finish_reason: str) -> tuple[dict, str]:
        """(the last delta fields, the finish reason: 'tool_calls' where the reply made some)."""
        thought, content = self.splitter.finish() if self.splitter else ("", "")
        fields = {"reasoning_content": thought} if thought else {}
        if self.parser:
            content, calls = tool_calls.parse(self.parser, self.content + content)
            content = (content or "")[self.sent:]  # what was streamed is the text before the first call
            if calls:
                fields["tool_calls"] = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                                         "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
                finish_reason = "tool_calls"
        if content:
            fields["content"] = content
        return fields, finish_reason

    def message(self, text: str, finish_reason: str) -> tuple[dict, str]:
        """A whole reply's (message, finish reason)."""
        first = self.feed(text)
        last, finish_reason = self.finish(finish_reason)
        message = {"role": "assistant", "content": first.get("content", "") + last.get("content", "")}
        if self.splitter:
            message["reasoning_content"] = first.get("reasoning_content", "") + last.get("reasoning_content", "") or None
        if "tool_calls" in last:
            message["content"] = message["content"] if message["content"].strip() else None
            message["tool_calls"] = last["tool_calls"]
        return message, finish_reason


def _chat_prompt(served: Served, body: dict, tools: Optional[list] = None) -> list[int]:
    from flaxformer_lite.data.chat import ChatTemplateError

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content}", "messages")
    for i, m in enumerate(messages):
        if isinstance(m, dict) and isinstance(m.get("content"), list):  # [{"type": "text", "text": ...}]
            parts = m["content"]
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in parts):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", "messages")
            messages[i] = {**m, "content": "".join(p.get("text", "") for p in parts)}
    if served.chat_template is None:
        raise ApiError(400, f"'{served.name}' has no chat template (chat_template.jinja or tokenizer_config.json's "
                       "chat_template): use /v1/completions", "messages")
    extra = dict(body.get("chat_template_kwargs") or {})
    if tools is not None:
        extra["tools"] = tools
    try:
        text = served.chat_template.render(tool_calls.template_messages(messages), add_generation_prompt=True,
                                           **extra)
    except ChatTemplateError as e:
        raise ApiError(400, str(e), "messages") from None
    if not text:
        raise ApiError(400, "the chat template rendered these messages as empty text", "messages")
    return served.tokenizer.encode(text, special=True)


async def chat_completions(request: Request) -> Response:
    served: Served = request.app.state.served
    body = await _json_body(request, served)
    if served.engine is None:
        raise ApiError(400, f"'{served.name}' is an encoder: it serves /v1/embeddings, not chat", "model")
    _unsupported(body)
    tools, parse_calls = _tools(served, body)
    prompt = _chat_prompt(served, body, tools)
    want_logprobs = _get(body, "logprobs", bool, False)
    top = _get(body, "top_logprobs", int, 0) if want_logprobs else None
    params, n = _sampling(body, served.sampling, logprobs=top, echo_logprobs=False)
    stream = _get(body, "stream", bool, False)
    run = _Run(served, request)
    run.submit([prompt], params, n)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chat_logprobs(infos):
        if not want_logprobs:
            return None
        return {"content": [{"token": t.text, "logprob": t.logprob, "bytes": list(t.text.encode()),
                             "top_logprobs": [{"token": s, "logprob": lp, "bytes": list(s.encode())}
                                              for s, lp in t.top]}
                            for t in infos]}

    if stream:
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def sse():
            chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": served.name}
            replies, done_events = {}, []
            async for index, event in run.events_until_done():
                delta = {} if index in replies else {"role": "assistant", "content": ""}
                reply = replies.setdefault(index, _Reply(served, parse_calls))
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
                if event["type"] == "token":  # what may be a tool call waits for the end (below)
                    delta.update(reply.feed(event["text"]))
                    choice["logprobs"] = chat_logprobs(event["tokens"])
                else:
                    failure = _failure([event])
                    if failure:
                        yield _sse({"error": {"message": failure.message, "code": failure.code}})
                        run.cancel()
                        return
                    done_events.append(event)
                    last, choice["finish_reason"] = reply.finish(event["finish_reason"])
                    if "tool_calls" in last:
                        last["tool_calls"] = [{"index": k, **call} for k, call in enumerate(last["tool_calls"])]
                    delta.update(last)
                yield _sse({**chunk, "choices": [choice]})
            if include_usage:
                yield _sse({**chunk, "choices": [], "usage": _usage(done_events, [prompt])})
            yield _sse(b"[DONE]")

        return _Stream(sse(), run)

    collected = await _collect(run)
    if collected is None:
        return Response(status_code=499)  # the client has gone
    infos, done = collected
    choices = []
    for i in sorted(done):
        message, finish_reason = _Reply(served, parse_calls).message(done[i]["text"], done[i]["finish_reason"])
        choices.append({"index": i, "message": message, "logprobs": chat_logprobs(infos.get(i, [])),
                        "finish_reason": finish_reason})
    return JSONResponse({
        "id": rid, "object": "chat.completion", "created": created, "model": served.name,
        "choices": choices, "usage": _usage(list(done.values()), [prompt]),
    })


# ------------------------------------------------------------------------ embeddings, models, health


async def embeddings(request: Request) -> Response:
    served: Served = request.app.state.served
    body = await _json_body(request, served)
    if served.embedder is None:
        raise ApiError(400, f"'{served.name}' is a generative model: /v1/embeddings needs an encoder (BERT-like)",
                       "model")
    inputs = body.get("input")
    if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and all(isinstance(t, int) for t in inputs)):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs or any(i in ("", []) for i in inputs):
        raise ApiError(400, "'input' must be a non-empty string or list of them (or token ids), none empty", "input")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise ApiError(400, f"encoding_format {encoding!r}: use 'float' or 'base64'", "encoding_format")
    try:
        vectors, tokens = await served.embedder.embed(inputs)
    except EngineError as e:
        raise ApiError(e.http_status, str(e), "input") from None
    if encoding == "base64":  # little-endian float32, as OpenAI's client decodes it
        vectors = [base64.b64encode(np.asarray(v, "<f4").tobytes()).decode() for v in vectors]
    return JSONResponse({
        "object": "list", "model": served.name,
        "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })


async def models(request: Request) -> Response:
    served: Served = request.app.state.served
    return JSONResponse({"object": "list", "data": [{
        "id": served.name, "object": "model", "created": served.created, "owned_by": "flaxformer_lite",
        "max_model_len": served.max_len,
    }]})


async def health(request: Request) -> Response:
    """200 {"status": "ok"} while serving; 503 while draining, or with "failed" and the
    reason once the engine has died (the process then exits for a supervisor to restart)."""
    served: Served = request.app.state.served
    engine = served.engine
    failure = getattr(engine, "failure", None)
    body = {
        "status": "failed" if failure else "draining" if served.draining else "ok",
        "model": served.name,
        "compilations_after_warmup": served.compilations(),
    }
    if failure:
        body["error"] = failure
    if engine is not None:
        body.update(running=engine.busy() - engine.queued(), waiting=engine.queued(), max_batch=engine.max_batch,
                    stats=dict(engine.stats))
    return JSONResponse(body, status_code=503 if failure or served.draining else 200)


async def _json_body(request: Request, served: Served) -> dict:
    if served.draining:
        raise ApiError(503, "the server is shutting down and takes no new requests")
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    _check_model(served, body)
    return body


async def _api_error(request: Request, exc: ApiError) -> Response:
    return exc.response()


def build_app(served: Served, on_shutdown: Callable[[], None] = lambda: None) -> Starlette:
    """The Starlette app serving `served`; `on_shutdown` runs when the server stops."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        on_shutdown()

    app = Starlette(
        routes=[
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
        ],
        exception_handlers={ApiError: _api_error},
        lifespan=lifespan,
    )
    app.state.served = served
    return app
