"""Many LoRA adapters in one engine: greedy tokens of adapters of different ranks mixed
in one batch equal each served alone and the adapter loaded into the model the single-
adapter way; the prefix cache keeps adapters apart; loading and unloading while requests
run fails none and mixes none."""

import dataclasses
import threading
import time

import numpy as np
import pytest
from test_serve_engine import NEW
from test_serve_engine import _run as run_greedy

from flaxformer_lite.inference.decode import generate
from flaxformer_lite.inference.engine import AdaptersFull, Engine, EngineError, SamplingParams, UnknownAdapter
from flaxformer_lite.interop import hf, peft
from flaxformer_lite.models import build_model


@pytest.fixture(scope="module")
def base(hf_dir):
    cfg, params = hf.load(hf_dir)
    return cfg, params, hf.load_tokenizer(hf_dir)


@pytest.fixture(scope="module")
def loaded(hf_dir, adapter_dirs):
    """{name: (model.lora, adapters)} of each adapter folder."""
    cfg = hf.load(hf_dir)[0]
    return {name: peft.adapter_params(cfg, folder, model_type="llama") for name, folder in adapter_dirs.items()}


@pytest.fixture(scope="module")
def engine(base, loaded):
    cfg, params, tokenizer = base
    engine = Engine(build_model(cfg), params, tokenizer, max_batch=4, max_len=96, chunk=16, max_adapters=4,
                    max_lora_rank=8, lora_targets=("query", "key", "value", "out", "wi", "wo"))
    futures = [engine.load_adapter(name, *adapter) for name, adapter in loaded.items()]
    engine.start()
    assert all(f.done() for f in futures)
    yield engine
    engine.stop()


def _run(engine, jobs):
    """Each (prompt, adapter)'s (new token ids, done event), all submitted at once."""
    return run_greedy(engine, [p for p, _ in jobs], adapters=[a for _, a in jobs])


def test_adapters_of_different_ranks_mixed_in_one_batch_equal_each_alone(engine, base, loaded):
    cfg, params, _ = base
    rng = np.random.default_rng(5)
    prompts = [rng.integers(4, 320, n).tolist() for n in (7, 21, 40, 13)]
    names = [None, "r2", "r4", "r8"]
    mixed, done = _run(engine, list(zip(prompts, names)))
    assert all(d["finish_reason"] == "length" for d in done)
    alone = [_run(engine, [(p, name)])[0][0] for p, name in zip(prompts, names)]
    assert mixed == alone
    # ... and each equals its adapter loaded into the model the single-adapter way (or the base).
    for prompt, name, tokens in zip(prompts, names, mixed):
        model_cfg, model_params = cfg, params
        if name is not None:
            lora_cfg, adapters = loaded[name]
            model_cfg = dataclasses.replace(cfg, lora=lora_cfg)
            model_params = {"params": peft.lora.join(adapters["params"], params["params"])}
        out = generate(build_model(model_cfg), model_params, [prompt], max_new_tokens=NEW, ignore_eos=True)
        assert tokens == np.asarray(out.tokens)[0].tolist(), name
    assert len({tuple(t) for t in alone}) == 4  # the adapters do change the replies


def test_the_prefix_cache_keeps_adapters_apart(engine):
    prompt = np.random.default_rng(6).integers(4, 320, 40).tolist()  # two whole blocks of 16
    cached = {}
    for key, adapter in (("r2", "r2"), ("r4", "r4"), ("base", None), ("r2 again", "r2")):
        tokens, done = _run(engine, [(prompt, adapter)])
        cached[key] = (done[0]["cached_tokens"], tokens[0])
    assert [cached[k][0] for k in ("r2", "r4", "base", "r2 again")] == [0, 0, 0, 32]
    assert cached["r2 again"][1] == cached["r2"][1] != cached["r4"][1]


def test_load_and_unload_while_requests_run_fail_none_and_mix_none(engine, loaded):
    rng = np.random.default_rng(7)
    prompts = [rng.integers(4, 320, n).tolist() for n in (9, 30, 17, 25)]
    names = ["r2", "r4", "r8", None]
    want = {(i, name): _run(engine, [(p, name)])[0][0] for i, p in enumerate(prompts) for name in names}
    results, failures = [], []

    def client(k):
        for j in range(6):
            i, name = (k + j) % len(prompts), names[(k + 2 * j) % len(names)]
            try:
                results.append(((i, name), _run(engine, [(prompts[i], name)])))
            except UnknownAdapter:  # r8 is away between its unload and its load
                assert name == "r8"
                failures.append(name)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for _ in range(3):
        engine.unload_adapter("r8")
        while True:  # an entry frees once the sequences on an unloaded adapter end
            try:
                engine.load_adapter("r8", *loaded["r8"]).result(timeout=60)
                break
            except AdaptersFull:
                time.sleep(0.02)
    for t in threads:
        t.join()
    assert results and all(done[0]["finish_reason"] == "length" for _, (_, done) in results)
    assert all(tokens[0] == want[key] for key, (tokens, _) in results)
    assert sorted(engine.adapters()) == ["r2", "r4", "r8"]


def test_adapters_the_table_cannot_hold_are_refused_by_name(engine, loaded, base):
    with pytest.raises(UnknownAdapter, match="no adapter named 'nope' is loaded"):
        engine.submit([5, 6], SamplingParams(max_tokens=1), lambda e: None, adapter="nope")
    with pytest.raises(EngineError, match="already loaded"):
        engine.load_adapter("r2", *loaded["r2"])
    engine.load_adapter("r2 again", *loaded["r2"]).result(timeout=60)  # the fourth entry
    with pytest.raises(AdaptersFull, match="--max-adapters 4"):
        engine.load_adapter("more", *loaded["r2"])
    engine.unload_adapter("r2 again")
    with pytest.raises(UnknownAdapter, match="no adapter named 'r2 again'"):
        engine.unload_adapter("r2 again")
    lora_cfg, adapters = loaded["r8"]
    with pytest.raises(EngineError, match="--max-lora-rank 16 or more"):
        engine.load_adapter("big", dataclasses.replace(lora_cfg, rank=16), adapters)
    with pytest.raises(EngineError, match="adapts wg, which the adapter table does not hold"):
        engine.load_adapter("gate", dataclasses.replace(lora_cfg, targets=("wg",)), adapters)
    cfg, params, tokenizer = base
    plain = Engine(build_model(cfg), params, tokenizer, max_batch=1, max_len=32, chunk=16)
    with pytest.raises(EngineError, match="--max-adapters N"):
        plain.load_adapter("r2", *loaded["r2"])
