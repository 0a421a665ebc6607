"""Position-encoding plots: the numbers are the model's own, the files are real pictures."""

import math

import jax
import matplotlib.image
import numpy as np
import pytest

import flaxformer_lite as ffl
from flaxformer_lite import ops, viz
from flaxformer_lite.cli import main
from flaxformer_lite.runtime import checkpoint

TINY = ["model.num_layers=1", "model.d_model=32", "model.d_ff=64", "model.num_heads=4",
        "model.max_len=48", "data.seq_len=48"]


def _model(preset, *extra):
    return ffl.load_config(preset, overrides=TINY + list(extra)).model


def _random_params(cfg, seed):
    """The model's parameter tree with every leaf random (not an init's zeros or ones).

    Shapes come from eval_shape: nothing is compiled, so the test stays fast.
    """
    shapes = jax.eval_shape(lambda: ffl.init_params(cfg, jax.random.key(0)))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), shapes)


def _assert_picture(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] >= 300 and pixels.shape[1] >= 800
    assert pixels[..., :3].std() > 0.05  # something was drawn, not a blank canvas


def test_sinusoidal_is_the_papers_table_and_similarity_depends_on_distance_only(tmp_path):
    cfg = _model("gpt_tiny", "model.position=sinusoidal")
    a = viz.position_arrays(cfg, length=40)["sinusoidal"]
    pos, i = np.arange(40)[:, None], np.arange(16)[None, :]
    angle = pos / 10000.0 ** (2 * i / 32)
    np.testing.assert_allclose(a["table_PD"][:, 0::2], np.sin(angle), atol=1e-5)
    np.testing.assert_allclose(a["table_PD"][:, 1::2], np.cos(angle), atol=1e-5)
    sim = a["similarity_PP"]
    np.testing.assert_allclose(np.diag(sim), 1.0, atol=1e-5)
    np.testing.assert_allclose(sim[1:, 1:], sim[:-1, :-1], atol=1e-5)  # Toeplitz: a function of p - q
    (path,) = viz.plot_positions(cfg, tmp_path, length=40)
    assert path.name == "sinusoidal.png"
    _assert_picture(path)


def test_learned_table_from_a_run_directory(tmp_path):
    cfg = ffl.load_config("gpt_tiny", overrides=TINY)
    params = _random_params(cfg.model, 0)
    workdir = tmp_path / "run"
    checkpoint.save_params(workdir, cfg, params, step=7)
    out = tmp_path / "plots"
    assert main(["viz", "--positions", "--workdir", str(workdir), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["learned_decoder.png"]
    _assert_picture(out / "learned_decoder.png")

    _, loaded = checkpoint.load_params(workdir)
    a = viz.position_arrays(cfg.model, loaded)["learned_decoder"]
    table = np.asarray(params["params"]["decoder"]["position_embedding"]["embedding"])
    np.testing.assert_array_equal(a["table_PD"], table)
    unit = table / np.linalg.norm(table, axis=1, keepdims=True)
    np.testing.assert_allclose(a["similarity_PP"], unit @ unit.T, atol=1e-5)
    with pytest.raises(ValueError, match="exceeds the learned table's 48 rows"):
        viz.position_arrays(cfg.model, loaded, length=49)


def test_learned_tables_of_an_hf_folder_per_stack(tmp_path):
    cfg = _model("bert_tiny")
    params = _random_params(cfg, 3)
    ffl.hf.save(cfg, params, tmp_path / "hf")
    out = tmp_path / "plots"
    assert main(["viz", "--positions", "--hf", str(tmp_path / "hf"), "--out", str(out), "--length", "20"]) == 0
    assert [p.name for p in out.iterdir()] == ["learned_encoder.png"]
    _, loaded = ffl.hf.load(tmp_path / "hf")
    a = viz.position_arrays(cfg, loaded, length=20)["learned_encoder"]
    expected = np.asarray(params["params"]["encoder"]["position_embedding"]["embedding"])[:20]
    np.testing.assert_allclose(a["table_PD"], expected, atol=1e-6)


def test_fresh_init_draws_the_initializers_table(tmp_path):
    cfg = _model("gpt_tiny")
    a = viz.position_arrays(cfg)["learned_decoder"]
    assert a["table_PD"].shape == (48, 32)
    assert abs(a["table_PD"].std() / cfg.initializer_range - 1.0) < 0.1
    assert abs(a["table_PD"].mean()) < 0.1 * cfg.initializer_range


def test_t5_buckets_and_per_head_bias_come_from_the_stacks_tables(tmp_path):
    cfg = _model("t5_tiny", "model.head_dim=8", "model.num_decoder_layers=1")
    params = _random_params(cfg, 5)
    arrays = viz.position_arrays(cfg, params)
    assert sorted(arrays) == ["relative_decoder", "relative_encoder"]
    max_exact_bidir = cfg.relative_buckets // 4
    for stack, bidirectional in (("encoder", True), ("decoder", False)):
        a = arrays[f"relative_{stack}"]
        d, bucket = a["distance_X"], a["bucket_X"]
        table = np.asarray(params["params"][stack]["relpos_bias"])
        np.testing.assert_array_equal(a["bias_NX"], table[bucket].T)  # [N, X]: each head's column
        past = d <= 0
        assert d.min() < -cfg.relative_max_distance  # the plot reaches the shared last bucket
        assert np.all(np.diff(bucket[past]) <= 0)  # further back: same or later bucket
        exact = max_exact_bidir if bidirectional else cfg.relative_buckets // 2
        near = past & (-d < exact)
        np.testing.assert_array_equal(bucket[near], -d[near])  # small offsets are exact
        far = past & (-d >= cfg.relative_max_distance)
        assert len(set(bucket[far])) == 1
        if bidirectional:
            assert d.max() == -d.min() and set(bucket[d > 0]).isdisjoint(bucket[past])
        else:
            assert d.max() == 0
    written = viz.plot_positions(cfg, tmp_path, params, source="test params")
    assert [p.name for p in written] == ["relative_encoder.png", "relative_decoder.png"]
    for p in written:
        _assert_picture(p)


def test_rope_rotates_each_pair_at_its_own_frequency(tmp_path):
    cfg = _model("llama_tiny", "model.num_kv_heads=2")
    a = viz.position_arrays(cfg, length=30)["rope"]
    H = cfg.dim_per_head
    angle_PJ = np.arange(30)[:, None] * cfg.rope_theta ** (-np.arange(0, H, 2)[None, :] / H)
    np.testing.assert_allclose(a["cos_PJ"], np.cos(angle_PJ), atol=1e-5)
    np.testing.assert_allclose(a["sin_PJ"], np.sin(angle_PJ), atol=1e-5)
    np.testing.assert_allclose(a["score_X"], np.cos(angle_PJ).mean(1), atol=1e-5)
    assert a["score_X"][0] == pytest.approx(1.0)
    (path,) = viz.plot_positions(cfg, tmp_path, length=30)
    _assert_picture(path)


def test_rope_plot_follows_the_configs_frequency_scaling(tmp_path):
    """Llama 3's rope_scaling stretches the long wavelengths: the plotted angles are the
    model's (ops.rope_frequencies with the scaling), not plain theta^(-2j/H)."""
    cfg = _model("llama3_tiny")
    assert cfg.rope_scaling is not None and cfg.rope_scaling.factor != 1
    a = viz.position_arrays(cfg, length=30)["rope"]
    inv_freq_J = np.asarray(ops.rope_frequencies(cfg.dim_per_head, cfg.rope_theta, **vars(cfg.rope_scaling)))
    plain_J = cfg.rope_theta ** (-np.arange(0, cfg.dim_per_head, 2) / cfg.dim_per_head)
    assert not np.allclose(inv_freq_J, plain_J)
    np.testing.assert_allclose(a["cos_PJ"], np.cos(np.arange(30)[:, None] * inv_freq_J), atol=1e-5)
    (path,) = viz.plot_positions(cfg, tmp_path, length=30)
    _assert_picture(path)


@pytest.mark.parametrize("preset,heads", [("gpt_tiny", 4), ("bert_tiny", 6)])
def test_alibi_is_a_linear_penalty_per_head(tmp_path, preset, heads):
    cfg = _model(preset, "model.position=alibi", f"model.num_heads={heads}", "model.d_model=48")
    a = viz.position_arrays(cfg, length=20)["alibi"]
    d = a["distance_X"]
    # Decoders see only the past; encoders both sides.
    assert (d.min(), d.max()) == ((-19, 0) if cfg.family == "decoder" else (-19, 19))
    lower = 2 ** math.floor(math.log2(heads))
    slopes = [2 ** (-8 * (i + 1) / lower) for i in range(lower)]
    slopes += [2 ** (-8 * (i + 1) / (2 * lower)) for i in range(0, 2 * (heads - lower), 2)]
    np.testing.assert_allclose(a["slopes_N"], slopes, rtol=1e-6)
    np.testing.assert_allclose(a["bias_NX"], -np.asarray(slopes)[:, None] * np.abs(d)[None], rtol=1e-6)
    (path,) = viz.plot_positions(cfg, tmp_path, length=20)
    _assert_picture(path)


def test_bad_requests_are_named(tmp_path, capsys):
    none = _model("gpt_tiny", "model.position=none")
    with pytest.raises(ValueError, match="model.position is 'none'"):
        viz.position_arrays(none)
    t5 = _model("t5_tiny", "model.head_dim=8")
    with pytest.raises(ValueError, match="params hold no relpos_bias table"):
        viz.position_arrays(t5, _random_params(_model("gpt_tiny"), 0))
    cases = [
        (["--positions"], "needs --config CONFIG"),
        (["--positions", "--config", "gpt_tiny", "--text", "hi"], "drop them with --positions"),
        (["--config", "gpt_tiny", "--text", "hi"], "attention plots need trained weights"),
        (["--positions", "--config", "gpt_tiny", "--set", "model.position=none"], "model.position is 'none'"),
        (["--positions", "--config", "gpt_tiny", "--set", "model.positon=rope"], "model.positon"),
        (["--positions", "--workdir", str(tmp_path / "nowhere")], "not a run directory"),
        (["--positions", "--hf", "gpt_tiny", "--set", "model.position=rope"], "--set overrides --config keys"),
    ]
    for args, message in cases:
        assert main(["viz", *args, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()
