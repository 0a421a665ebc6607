"""Many LoRA adapters in one engine: greedy tokens of adapters of different ranks mixed
in one batch equal each served alone and the adapter loaded into the model the single-
adapter way; the prefix cache keeps adapters apart; loading and unloading while requests
run fails none and mixes none."""

import dataclasses
import threading
import time

import jax
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
    damaged = jax.tree.map(lambda x: np.where(np.arange(x.size).reshape(x.shape) == 1, np.nan, x), adapters)
    with pytest.raises(EngineError, match="not finite"):
        engine.load_adapter("damaged", lora_cfg, damaged)
    cfg, params, tokenizer = base
    plain = Engine(build_model(cfg), params, tokenizer, max_batch=1, max_len=32, chunk=16)
    with pytest.raises(EngineError, match="--max-adapters N"):
        plain.load_adapter("r2", *loaded["r2"])


def _serve_args(*flags):
    import argparse

    from flaxformer_lite.serve import commands

    parser = argparse.ArgumentParser()
    commands.add_serve_arguments(parser)
    return parser.parse_args(list(flags))


def test_serve_flags_name_adapters_and_refuse_what_cannot_serve(hf_dir, bert_dir, adapter_dirs, tmp_path):
    from flaxformer_lite.config import ConfigError
    from flaxformer_lite.serve import commands

    r2, r8 = adapter_dirs["r2"], adapter_dirs["r8"]
    served, engine = commands._load(_serve_args("--hf", str(hf_dir), "--peft", f"small={r2}", "--peft", str(r8),
                                                "--max-len", "32", "--chunk", "16", "--max-batch", "1"))
    assert (served.name, served.adapter_folders) == (hf_dir.name, {"small": str(r2), "r8": str(r8)})
    assert (engine.max_adapters, engine.max_lora_rank) == (2, 8)
    assert engine.lora_targets == ("query", "value", "wi", "wo")  # the union of the adapters' projections
    cases = [
        (("--peft", f"a={r2}", "--peft", f"a={r8}"), "two adapters are named 'a'"),
        (("--peft", f"a={r2}", "--peft", f"b={r8}", "--max-adapters", "1"), "more than --max-adapters 1"),
        (("--peft", f"a={r8}", "--max-lora-rank", "4"), "--max-lora-rank 8 or more"),
        (("--peft", f"{hf_dir.name}={r2}"), "is the base model's name"),
        (("--peft", f"a={tmp_path}"), f"{tmp_path}: not a PEFT adapter folder"),
    ]
    for flags, message in cases:
        with pytest.raises(ValueError, match=message):
            commands._load(_serve_args("--hf", str(hf_dir), "--max-len", "32", *flags))
    with pytest.raises(ConfigError, match="an encoder serves /v1/embeddings"):
        commands._load(_serve_args("--hf", str(bert_dir), "--max-adapters", "1"))
    with pytest.raises(ConfigError, match="--peft ADAPTER goes with --hf"):
        commands._load(_serve_args("--config", "llama_tiny", "--peft", f"a={r2}"))


def test_http_requests_pick_adapters_and_keyed_routes_load_and_unload_them(engine, hf_dir, adapter_dirs, base,
                                                                           tmp_path):
    from test_serve_protocol import call

    from flaxformer_lite.serve import access, app

    cfg, _, tokenizer = base
    served = app.Served(name="tiny", tokenizer=tokenizer, max_len=96, engine=engine,
                        read_adapter=lambda path: peft.adapter_params(cfg, path, model_type="llama"))
    application = app.build_app(served, policy=access.Policy(api_keys=("key",)))
    key = {"authorization": "Bearer key"}

    def complete(model):
        body = {"model": model, "prompt": [5, 80, 17, 200, 9], "max_tokens": NEW, "temperature": 0,
                "ignore_eos": True}
        return call(application, "POST", "/v1/completions", body=body, headers=key)

    listed = call(application, "GET", "/v1/models", headers=key).json()["data"]
    assert [(m["id"], m.get("parent")) for m in listed] == [("tiny", None), ("r2", "tiny"), ("r4", "tiny"),
                                                            ("r8", "tiny")]
    replies = {}
    for model in ("tiny", "r2", "r4"):
        response = complete(model)
        assert response.status_code == 200 and response.json()["model"] == model
        replies[model] = response.json()["choices"][0]["text"]
    assert len(set(replies.values())) == 3
    missing = complete("r5")
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"
    assert "'tiny', 'r2', 'r4', 'r8'" in missing.json()["error"]["message"]

    load = {"lora_name": "second", "lora_path": str(adapter_dirs["r2"])}
    assert call(application, "POST", "/v1/load_lora_adapter", body=load).status_code == 401
    assert call(application, "POST", "/v1/unload_lora_adapter", body={"lora_name": "r2"}).status_code == 401
    loaded = call(application, "POST", "/v1/load_lora_adapter", body=load, headers=key)
    assert loaded.status_code == 200 and loaded.json()["status"] == "loaded"
    assert complete("second").json()["choices"][0]["text"] == replies["r2"]
    again = call(application, "POST", "/v1/load_lora_adapter", body=load, headers=key)
    assert again.status_code == 400 and again.json()["error"]["param"] == "lora_name"
    bad = call(application, "POST", "/v1/load_lora_adapter", body={"lora_name": "bad", "lora_path": str(tmp_path)},
               headers=key)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "lora_path"
    assert str(tmp_path) in bad.json()["error"]["message"]
    assert call(application, "POST", "/v1/unload_lora_adapter", body={"lora_name": "second"},
                headers=key).status_code == 200
    assert complete("second").status_code == 404
    gone = call(application, "POST", "/v1/unload_lora_adapter", body={"lora_name": "second"}, headers=key)
    assert gone.status_code == 404 and gone.json()["error"]["param"] == "lora_name"
