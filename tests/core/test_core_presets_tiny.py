"""Every preset, shrunk by overrides, runs a real forward and backward pass (with its dropout)."""

import jax
import numpy as np
import pytest
from core_helpers import B, T, key, lm_loss, model_args, random_ids

import flaxformer_lite as ffl
from flaxformer_lite.models import build_model, init_params

PRESETS = sorted(p.stem for p in ffl.config.CONFIG_DIR.glob("*.yaml"))
SHRINK = [
    "model.num_layers=1", "model.num_decoder_layers=1", "model.d_model=32", "model.num_heads=4",
    "model.head_dim=8", "model.d_ff=64", "model.vocab_size=64", "model.max_len=32", f"data.seq_len={T}",
]


@pytest.mark.parametrize("preset", PRESETS)
def test_shrunk_preset_trains_one_step(preset):
    cfg = ffl.load_config(preset, overrides=SHRINK)
    full = ffl.load_config(preset)
    for field in ("family", "position", "norm", "norm_position", "activation", "tie_embeddings", "dropout_rate"):
        assert getattr(cfg.model, field) == getattr(full.model, field), field  # only the size shrank
    model, params = build_model(cfg.model), init_params(cfg.model, key(0))  # the real initialisers
    ids = random_ids(0, B, T, cfg.model.vocab_size)

    def loss_fn(p):
        out = model.apply(p, *model_args(cfg.model, ids), deterministic=False, rngs={"dropout": key(1)})
        pooled = 0.0 if out.pooled is None else (out.pooled**2).mean()
        return lm_loss(out, ids) + pooled

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    assert np.isfinite(float(loss))
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        g = np.asarray(g)
        assert np.isfinite(g).all() and g.any(), f"{preset}: gradient of {jax.tree_util.keystr(path)}"


@pytest.mark.parametrize("preset, overrides, std", [
    ("gpt_tiny", [], 0.05),  # initializer_range
    ("gpt_tiny", ["model.embedding_init_std=0.5"], 0.5),
    ("t5_tiny", [], 1.0),  # T5's N(0, 1) shared table
])
def test_token_table_is_drawn_with_embedding_init_std(preset, overrides, std):
    cfg = ffl.load_config(preset, overrides=["model.vocab_size=4096", *overrides]).model
    params = init_params(cfg, key(0))["params"]
    table = np.asarray(params["token_embed"]["embedding"])
    assert abs(table.std() / std - 1) < 0.02
    others = [np.asarray(x).ravel() for p, x in jax.tree_util.tree_leaves_with_path(params)
              if np.ndim(x) >= 2 and "token_embed" not in jax.tree_util.keystr(p)]
    assert 0.03 < np.concatenate(others).std() < 0.06  # the other matrices keep initializer_range 0.05
