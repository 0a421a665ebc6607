"""The engine's pool. The prefix cache: the same tokens with it on as off (a whole hit, a
hit that ends inside a block, an evicted prefix, penalties and a logit bias after a hit,
sampled choices of one prompt), and the cached-token counts. Buckets: the same greedy
tokens alone and in every bucket, with slots moving as others finish."""

import queue

import numpy as np
import pytest

from flaxformer_lite.inference.engine import Engine, SamplingParams
from flaxformer_lite.interop import hf
from flaxformer_lite.models import build_model

NEW, CHUNK = 6, 8


@pytest.fixture(scope="module")
def engines(hf_dir):
    """(cache on with room for 4 blocks, cache off) over one model."""
    cfg, params = hf.load(hf_dir)
    model, tokenizer = build_model(cfg), hf.load_tokenizer(hf_dir)
    pair = [Engine(model, params, tokenizer, max_batch=2, max_len=64, chunk=CHUNK, prefix_blocks=blocks)
            for blocks in (4, 0)]
    for engine in pair:
        engine.start()
    yield pair
    for engine in pair:
        engine.stop()


def _ask(engine, prompt, n=1, **settings):
    """The new tokens and the cached-token count of each of `n` choices, submitted together."""
    events = queue.SimpleQueue()
    for j in range(n):
        params = SamplingParams(**{"max_tokens": NEW, "temperature": 0, "ignore_eos": True, "logprobs": 0,
                                   "choice": j, **settings})
        engine.submit(prompt, params, lambda e, j=j: events.put((j, e)))
    tokens, cached = [[] for _ in range(n)], [None] * n
    while any(c is None for c in cached):
        j, e = events.get(timeout=120)
        if e["type"] == "token":
            tokens[j] += [t.id for t in e["tokens"]]
        else:
            assert e["finish_reason"] == "length", e
            cached[j] = e["cached_tokens"]
    return tokens, cached


def test_the_prefix_cache_changes_no_token(engines):
    on, off = engines
    rng = np.random.default_rng(3)
    a = rng.integers(4, 320, 30).tolist()  # blocks ending at 8, 16 and 24 are kept
    b = a[:20] + rng.integers(4, 320, 9).tolist()  # shares two blocks and half of the third
    c = rng.integers(4, 320, 41).tolist()  # five blocks: evicts a's and b's, then its own first
    penalised = {"repetition_penalty": 1.7, "frequency_penalty": 0.6, "logit_bias": ((int(a[3]), 4.0),)}
    sampled = {"temperature": 1.0, "seed": 11}
    requests = [(a, 1, {}, [0]), (b, 1, {}, [16]), (a, 1, penalised, [24]), (c, 1, {}, [0]), (a, 1, {}, [0]),
                (c[:33], 2, sampled, [0, 32])]
    for prompt, n, settings, cached in requests:
        tokens, got = _ask(on, prompt, n, **settings)
        assert got == cached
        assert tokens == _ask(off, prompt, n, **settings)[0]
    assert on.stats["prefix_evicted_blocks"] > 0 and off.stats["prefix_cached_tokens"] == 0


def test_new_weights_empty_the_prefix_cache(engines):
    on, _ = engines
    prompt = np.random.default_rng(4).integers(4, 320, 20).tolist()
    assert _ask(on, prompt)[1] == [0] and _ask(on, prompt)[1] == [16]
    on.set_params(on.params)
    assert _ask(on, prompt)[1] == [0]


def test_greedy_tokens_are_the_same_alone_and_in_every_bucket(hf_dir):
    """Five slots (buckets of 1, 4 and 5 rows): requests alone, then three and five at
    once with different lengths, so slots free in the middle and the last ones move."""
    cfg, params = hf.load(hf_dir)
    engine = Engine(build_model(cfg), params, hf.load_tokenizer(hf_dir), max_batch=5, max_len=64, chunk=CHUNK,
                    prefix_blocks=0)
    engine.start()
    try:
        assert engine.buckets == [1, 4, 5]
        rng = np.random.default_rng(5)
        prompts = [rng.integers(4, 320, n).tolist() for n in (3, 17, 9, 30, 12)]
        lengths = [NEW, 2, NEW, 3, NEW]  # the second and fourth leave early
        alone = [_ask(engine, p, max_tokens=m)[0][0] for p, m in zip(prompts, lengths)]
        for k in (3, 5):
            events = queue.SimpleQueue()
            for i in range(k):
                params = SamplingParams(max_tokens=lengths[i], temperature=0, ignore_eos=True, logprobs=0)
                engine.submit(prompts[i], params, lambda e, i=i: events.put((i, e)))
            together, finished = [[] for _ in range(k)], 0
            while finished < k:
                i, e = events.get(timeout=120)
                together[i] += [t.id for t in e["tokens"]] if e["type"] == "token" else []
                finished += e["type"] == "done"
            assert together == alone[:k]
        assert engine.stats["slot_moves"] > 0
    finally:
        engine.stop()
