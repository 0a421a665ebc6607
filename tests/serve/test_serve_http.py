"""`flaxformer-lite serve` through the real `openai` client: completions, chat, streaming,
batching that changes no output, seeded sampling, stop strings, usage, logprobs, errors,
a full queue, a client leaving mid-stream, and SIGTERM draining."""

import concurrent.futures
import math
import signal
import threading
import time

import openai
import pytest

WORDS = "the quick brown fox jumps over a lazy dog while seven wise owls count stars near".split()
# 16 prompts of 1 to 16 words (up to ~50 tokens): many span several 16-token prefill chunks.
PROMPTS = [" ".join((WORDS * 2)[i:i + 1 + (5 * i) % 16]) for i in range(16)]


def _complete(client, prompt, **kw):
    kw = {"max_tokens": 24, "temperature": 0, **kw}
    return client.completions.create(model="tiny", prompt=prompt, **kw)


def _streamed(client, **kw):
    """(text, finish_reason, usage) of a streamed completion."""
    text, finish, usage = "", None, None
    for chunk in client.completions.create(model="tiny", stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.text
            finish = choice.finish_reason or finish
    return text, finish, usage


def test_models_and_health(servers):
    server = servers["main"]
    assert [m.id for m in server.client().models.list().data] == ["tiny"]
    health = server.health()
    assert health["status"] == "ok" and health["max_batch"] == 16


def test_completion_stream_equals_plain_and_usage_counts(servers, hf_dir):
    from flaxformer_lite.interop import hf

    client = servers["main"].client()
    tokenizer = hf.load_tokenizer(hf_dir)
    prompt = PROMPTS[5]
    plain = _complete(client, prompt, max_tokens=20, extra_body={"ignore_eos": True})
    text, finish, usage = _streamed(client, prompt=prompt, max_tokens=20, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert text == plain.choices[0].text and finish == plain.choices[0].finish_reason == "length"
    n_prompt = len(tokenizer.encode(prompt))
    for u in (plain.usage, usage):
        assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (n_prompt, 20, n_prompt + 20)
    # The second request reads the first's whole 16-token blocks from the prefix cache.
    assert n_prompt > 16 and plain.usage.prompt_tokens_details.cached_tokens == 0
    assert usage.prompt_tokens_details.cached_tokens == 16 * ((n_prompt - 1) // 16)


def test_sixteen_concurrent_greedy_requests_equal_their_solo_outputs(servers):
    client = servers["main"].client()
    solo = [_complete(client, p).choices[0].text for p in PROMPTS]
    assert len(set(solo)) > 1  # the prompts lead different ways
    barrier = threading.Barrier(len(PROMPTS))

    def together(prompt):
        barrier.wait()
        return _complete(client, prompt).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        batched = list(pool.map(together, PROMPTS))
    assert batched == solo
    assert servers["main"].health()["compilations_after_warmup"] == 0


def test_seeded_sampling_is_reproducible_under_load(servers):
    client = servers["main"].client()
    kw = {"seed": 11, "temperature": 0.9, "top_p": 0.9, "extra_body": {"top_k": 50}}
    alone = _complete(client, PROMPTS[2], **kw)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        others = [pool.submit(_complete, client, p, temperature=1.0) for p in PROMPTS[:3]]
        again = _complete(client, PROMPTS[2], **kw)
        [f.result() for f in others]
    assert again.choices[0].text == alone.choices[0].text
    two = _complete(client, PROMPTS[2], n=2, **kw)
    assert two.choices[0].text == alone.choices[0].text  # choice 0 draws as a lone request does
    assert [c.index for c in two.choices] == [0, 1]


def test_stop_strings_cut_the_text_exactly(servers):
    client = servers["main"].client()
    full = _complete(client, PROMPTS[7], max_tokens=40, extra_body={"ignore_eos": True}).choices[0].text
    clean = [i for i in range(5, len(full) - 3) if "\ufffd" not in full[i:i + 3]]
    assert clean, full
    stop = full[clean[len(clean) // 2]:clean[len(clean) // 2] + 3]
    cut = _complete(client, PROMPTS[7], max_tokens=40, stop=[stop, "\x00never"], extra_body={"ignore_eos": True})
    assert cut.choices[0].text == full[:full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    text, finish, _ = _streamed(client, prompt=PROMPTS[7], max_tokens=40, temperature=0, stop=stop,
                                extra_body={"ignore_eos": True})
    assert (text, finish) == (cut.choices[0].text, "stop")


def test_echo_logprobs_score_a_prompt_as_lm_eval_asks(servers, hf_dir):
    from flaxformer_lite.interop import hf

    client = servers["main"].client()
    tokenizer = hf.load_tokenizer(hf_dir)
    ids = tokenizer.encode(PROMPTS[9])
    out = client.completions.create(model="tiny", prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=1)
    lp = out.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None
    assert all(x <= 0 and math.isfinite(x) for x in lp.token_logprobs[1:])
    # The generated token is the greedy one: its log-prob is the top alternative's.
    assert lp.token_logprobs[-1] == pytest.approx(max(lp.top_logprobs[-1].values()))
    assert out.choices[0].text.startswith(tokenizer.decode(ids))


def test_chat_completion_and_stream(servers):
    client = servers["main"].client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPTS[3]}]
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    streamed = ""
    for chunk in client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0,
                                                stream=True):
        streamed += chunk.choices[0].delta.content or ""
    assert plain.choices[0].message.role == "assistant"
    assert streamed == plain.choices[0].message.content
    assert plain.usage.prompt_tokens > len(PROMPTS[3].split())  # the template's framing counts


@pytest.mark.parametrize("kwargs,status", [
    ({"prompt": "hello", "max_tokens": -1}, 400),
    ({"prompt": "", "max_tokens": 4}, 400),
    ({"prompt": "word " * 200, "max_tokens": 4}, 400),  # longer than the 128-token context
    ({"prompt": "hello", "temperature": -1}, 400),
    ({"prompt": "hello", "presence_penalty": 2.5}, 400),
    ({"prompt": "hello", "extra_body": {"repetition_penalty": 0}}, 400),
    ({"prompt": "hello", "logit_bias": {"5": 101}}, 400),
    ({"prompt": "hello", "logit_bias": {"five": 1}}, 400),
    ({"prompt": "hello", "model": "gpt-4"}, 404),
    ({"prompt": "hello", "extra_body": {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}}}}, 400),
])
def test_bad_requests_get_openai_errors(servers, kwargs, status):
    client = servers["main"].client()
    kwargs = {"model": "tiny", "max_tokens": 4, **kwargs}
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(**kwargs)
    assert info.value.status_code == status
    assert info.value.body["message"]


def test_bad_chat_template_input_fails_alone(servers):
    client = servers["main"].client()
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"content": "no role"}], max_tokens=4)
    assert _complete(client, PROMPTS[0], max_tokens=4).choices[0].text is not None


def test_full_queue_then_disconnect_then_drain(servers):
    """One slot, one queue place: a third request gets 429; a client that leaves frees the
    slot; SIGTERM answers 503 to new requests, finishes the one in flight, exits 0."""
    server = servers["small"]
    client = server.client()
    # Long enough (1,000 tokens) to hold the slot while the next steps happen.
    stream = client.completions.create(model="tiny", prompt="hi", max_tokens=1000, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))  # the long request holds the slot
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        queued = pool.submit(_complete, client, PROMPTS[2], max_tokens=8)
        deadline = time.monotonic() + 30
        while server.health()["waiting"] != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        status, headers, body = server.post("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2})
        assert status == 429 and int(headers["Retry-After"]) >= 1 and body["error"]["type"] == "rate_limit_error"
        stream.close()  # the client leaves mid-stream
        assert queued.result(timeout=60).choices[0].finish_reason in ("length", "stop")
    assert server.health()["stats"]["finished_cancelled"] == 1

    inflight = client.completions.create(model="tiny", prompt="hi", max_tokens=500, temperature=0, stream=True,
                                         extra_body={"ignore_eos": True})
    chunks = iter(inflight)
    text = next(chunks).choices[0].text
    server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while server.health()["status"] != "draining" and time.monotonic() < deadline:
        time.sleep(0.02)
    status, headers, body = server.post("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2})
    assert status == 503 and body["error"]["message"]
    finish = None
    for chunk in chunks:
        text += chunk.choices[0].text
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "length"
    assert server.proc.wait(timeout=60) == 0


def test_embeddings_of_an_encoder_equal_ffl_embed(servers, bert_dir):
    import jax.numpy as jnp
    import numpy as np

    from flaxformer_lite.inference import commands
    from flaxformer_lite.inference.embeddings import embed
    from flaxformer_lite.interop import hf
    from flaxformer_lite.models import build_model

    texts = ["a cat sat on the mat", "the sun is hot", "dog"]
    out = servers["embed"].client().embeddings.create(model="tiny", input=texts)
    got = np.array([d.embedding for d in out.data])
    cfg, params = hf.load(bert_dir)
    ids, mask = commands._tokenize(bert_dir, texts, 32)
    want = embed(build_model(cfg), params, ids, mask)  # mean pooling, normalized: the server's defaults
    np.testing.assert_allclose(got, np.asarray(want), atol=2e-5)
    assert out.usage.prompt_tokens == int(mask.sum())
    with pytest.raises(openai.BadRequestError):  # an encoder does not complete text
        servers["embed"].client().completions.create(model="tiny", prompt="a cat", max_tokens=2)
    assert jnp.isfinite(got).all()


def test_echo_logprobs_give_every_token_its_text_and_offset(servers):
    """The first prompt token's text is its own (not ""), and each text_offset points at
    its token in the echoed text, streamed or not."""
    client = servers["main"].client()
    prompt = PROMPTS[9]
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=1,
                                    extra_body={"ignore_eos": True})
    choice = out.choices[0]
    lp = choice.logprobs
    assert lp.tokens[0] and prompt.startswith(lp.tokens[0])
    assert "".join(lp.tokens) == choice.text and choice.text.startswith(prompt)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    for token, offset in zip(lp.tokens, lp.text_offset):
        assert choice.text[offset:offset + len(token)] == token
    streamed = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0, echo=True,
                                              logprobs=1, stream=True, extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in streamed)
    assert text == choice.text
    for chunk in streamed:
        got = chunk.choices[0].logprobs
        for token, offset in zip(got.tokens if got else [], got.text_offset if got else []):
            assert text[offset:offset + len(token)] == token


def test_schemathesis_finds_no_server_error(servers):
    """Requests drawn from /openapi.json, valid and invalid, never get a 5xx."""
    import hypothesis
    import schemathesis
    from hypothesis import strategies as st

    server = servers["main"]
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/models"}
    statuses = []
    for op in operations:
        # A GET without parameters has no invalid form to draw.
        modes = list(schemathesis.GenerationMode) if op.method.upper() == "POST" else [schemathesis.GenerationMode.POSITIVE]
        for mode in modes:
            strategy = op.as_strategy(generation_mode=mode)

            @hypothesis.settings(max_examples=8, deadline=None, derandomize=True, database=None,
                                 suppress_health_check=list(hypothesis.HealthCheck),
                                 phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])
            @hypothesis.given(st.data())
            def no_5xx(data):
                case = data.draw(strategy)
                response = case.call(base_url=server.url, timeout=60)
                statuses.append(response.status_code)
                assert response.status_code < 500, (case.method, case.path, case.body, response.text)

            no_5xx()
    assert 200 in statuses and 400 in statuses
