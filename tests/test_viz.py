"""Attention visualization: the maps are real attention, the files are written, errors are clear."""

import json
import re

import jax
import numpy as np
import pytest

import flaxformer_lite as ffl
from flaxformer_lite import viz
from flaxformer_lite.cli import main
from flaxformer_lite.runtime import checkpoint

TINY = ["model.num_layers=2", "model.d_model=32", "model.d_ff=64", "model.num_heads=2"]


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory):
    cfg = ffl.load_config("gpt_tiny", overrides=TINY)
    workdir = tmp_path_factory.mktemp("gpt")
    checkpoint.save_params(workdir, cfg, ffl.init_params(cfg.model, jax.random.key(0)))
    return cfg, workdir


def test_decoder_maps_are_causal_distributions(gpt_run):
    cfg, workdir = gpt_run
    _, params = checkpoint.load_params(workdir)
    ids = np.random.default_rng(0).integers(4, 260, 11)
    maps = viz.attention_maps(cfg.model, params, ids)
    w = maps["decoder"]
    assert w.shape == (2, 2, 11, 11)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
    assert np.all(np.triu(w, k=1) == 0.0)  # nothing attends to the future


def test_cli_writes_pngs_and_a_page_holding_the_same_maps(gpt_run, tmp_path):
    cfg, workdir = gpt_run
    text = "attend to this"
    assert main(["viz", "--workdir", str(workdir), "--text", text, "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["decoder_layer0.png", "decoder_layer1.png"]
    for png in tmp_path.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "index.html").read_text()
    data = json.loads(re.search(r"const D = (\{.*\});", page).group(1))
    _, params = checkpoint.load_params(workdir)
    ids = np.asarray(ffl.data.load_tokenizer("byte").encode(text))
    expected = viz.attention_maps(cfg.model, params, ids)["decoder"]
    np.testing.assert_allclose(np.asarray(data["maps"]["decoder"]), expected, atol=1e-4)
    assert len(data["tokens"]["source"]) == len(text)


def test_encoder_decoder_shows_cross_attention(tmp_path):
    cfg = ffl.load_config("t5_tiny", overrides=TINY + ["model.num_decoder_layers=1", "model.head_dim=16"])
    params = ffl.init_params(cfg.model, jax.random.key(1))
    tok = ffl.data.load_tokenizer("byte")
    written = viz.visualize(cfg.model, params, tok, "source text", tmp_path, target="target")
    names = sorted(p.name for p in written)
    assert names == ["cross_layer0.png", "decoder_layer0.png", "encoder_layer0.png", "encoder_layer1.png", "index.html"]
    maps = viz.attention_maps(cfg.model, params, np.asarray(tok.encode("source text")),
                              np.asarray([0] + tok.encode("target")))
    assert maps["cross"].shape == (1, 2, 7, 11)
    np.testing.assert_allclose(maps["cross"].sum(-1), 1.0, atol=1e-5)


def test_bad_inputs_are_named(gpt_run, tmp_path):
    cfg, _ = gpt_run
    params = ffl.init_params(cfg.model, jax.random.key(0))
    tok = ffl.data.load_tokenizer("byte")
    with pytest.raises(ValueError, match="--text is empty"):
        viz.visualize(cfg.model, params, tok, "", tmp_path)
    with pytest.raises(ValueError, match="longer than model.max_len"):
        viz.visualize(cfg.model, params, tok, "x" * (cfg.model.max_len + 1), tmp_path)
    with pytest.raises(ValueError, match=r"input_ids must be non-empty token ids in \[0, 384\)"):
        viz.attention_maps(cfg.model, params, np.asarray([5, 999]))
    t5 = ffl.load_config("t5_tiny", overrides=TINY + ["model.head_dim=16"]).model
    with pytest.raises(ValueError, match="needs target_ids"):
        viz.attention_maps(t5, ffl.init_params(t5, jax.random.key(0)), np.asarray([5, 6]))
