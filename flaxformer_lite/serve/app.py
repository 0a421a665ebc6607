"""The HTTP side: OpenAI's /v1 routes as a Starlette (ASGI) app over the engine.

    app = build_app(Served(name, engine=engine, tokenizer=tok, ...), policy=access.Policy(...))
    # POST /v1/completions, /v1/chat/completions, /v1/embeddings, /v1/load_lora_adapter,
    # /v1/unload_lora_adapter; GET /v1/models, /health, /metrics (Prometheus), /openapi.json

Handlers run on the event loop and never call JAX: they read the body (JSON only, at most
--max-body-bytes, counted as it arrives), parse it into the protocol's typed models
(serve/protocol.py), check the prompt's length in characters, tokenize and render chat
templates on a thread of their own, submit sequences to the engine (which runs JAX on its
own thread) and turn its events, handed over with `loop.call_soon_threadsafe`, into a
JSON body or server-sent events. A request's `model` names the base or one of the
engine's loaded LoRA adapters (--peft NAME=DIR, /v1/load_lora_adapter). Errors have OpenAI's shape, {"error": {"message",
"type", "param", "code"}}: 400 bad parameters (the field named), 401 no or a wrong key,
404 unknown model (or adapter), 409 no free adapter entry, 413 body too large, 415 not
JSON, 429 (with Retry-After) when the queue is full, 503 while the server drains, 500 when the model fails on a request (non-finite
logits) or the server has a bug (no traceback goes to the client).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import re
import secrets
import time
import uuid
from typing import Any, Callable, Optional

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from flaxformer_lite.inference.engine import EngineError, SamplingParams
from flaxformer_lite.serve import access, protocol, reasoning
from flaxformer_lite.serve import tools as tool_calls
from flaxformer_lite.serve.metrics import Metrics, RequestCounter
from flaxformer_lite.serve.protocol import ApiError

RETRY_AFTER_S = 1
DISCONNECT_CHECK_S = 1.0  # how often a request looks for its client having gone
MAX_BODY_BYTES = 4 * 2**20  # --max-body-bytes' default
# Characters per token far above what text averages (about 4 in English BPE): a prompt
# longer than max_len times this cannot fit and is refused before the tokenizer sees it.
CHARS_PER_TOKEN = 32
# Sampling knobs OpenAI defines that this server does not implement: any value but the
# neutral one is refused by name rather than ignored.
_NEUTRAL = {"best_of": 1, "suffix": ""}


def _error_response(error: ApiError) -> JSONResponse:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if error.http_status in (429, 503) else None
    return JSONResponse(error.body(), status_code=error.http_status, headers=headers)


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
    max_body_bytes: int = MAX_BODY_BYTES  # larger bodies get 413, counted while they are read
    allow_special_tokens: bool = False  # parse special-token text in user and tool messages
    # A PEFT folder's (model.lora, adapters) for this base, for /v1/load_lora_adapter; None: none load.
    read_adapter: Optional[Callable[[str], tuple]] = None
    adapter_folders: dict = dataclasses.field(default_factory=dict)  # adapter name -> its folder, for /v1/models

    @property
    def draining(self) -> bool:
        worker = self.engine or self.embedder
        return worker.draining

    def adapters(self) -> list[str]:
        """The names of the LoRA adapters requests may name now."""
        return self.engine.adapters() if self.engine is not None else []


# ------------------------------------------------------------------------ request parsing


def _check_model(served: Served, model: Optional[str]) -> None:
    if model is not None and model != served.name and model not in served.adapters():
        known = ", ".join(f"'{name}'" for name in [served.name, *served.adapters()])
        raise ApiError(404, f"The model '{model}' does not exist: this server serves {known} (GET /v1/models)",
                       "model", "model_not_found")


def _adapter(served: Served, body) -> Optional[str]:
    """The adapter a request names (None: the base), its model checked by _json_body."""
    return None if body.model in (None, served.name) else body.model


def _unsupported(body) -> None:
    for key, neutral in _NEUTRAL.items():
        value = getattr(body, key, None)
        if value is not None and value != neutral:
            raise ApiError(400, f"'{key}' is not supported by this server; leave it out (or at {neutral!r})", key)
    for legacy in ("functions", "function_call"):
        if getattr(body, legacy, None) is not None:
            raise ApiError(400, f"'{legacy}' is OpenAI's deprecated form of tools: send 'tools' (and 'tool_choice')",
                           legacy)


def _or(value, default):
    return default if value is None else value


def _sampling(body, defaults: dict, *, logprobs: Optional[int], echo_logprobs: bool,
              vocab_size: Optional[int] = None) -> tuple[SamplingParams, int]:
    """(SamplingParams, n) from a parsed request (or a dict of its sampling fields);
    temperature, top_p, top_k and repetition_penalty it leaves out come from `defaults`
    (the checkpoint's generation_config.json), else OpenAI's (vLLM's for its extensions)."""
    if isinstance(body, dict):
        body = protocol.parse(protocol.SamplingFields, json.dumps(body).encode())
    stop = body.stop
    stop = [stop] if isinstance(stop, str) else (stop or [])
    top_k = _or(body.top_k, defaults.get("top_k", 0))
    if vocab_size is not None and top_k > vocab_size:
        raise ApiError(400, f"'top_k'={top_k} exceeds the vocabulary ({vocab_size} tokens): use at most that, "
                       "or -1 for no filter", "top_k")
    max_tokens = _or(body.max_tokens, _or(getattr(body, "max_completion_tokens", None), 16))
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=_or(body.temperature, defaults.get("temperature", 1.0)),
        top_p=_or(body.top_p, defaults.get("top_p", 1.0)),
        top_k=0 if top_k == -1 else top_k,  # vLLM spells "off" as -1
        repetition_penalty=_or(body.repetition_penalty, defaults.get("repetition_penalty", 1.0)),
        presence_penalty=_or(body.presence_penalty, 0.0),
        frequency_penalty=_or(body.frequency_penalty, 0.0),
        logit_bias=tuple((int(k), float(v)) for k, v in (body.logit_bias or {}).items()),
        seed=secrets.randbits(32) if body.seed is None else body.seed,
        stop=tuple(stop),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=bool(body.ignore_eos),
        logprobs=logprobs,
        echo_logprobs=echo_logprobs,
    )
    return params, _or(body.n, 1)


def _check_chars(served: Served, texts, field: str) -> None:
    """Refuse text that cannot fit the context whatever its tokens, before tokenizing it."""
    limit = served.max_len * CHARS_PER_TOKEN
    chars = sum(len(t) for t in texts)
    if chars > limit:
        raise ApiError(400, f"'{field}' holds {chars} characters, more than a {served.max_len}-token context can "
                       f"take ({limit} characters at {CHARS_PER_TOKEN} per token at most): shorten it", field)


def _prompts(served: Served, prompt) -> list[list[int]]:
    """Token ids of each prompt: a string, a list of strings, a list of ids or of id lists
    (shapes checked by the protocol). Runs off the event loop (tokenizing)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif isinstance(prompt[0], int):
        prompt = [prompt]
    return [served.tokenizer.encode(p, bos=served.add_bos) if isinstance(p, str) else list(p) for p in prompt]


def _constrained(body, forced_tools: Optional[list] = None) -> bool:
    """Whether the reply must follow a grammar: a forced tool call, or a JSON response_format."""
    return forced_tools is not None or (body.response_format is not None and body.response_format.type != "text")


def _grammar(served: Served, body, forced_tools: Optional[list] = None):
    """The grammar a reply must follow (inference.grammar.Grammar), None if free: a forced
    tool call's, else `response_format`'s. Runs off the event loop (building one takes ms)."""
    from flaxformer_lite.inference.grammar import GrammarError

    if not _constrained(body, forced_tools):
        return None
    response_format = body.response_format
    grammars = served.engine.grammars
    try:
        if forced_tools is None:
            if response_format.type == "json_object":
                return grammars.json_schema({"type": "object"}, "response_format")
            return grammars.json_schema(response_format.json_schema.schema_, "response_format.json_schema.schema")
        if response_format is not None and response_format.type != "text":
            raise ApiError(400, "a reply forced to be a tool call cannot also follow 'response_format': send one "
                           "of the two", "response_format")
        parallel = body.tool_choice == "required" and body.parallel_tool_calls is not False
        return grammars.tool_calls(served.tool_parser, forced_tools, parallel=parallel)
    except GrammarError as e:
        raise ApiError(400, str(e), e.field) from None


async def _off_loop(request: Request, fn, *args):
    """fn(*args) on the app's tokenizing thread, so no stream waits on another request's input."""
    return await asyncio.get_running_loop().run_in_executor(request.app.state.tokenizing, fn, *args)


# ------------------------------------------------------------------------ running sequences


class _Run:
    """The sequences of one request and their events, on the event loop."""

    def __init__(self, served: Served, request: Request):
        self.served, self.request = served, request
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.handles = []
        self.metrics: Metrics = request.app.state.metrics
        self.clocks = {}
        self.arrived = request.scope.get("ffl.arrived", time.perf_counter())

    def submit(self, prompts: list[list[int]], params: SamplingParams, n: int, adapter: Optional[str]) -> None:
        engine = self.served.engine
        try:
            for p in prompts:
                engine.check(p, params)
            for i, p in enumerate(prompts):
                for j in range(n):
                    sink = functools.partial(self._sink, i * n + j)
                    self.handles.append(engine.submit(p, dataclasses.replace(params, choice=j), sink, adapter=adapter))
        except EngineError as e:
            self.cancel()
            raise ApiError(e.http_status, str(e), "model" if e.http_status == 404 else None) from None

    def _sink(self, index: int, event: dict) -> None:
        """Called on the engine thread: hand the event to the event loop."""
        if event["type"] == "token":
            clock = self.clocks.get(index)
            if clock is None:
                clock = self.clocks[index] = self.metrics.sequence(self.arrived)
            clock.token(event)
        else:
            self.metrics.finished(event)
            event = {**event, "index": index}
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


def _failure(events: list[dict], engine) -> Optional[ApiError]:
    """The error response for a request's first failed sequence: 503 when the engine
    itself stopped (a supervisor restarts the server), 500 for this request's own fault."""
    for event in events:
        if event["finish_reason"] == "error":
            if getattr(engine, "failure", None):
                return ApiError(503, f"the engine stopped: {engine.failure}", code="engine_failed")
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
    failure = _failure(list(done.values()), run.served.engine)
    if failure:
        raise failure
    return infos, done


def _usage(done: list[dict], prompts: list[list[int]]) -> dict:
    """OpenAI's usage: each prompt counted once (whatever `n`), with the most of its tokens
    any of its choices read from the prefix cache."""
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(e["completion_tokens"] for e in done)
    n = max(1, len(done) // len(prompts))
    cached = collections.Counter()
    for e in done:
        cached[e["index"] // n] = max(cached[e["index"] // n], e["cached_tokens"])
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": sum(cached.values())}}


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


def _text_offsets(tokenizer, ids: list, texts: list, start: int) -> list[int]:
    """Where each token's text starts in the decoded text of `ids`, plus `start`. Token texts
    joined are that text unless a token splits a character or the decoder merges pieces;
    then each offset is the length of its prefix decoded."""
    if len(ids) <= 1 or "".join(texts) == tokenizer.decode(ids):  # one token (a streamed event): no decode
        offsets, at = [], start
        for text in texts:
            offsets.append(at)
            at += len(text)
        return offsets
    return [start + len(tokenizer.decode(ids[:i])) for i in range(len(ids))]


def _completion_logprobs(tokenizer, infos: list, start: int, first_id: Optional[int] = None) -> dict:
    """OpenAI's completions `logprobs` object for TokenInfos from offset `start`. A prompt's
    first token has no log-prob (None): its text is that of `first_id`."""
    texts = [tokenizer.decode([first_id]) if info is None else info.text for info in infos]
    ids = [first_id if info is None else info.id for info in infos]
    return {"tokens": texts,
            "token_logprobs": [None if info is None else info.logprob for info in infos],
            "top_logprobs": [None if info is None else dict(info.top) for info in infos],
            "text_offset": _text_offsets(tokenizer, ids, texts, start)}


async def completions(request: Request) -> Response:
    served: Served = request.app.state.served
    body = await _json_body(request, served, protocol.CompletionRequest)
    if served.engine is None:
        raise ApiError(400, f"'{served.name}' is an encoder: it serves /v1/embeddings, not completions", "model")
    _unsupported(body)
    if isinstance(body.prompt, str) or isinstance(body.prompt[0], str):
        _check_chars(served, [body.prompt] if isinstance(body.prompt, str) else body.prompt, "prompt")
    echo, logprobs = bool(body.echo), body.logprobs
    params, n = _sampling(body, served.sampling, logprobs=logprobs, echo_logprobs=echo and logprobs is not None,
                          vocab_size=served.tokenizer.vocab_size)
    tokenizer = served.tokenizer

    def tokenize():
        prompts = _prompts(served, body.prompt)
        return prompts, [tokenizer.decode(p) for p in prompts] if echo else None, _grammar(served, body)

    prompts, prompt_texts, grammar = await _off_loop(request, tokenize)
    if grammar is not None:
        params = dataclasses.replace(params, grammar=grammar)
    run = _Run(served, request)
    adapter = _adapter(served, body)
    run.submit(prompts, params, n, adapter)
    rid, created, model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), adapter or served.name

    def scored_prompt(index: int, done: dict) -> Optional[dict]:
        """The echoed prompt's logprobs object (its tokens from offset 0), None without echo."""
        if not (echo and done.get("prompt_logprobs")):
            return None
        return _completion_logprobs(tokenizer, done["prompt_logprobs"], 0, prompts[index // n][0])

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def sse():
            chunk = {"id": rid, "object": "text_completion", "created": created, "model": model}
            done_events, offsets = [], {}
            async for index, event in run.events_until_done():
                choice = {"index": index, "text": "", "logprobs": None, "finish_reason": None}
                if echo and index not in offsets:
                    choice["text"] = prompt_texts[index // n]
                offsets.setdefault(index, len(choice["text"]))
                if event["type"] == "token":
                    choice["text"] += event["text"]
                    if logprobs is not None:
                        choice["logprobs"] = _completion_logprobs(tokenizer, event["tokens"], offsets[index])
                    offsets[index] += len(event["text"])
                else:
                    failure = _failure([event], run.served.engine)
                    if failure:
                        yield _sse({"error": {"message": failure.message, "code": failure.code}})
                        run.cancel()
                        return
                    done_events.append(event)
                    choice["finish_reason"] = event["finish_reason"]
                    if logprobs is not None and echo:
                        choice["logprobs"] = await _off_loop(request, scored_prompt, index, event)
                yield _sse({**chunk, "choices": [choice]})
            if include_usage:
                yield _sse({**chunk, "choices": [], "usage": _usage(done_events, prompts)})
            yield _sse(b"[DONE]")

        return _Stream(sse(), run)

    collected = await _collect(run)
    if collected is None:
        return Response(status_code=499)  # the client has gone
    infos, done = collected

    def choices():
        out = []
        for index in sorted(done):
            event = done[index]
            text, lp = event["text"], None
            if echo:
                text = prompt_texts[index // n] + text
            if logprobs is not None:
                lp = _completion_logprobs(tokenizer, infos.get(index, []), len(text) - len(event["text"]))
                prompt_part = scored_prompt(index, event)
                if prompt_part is not None:
                    lp = {key: prompt_part[key] + lp[key] for key in lp}
            out.append({"index": index, "text": text, "logprobs": lp, "finish_reason": event["finish_reason"]})
        return out

    return JSONResponse({
        "id": rid, "object": "text_completion", "created": created, "model": model,
        "choices": await _off_loop(request, choices), "usage": _usage(list(done.values()), prompts),
    })


# ------------------------------------------------------------------------ chat


def _tools(served: Served, body: protocol.ChatCompletionRequest) -> tuple[Optional[list], bool, Optional[list]]:
    """(the request's `tools` for the template, whether to parse tool calls from the reply,
    the tools a reply must call one of: all for 'required', the named one, else None)."""
    choice = body.tool_choice
    if body.tools is None:
        if choice not in (None, "none", "auto"):
            raise ApiError(400, "'tool_choice' needs 'tools'", "tool_choice")
        return None, False, None
    tools = [t.model_dump(exclude_unset=True) for t in body.tools]
    if choice == "none":
        return tools, False, None
    if served.tool_parser is None:
        raise ApiError(400, "this server reads no tool calls from replies: start it with --tool-call-parser "
                       f"({' or '.join(tool_calls.PARSERS)}, the model's format), or send tool_choice 'none'", "tools")
    if choice in (None, "auto"):
        return tools, True, None
    if choice == "required":
        return tools, True, tools
    name = choice.function.get("name")
    named = [t for t in tools if t["function"]["name"] == name]
    if not named:
        raise ApiError(400, f"tool_choice names the function {name!r}, which is not among 'tools' "
                       f"({', '.join(t['function']['name'] for t in tools)})", "tool_choice")
    return tools, True, named[:1]


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


UNTRUSTED_ROLES = ("user", "tool")  # whose content is text, never control tokens (--allow-special-tokens)


def _messages(body: protocol.ChatCompletionRequest) -> list[dict]:
    """The conversation as the template reads it: dicts, text parts joined."""
    out = []
    for m in body.messages:
        message = m.model_dump(exclude_unset=True)
        if isinstance(m.content, list):
            message["content"] = m.text()
        out.append(message)
    return out


def _chat_prompt(served: Served, messages: list[dict], extra: dict) -> list[int]:
    """Token ids of the rendered conversation. The template's own text is read with its
    special tokens; user and tool content that spells one ("<|im_end|>") stays text: it is
    rendered as a marker, and the text between markers is encoded apart from the content."""
    from flaxformer_lite.data.chat import ChatTemplateError

    tok = served.tokenizer

    def render(msgs):
        try:
            text = served.chat_template.render(tool_calls.template_messages(msgs), add_generation_prompt=True, **extra)
        except ChatTemplateError as e:
            raise ApiError(400, str(e), "messages") from None
        if not text:
            raise ApiError(400, "the chat template rendered these messages as empty text", "messages")
        return text

    risky = [] if served.allow_special_tokens else [
        i for i, m in enumerate(messages) if m.get("role") in UNTRUSTED_ROLES and isinstance(m.get("content"), str)
        and m["content"] and tok.encode(m["content"], special=True) != tok.encode(m["content"])]
    if not risky:
        return tok.encode(render(messages), special=True)
    nonce = secrets.token_hex(8)
    marked = [{**m, "content": f"\x00{nonce}:{i}\x00"} if i in risky else m for i, m in enumerate(messages)]
    pieces = re.split(f"\x00{nonce}:(\\d+)\x00", render(marked))
    placed = sorted(int(i) for i in pieces[1::2])
    if placed != risky:
        first = next(i for i in risky if placed.count(i) != 1)
        raise ApiError(400, f"messages[{first}].content spells a special token, and this chat template does not "
                       "write the content as given, so it cannot be kept as plain text: remove the special-token "
                       "text, or start the server with --allow-special-tokens", f"messages[{first}].content")
    ids = []
    for k, piece in enumerate(pieces):
        if k % 2:
            ids += tok.encode(messages[int(piece)]["content"])
        elif piece:
            ids += tok.encode(piece, special=True)
    return ids


async def chat_completions(request: Request) -> Response:
    served: Served = request.app.state.served
    body = await _json_body(request, served, protocol.ChatCompletionRequest)
    if served.engine is None:
        raise ApiError(400, f"'{served.name}' is an encoder: it serves /v1/embeddings, not chat", "model")
    _unsupported(body)
    if served.chat_template is None:
        raise ApiError(400, f"'{served.name}' has no chat template (chat_template.jinja or tokenizer_config.json's "
                       "chat_template): use /v1/completions", "messages")
    tools, parse_calls, forced_tools = _tools(served, body)
    messages = _messages(body)
    _check_chars(served, [m["content"] for m in messages if isinstance(m.get("content"), str)], "messages")
    extra = dict(body.chat_template_kwargs or {})
    if tools is not None:
        extra["tools"] = tools
    want_logprobs = bool(body.logprobs)
    top = _or(body.top_logprobs, 0) if want_logprobs else None
    params, n = _sampling(body, served.sampling, logprobs=top, echo_logprobs=False,
                          vocab_size=served.tokenizer.vocab_size)
    prompt = await _off_loop(request, _chat_prompt, served, messages, extra)
    if _constrained(body, forced_tools):
        params = dataclasses.replace(params, grammar=await _off_loop(request, _grammar, served, body, forced_tools))
    stream = bool(body.stream)
    run = _Run(served, request)
    adapter = _adapter(served, body)
    run.submit([prompt], params, n, adapter)
    rid, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), adapter or served.name

    def chat_logprobs(infos):
        if not want_logprobs:
            return None
        return {"content": [{"token": t.text, "logprob": t.logprob, "bytes": list(t.text.encode()),
                             "top_logprobs": [{"token": s, "logprob": lp, "bytes": list(s.encode())}
                                              for s, lp in t.top]}
                            for t in infos]}

    if stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def sse():
            chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
            replies, done_events = {}, []
            async for index, event in run.events_until_done():
                delta = {} if index in replies else {"role": "assistant", "content": ""}
                reply = replies.setdefault(index, _Reply(served, parse_calls))
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
                if event["type"] == "token":  # what may be a tool call waits for the end (below)
                    delta.update(reply.feed(event["text"]))
                    choice["logprobs"] = chat_logprobs(event["tokens"])
                else:
                    failure = _failure([event], run.served.engine)
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
        "id": rid, "object": "chat.completion", "created": created, "model": model,
        "choices": choices, "usage": _usage(list(done.values()), [prompt]),
    })


# ------------------------------------------------------------------------ embeddings, models, health


async def embeddings(request: Request) -> Response:
    served: Served = request.app.state.served
    body = await _json_body(request, served, protocol.EmbeddingRequest)
    if served.embedder is None:
        raise ApiError(400, f"'{served.name}' is a generative model: /v1/embeddings needs an encoder (BERT-like)",
                       "model")
    inputs = body.input
    if isinstance(inputs, str) or isinstance(inputs[0], int):
        inputs = [inputs]
    for i, text in enumerate(inputs):
        if isinstance(text, str):
            _check_chars(served, [text], f"input[{i}]")
    try:
        vectors, tokens = await served.embedder.embed(inputs)
    except EngineError as e:
        raise ApiError(e.http_status, str(e), "input") from None
    if body.encoding_format == "base64":  # little-endian float32, as OpenAI's client decodes it
        vectors = [base64.b64encode(np.asarray(v, "<f4").tobytes()).decode() for v in vectors]
    return JSONResponse({
        "object": "list", "model": served.name,
        "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })


async def models(request: Request) -> Response:
    served: Served = request.app.state.served
    card = {"object": "model", "created": served.created, "owned_by": "flaxformer_lite",
            "max_model_len": served.max_len}
    return JSONResponse({"object": "list", "data": [{"id": served.name, **card}, *(
        {"id": name, **card, "root": served.adapter_folders.get(name), "parent": served.name}
        for name in served.adapters())]})


def _adapter_table(served: Served) -> Any:
    """The engine, if it holds adapters (else ApiError naming --max-adapters)."""
    if served.engine is None or not served.engine.max_adapters or served.read_adapter is None:
        raise ApiError(400, "this server holds no LoRA adapters: start it with --max-adapters N (and --hf)",
                       "lora_name")
    return served.engine


async def load_lora_adapter(request: Request) -> Response:
    """vLLM's route: read a PEFT folder (off the event loop), write it into a free entry of
    the engine's adapter table, and answer once requests may name it."""
    served: Served = request.app.state.served
    body = await _json_body(request, served, protocol.LoadLoraAdapterRequest)
    engine = _adapter_table(served)
    if body.lora_name == served.name or body.lora_name in served.adapters():
        raise ApiError(400, f"'{body.lora_name}' already names a model of this server: unload it first, or pick "
                       "another lora_name", "lora_name")
    loop = asyncio.get_running_loop()
    try:
        adapter = await loop.run_in_executor(None, served.read_adapter, body.lora_path)
        await asyncio.wrap_future(engine.load_adapter(body.lora_name, *adapter))
    except EngineError as e:
        raise ApiError(e.http_status, str(e), "lora_path" if e.http_status == 400 else "lora_name") from None
    except ValueError as e:  # the folder: HFError, or a file that is not safetensors or JSON
        raise ApiError(400, f"lora_path: {e}", "lora_path") from None
    served.adapter_folders[body.lora_name] = body.lora_path
    return JSONResponse({"id": body.lora_name, "object": "lora_adapter", "status": "loaded"})


async def unload_lora_adapter(request: Request) -> Response:
    """vLLM's route: new requests may no longer name the adapter; those running on it finish."""
    served: Served = request.app.state.served
    body = await _json_body(request, served, protocol.UnloadLoraAdapterRequest)
    try:
        _adapter_table(served).unload_adapter(body.lora_name)
    except EngineError as e:
        raise ApiError(e.http_status, str(e), "lora_name") from None
    served.adapter_folders.pop(body.lora_name, None)
    return JSONResponse({"id": body.lora_name, "object": "lora_adapter", "status": "unloaded"})


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


async def metrics(request: Request) -> Response:
    content, media_type = request.app.state.metrics.exposition()
    return Response(content, media_type=media_type)


async def openapi(request: Request) -> Response:
    return JSONResponse(request.app.state.openapi)


async def _json_body(request: Request, served: Served, model: type):
    """The request body parsed into `model`: only application/json (415), at most
    served.max_body_bytes (413, counted as it arrives, so a larger body is never held)."""
    if served.draining:
        raise ApiError(503, "the server is shutting down and takes no new requests")
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise ApiError(415, f"the body must be JSON sent with 'Content-Type: application/json', got "
                       f"{kind or 'no Content-Type'!r}")
    limit = served.max_body_bytes
    too_large = ApiError(413, f"the request body exceeds {limit} bytes (the server's --max-body-bytes)")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    body = protocol.parse(model, b"".join(chunks))
    _check_model(served, getattr(body, "model", None))
    return body


async def _api_error(request: Request, exc: ApiError) -> Response:
    return _error_response(exc)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    return _error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}"))


async def _server_error(request: Request, exc: Exception) -> Response:
    # Starlette logs the traceback; the client gets OpenAI's shape, not the trace.
    return _error_response(ApiError(500, f"internal error ({type(exc).__name__}); the server log has the details"))


class _Arrival:
    """ASGI middleware stamping each request's arrival (for time to first token)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        scope["ffl.arrived"] = time.perf_counter()
        await self.app(scope, receive, send)


def build_app(served: Served, on_shutdown: Callable[[], None] = lambda: None,
              policy: Optional[access.Policy] = None) -> Starlette:
    """The Starlette app serving `served` under `policy` (access.Policy: keys, Host check,
    CORS; the default checks nothing); `on_shutdown` runs when the server stops."""
    policy = policy or access.Policy()
    tokenizing = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenize")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        tokenizing.shutdown(wait=False, cancel_futures=True)
        on_shutdown()

    collectors = Metrics(served)
    app = Starlette(
        routes=[
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/load_lora_adapter", load_lora_adapter, methods=["POST"]),
            Route("/v1/unload_lora_adapter", unload_lora_adapter, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"]),
        ],
        middleware=[Middleware(_Arrival), Middleware(RequestCounter, metrics=collectors), *access.middleware(policy)],
        exception_handlers={ApiError: _api_error, HTTPException: _http_error, Exception: _server_error},
        lifespan=lifespan,
    )
    app.state.served, app.state.metrics, app.state.tokenizing = served, collectors, tokenizing
    app.state.openapi = protocol.openapi(f"flaxformer_lite: {served.name}", "1", secured=bool(policy.api_keys))
    return app
