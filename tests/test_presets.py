"""Every preset parses and builds at full size (eval_shape), with published counts; the
full-size presets scan, and scanned presets round-trip through HF folders."""

import dataclasses
import pathlib

import flax.linen as nn
import jax
import numpy as np
import pytest

import flaxformer_lite as ffl
from flaxformer_lite.models import build_model, dummy_inputs, unstack_layers

PRESETS = sorted(p.stem for p in (pathlib.Path(__file__).parent.parent / "configs").glob("*.yaml"))


def abstract_params(cfg):
    model = build_model(cfg.model)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *dummy_inputs(cfg.model)))
    return nn.unbox(shapes["params"])


@pytest.mark.parametrize("name", PRESETS)
def test_preset_loads_and_builds_at_full_size(name):
    cfg = ffl.load_config(f"configs/{name}.yaml")
    assert cfg.name == name
    params = abstract_params(cfg)
    assert ffl.count_params(params) > 0


# Published counts: GPT-2 small and T5-small (v1.0) as transformers counts them
# (GPT2LMHeadModel / T5ForConditionalGeneration, tied heads counted once); BERT-base is
# BertModel (embeddings + encoder + pooler), so our MLM head is counted apart.
@pytest.mark.parametrize(
    "name, expected, excluded",
    [
        ("gpt2_small", 124_439_808, ()),
        ("bert_base", 109_482_240, ("mlm_transform", "mlm_norm", "mlm_bias")),
        ("t5_small", 60_506_624, ()),
        ("transformer_base", 63_082_496, ()),
    ],
)
def test_parameter_counts_match_published(name, expected, excluded):
    params = abstract_params(ffl.load_config(f"configs/{name}.yaml"))
    kept = {k: v for k, v in params.items() if k not in excluded}
    assert ffl.count_params(kept) == expected


# Full-size presets scan by default; narrowed here (2 layers, d_model 32) so each case
# builds in seconds, with the published vocabularies kept.
SCANNED = ["bert_base", "gpt2_small", "llama_small", "t5_small", "transformer_base"]
NARROW = ["model.num_layers=2", "model.d_model=32", "model.d_ff=64", "model.num_heads=4", "model.max_len=16",
          "data.seq_len=16"]


@pytest.mark.parametrize("name", SCANNED)
def test_full_size_presets_scan_and_round_trip_through_hf(name, tmp_path):
    overrides = NARROW + (["model.num_kv_heads=2"] if name == "llama_small" else [])
    overrides += ["model.head_dim=8", "model.num_decoder_layers=2", "data.target_len=16"] if name == "t5_small" else []
    cfg = ffl.load_config(f"configs/{name}.yaml", overrides=overrides).model
    assert cfg.scan_layers
    params = ffl.init_params(cfg, jax.random.key(0))
    stack = params["params"]["encoder" if cfg.family == "encoder" else "decoder"]
    assert "layers" in stack and "layers_0" not in stack
    if name != "transformer_base":  # the 2017 model has no HF class
        back_cfg, back = ffl.hf.load(ffl.hf.save(cfg, params, tmp_path / "hf"), scan_layers=True)
        assert back_cfg.scan_layers
        jax.tree.map(np.testing.assert_array_equal, back, params)  # same tree, same values

    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, (2, 8)).astype(np.int32)
    args = (ids, ids) if cfg.family == "encoder_decoder" else (ids,)
    forward = lambda c: jax.jit(lambda p, *xs: build_model(c).apply(p, *xs).hidden_states)  # noqa: E731
    scanned = forward(cfg)(params, *args)
    unrolled = forward(dataclasses.replace(cfg, scan_layers=False))({"params": unstack_layers(params["params"])}, *args)
    np.testing.assert_allclose(np.asarray(scanned), np.asarray(unrolled), rtol=1e-5, atol=1e-5)
