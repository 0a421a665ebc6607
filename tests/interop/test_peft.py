"""LoRA out to HF: PEFT folders that `peft` loads onto the transformers base model, merged
exports, and the whole path from the command line on an HF folder."""

import dataclasses
import json

import jax
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import traverse_util
from hf_chat_folder import write_llama_chat_folder

import flaxformer_lite as ffl
from flaxformer_lite import cli
from flaxformer_lite.config import LORA_PROJECTIONS, LoraConfig
from flaxformer_lite.interop import hf
from flaxformer_lite.interop import peft as ffl_peft
from flaxformer_lite.layers import lora
from flaxformer_lite.runtime import checkpoint

transformers.logging.set_verbosity_error()


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids))).logits.numpy()


def test_peft_loads_our_adapters_onto_the_transformers_base(tmp_path):
    torch_model = write_llama_chat_folder(tmp_path / "src")
    model_cfg, base = hf.load(tmp_path / "src")
    cfg = dataclasses.replace(model_cfg, lora=LoraConfig(rank=4, alpha=8.0, targets=LORA_PROJECTIONS))
    fresh = jax.jit(ffl.init_params, static_argnums=0)(cfg, jax.random.key(0))
    flat = traverse_util.flatten_dict(lora.split(fresh)[0])
    keys = dict(zip(flat, jax.random.split(jax.random.key(1), len(flat))))
    adapters = traverse_util.unflatten_dict({k: 0.3 * jax.random.normal(keys[k], v.shape) for k, v in flat.items()})
    params = lora.join(adapters, base)
    out = ffl_peft.save_adapters(cfg, params, tmp_path / "adapter", model_type="llama")
    written = json.loads((out / "adapter_config.json").read_text())
    assert written["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "gate_proj", "down_proj"])
    peft_model = peft.PeftModel.from_pretrained(torch_model, out).eval()
    ids = np.random.default_rng(0).integers(3, model_cfg.vocab_size, (2, 12))
    ours = jax.jit(lambda p, i: ffl.build_model(cfg).apply(p, i).logits)(params, ids)
    theirs = _torch_logits(peft_model, ids)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    assert np.abs(theirs - _torch_logits(peft_model.get_base_model().__class__.from_pretrained(tmp_path / "src"), ids)).max() > 1e-2
    # And back: a run directory from the base folder plus the adapter holds the same model.
    assert cli.main(["convert", "--from-hf", str(tmp_path / "src"), "--peft", str(out), "--to", str(tmp_path / "run")]) == 0
    run_cfg, run_params = checkpoint.load_params(tmp_path / "run")
    assert run_cfg.model.lora == cfg.lora
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), run_params, params)


def test_a_projection_peft_cannot_hold_is_refused_by_name():
    cfg = ffl.load_config("gpt_tiny", overrides=["model.num_layers=1", "model.lora.rank=2"]).model
    params = jax.jit(ffl.init_params, static_argnums=0)(cfg, jax.random.key(0))
    with pytest.raises(hf.HFError, match=r"HF gpt2 has no separate torch Linear for decoder/layers_0/self_attention/key"):
        ffl_peft.save_adapters(cfg, params, "unused", model_type="gpt2")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """`train --init-from HF_DIR` with LoRA on chat data, then both exports, all via the CLI."""
    root = tmp_path_factory.mktemp("lora_run")
    write_llama_chat_folder(root / "src")
    chat = root / "chat.jsonl"
    lines = [{"messages": [{"role": "user", "content": f"the number {i}"}, {"role": "assistant", "content": f"is {i}"}]}
             for i in range(24)]
    chat.write_text("".join(json.dumps(line) + "\n" for line in lines))
    run = root / "run"
    assert cli.main(["train", "--init-from", str(root / "src"), "--workdir", str(run), "--set", "model.lora.rank=4",
                     "model.lora.targets=[query,value,wi,wo]", "data.objective=sft", f"data.corpus={chat}",
                     "train.num_steps=3", "train.learning_rate=1e-2", "data.batch_size=8", "data.seq_len=96",
                     "train.eval_batches=1", "train.log_every=1", "train.peak_flops=1e12"]) == 0
    assert cli.main(["convert", "--from", str(run), "--to-peft", str(root / "adapter")]) == 0
    assert cli.main(["convert", "--from", str(run), "--to-hf", str(root / "merged")]) == 0
    return root


def test_the_command_line_run_trains_adapters_only_and_exports_both_ways(lora_run):
    src, run = lora_run / "src", lora_run / "run"
    cfg, params = checkpoint.load_params(run)
    _, source = hf.load(src)
    adapters, base = lora.split(params)
    jax.tree.map(np.testing.assert_array_equal, base, source)  # the base did not move
    assert any(np.any(np.asarray(b) != 0) for k, b in traverse_util.flatten_dict(adapters).items() if k[-1].endswith("_lora_b"))
    ids = np.random.default_rng(1).integers(3, cfg.model.vocab_size, (2, 10))
    base_model = transformers.AutoModelForCausalLM.from_pretrained(src)
    with_adapter = _torch_logits(peft.PeftModel.from_pretrained(base_model, lora_run / "adapter").eval(), ids)
    merged = _torch_logits(transformers.AutoModelForCausalLM.from_pretrained(lora_run / "merged"), ids)
    ours = jax.jit(lambda p, i: ffl.build_model(cfg.model).apply(p, i).logits)(params, ids)
    np.testing.assert_allclose(with_adapter, ours, atol=1e-4)
    np.testing.assert_allclose(merged, ours, atol=1e-4)
    # The adapter names its base's folder (not the run's copy of its config), so peft loads
    # base and adapter from the adapter alone.
    config = json.loads((lora_run / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(src.resolve())
    alone = _torch_logits(peft.AutoPeftModelForCausalLM.from_pretrained(lora_run / "adapter").eval(), ids)
    np.testing.assert_allclose(alone, with_adapter, atol=1e-6)


def test_an_adapter_generates_and_serves_on_its_base_folder(lora_run, capsys):
    """generate/serve --hf BASE --peft ADAPTER: the replies of the run the adapter came from."""
    import argparse

    from flaxformer_lite.serve import commands as serve_commands

    chat = ["--chat", "the number 5", "--max-new-tokens", "8", "--ignore-eos"]
    assert cli.main(["generate", "--workdir", str(lora_run / "run"), *chat]) == 0
    from_run = capsys.readouterr().out
    assert cli.main(["generate", "--hf", str(lora_run / "src"), "--peft", str(lora_run / "adapter"), *chat]) == 0
    assert capsys.readouterr().out == from_run
    assert cli.main(["generate", "--peft", str(lora_run / "adapter"), "--prompt", "x"]) == 2
    assert "--peft ADAPTER goes with --hf BASE_DIR" in capsys.readouterr().err
    parser = argparse.ArgumentParser()
    serve_commands.add_serve_arguments(parser)
    served, engine = serve_commands._load(parser.parse_args(
        ["--hf", str(lora_run / "src"), "--peft", str(lora_run / "adapter"), "--max-batch", "1", "--max-len", "64"]))
    assert served.name == "adapter" and engine.model.cfg.lora.rank == 4


def test_train_goes_on_training_a_peft_adapter_on_its_base_and_refuses_another_base(lora_run, tmp_path, capsys):
    """train --init-from BASE --peft ADAPTER: model.lora is the adapter's (rank, alpha,
    targets) and its weights are where training starts; a base of other shapes is refused."""
    import shutil

    src, adapter = lora_run / "src", lora_run / "adapter"
    run = tmp_path / "more"
    argv = ["--peft", str(adapter), "--set", "data.objective=sft", f"data.corpus={lora_run / 'chat.jsonl'}",
            "train.num_steps=1", "train.schedule=constant", "train.learning_rate=1e-3", "data.batch_size=8", "data.seq_len=96",
            "train.eval_batches=1", "train.peak_flops=1e12", "train.num_samples=0"]
    assert cli.main(["train", "--init-from", str(src), "--workdir", str(run), *argv]) == 0
    (first_cfg, first), (cfg, params) = checkpoint.load_params(lora_run / "run"), checkpoint.load_params(run)
    assert cfg.model.lora == first_cfg.model.lora
    before, after = (traverse_util.flatten_dict(lora.split(p)[0]) for p in (first, params))
    moved = {k: float(np.abs(np.asarray(after[k]) - np.asarray(before[k])).max()) for k in before}
    assert set(moved) == set(after) and all(0 < m <= 2e-3 for m in moved.values()), moved  # one AdamW step of 1e-3
    other = tmp_path / "other"  # the same family, wider: the adapter's tensors do not fit it
    model_cfg = dataclasses.replace(first_cfg.model, lora=LoraConfig(), d_model=48, head_dim=12)
    hf.save(model_cfg, ffl.init_params(model_cfg, jax.random.key(2)), other)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, other / name)
    capsys.readouterr()
    assert cli.main(["train", "--init-from", str(other), "--workdir", str(tmp_path / "bad"), *argv]) == 2
    err = capsys.readouterr().err
    assert "the adapter was made for another base" in err and str(src.resolve()) in err, err
    assert not (tmp_path / "bad").exists()


def test_a_run_records_its_base_through_runs_and_the_hf_cache(tmp_path):
    """keep_source records where the weights are: an HF cache snapshot by its Hub id, a
    plain folder by its path, and a run started from a run inherits its record."""
    snapshot = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M" / "snapshots" / "0123abc"
    plain = tmp_path / "plain"
    for folder in (snapshot, plain):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    hf.keep_source(snapshot, tmp_path / "run1" / "hf")
    hf.keep_source(tmp_path / "run1" / "hf", tmp_path / "run2" / "hf")  # train --init-from run1
    hf.keep_source(plain, tmp_path / "run3" / "hf")
    assert hf.base_model(tmp_path / "run1" / "hf") == hf.base_model(tmp_path / "run2" / "hf") == (
        "HuggingFaceTB/SmolLM2-135M")
    assert hf.base_model(tmp_path / "run3" / "hf") == str(plain.resolve())
    assert hf.base_model(plain) is None


def test_a_peft_option_model_lora_cannot_express_is_refused_by_name(tmp_path):
    from safetensors.numpy import save_file

    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "use_dora": True}))
    save_file({"x": np.zeros(1, np.float32)}, str(tmp_path / "adapter_model.safetensors"))
    cfg = ffl.load_config("llama_tiny").model
    with pytest.raises(hf.HFError, match=r"adapter_config.json: use_dora=True changes what the adapters compute"):
        ffl_peft.load_adapters(cfg, {}, tmp_path, model_type="llama")
