"""ffl.summary and `flaxformer-lite summary`: counts, layouts, FLOPs and memory, no allocation."""

import re

import jax
import pytest

import flaxformer_lite as ffl
from flaxformer_lite.cli import main
from flaxformer_lite.models import flops
from flaxformer_lite.models.summary import _flops, _size, activation_elements, parameter_rows


@pytest.mark.parametrize(
    "name, expected",
    [("gpt2_small", 124_439_808), ("t5_small", 60_506_624), ("transformer_base", 63_082_496)],
)
def test_full_size_presets_print_their_published_counts(name, expected):
    first = ffl.summary(ffl.load_config(name)).splitlines()[0]
    assert first.endswith(f", {expected:,} parameters")


def test_bert_base_prints_bertmodels_count_without_the_mlm_head():
    text = ffl.summary(ffl.load_config("bert_base"))
    assert "without the MLM head (mlm_transform, mlm_norm, mlm_bias): 109,482,240" in text


def test_embeddings_are_the_lookup_tables():
    cfg = ffl.load_config("gpt2_small")
    m = cfg.model
    tables = m.vocab_size * m.d_model + m.max_len * m.d_model  # token + learned position tables
    total = sum(r["count"] for r in parameter_rows(m))
    assert f"embeddings {tables:,} ({tables / total:.1%}), the rest {total - tables:,}" in ffl.summary(cfg)


@pytest.mark.parametrize("name", ["gpt_tiny", "t5_tiny", "bert_tiny"])
def test_scanned_and_unrolled_layers_give_the_same_report(name):
    unrolled = ffl.summary(ffl.load_config(name, overrides=["model.scan_layers=false"]))
    scanned = ffl.summary(ffl.load_config(name, overrides=["model.scan_layers=true"]))
    assert scanned == unrolled
    layers = ffl.load_config(name).model.num_layers
    assert f"layers[0..{layers - 1}]/" in scanned


def test_rows_add_up_to_the_initialised_model():
    cfg = ffl.load_config("llama_tiny", overrides=["model.num_layers=3"])
    rows = parameter_rows(cfg.model)
    params = jax.eval_shape(lambda: ffl.init_params(cfg.model, jax.random.key(0)))
    assert sum(r["count"] for r in rows) == ffl.count_params(params)
    text = ffl.summary(cfg)
    table = [line for line in text.splitlines() if re.match(r"\S+/\S+|token_embed", line)]
    assert len(table) == len(rows)
    shares = [float(line.rsplit(None, 1)[1].rstrip("%")) for line in table]
    assert abs(sum(shares) - 100) < 0.05 * len(rows)


def test_flops_and_memory_lines_use_the_shared_formulas():
    cfg = ffl.load_config("gpt_tiny", overrides=["data.batch_size=4"])
    text = ffl.summary(cfg)
    T = cfg.data.seq_len
    assert f"training {_flops(flops.training_flops_per_token(cfg.model, T))}" in text
    assert f"forward {_flops(flops.forward_flops_per_sequence(cfg.model, T) / T)}" in text
    n = sum(r["count"] for r in parameter_rows(cfg.model))
    memory = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith("  ")}
    assert " ".join(memory["parameters"][1:]) == f"{_size(4 * n)} {_size(2 * n)}"
    assert f"memory at batch 4, seq_len {T}" in text
    acts = activation_elements(cfg.model, 4, T)
    assert " ".join(memory["activations"][2:]) == f"{_size(4 * acts)} {_size(2 * acts)}"


def test_activation_count_is_linear_in_batch_and_quadratic_only_through_attention():
    m = ffl.load_config("gpt_tiny").model
    T = 64
    assert activation_elements(m, 6, T) == 3 * activation_elements(m, 2, T)
    # Only the attention probabilities [B,N,T,T] grow with T^2: f(2T) - 2 f(T) = 2 B L N T^2.
    assert activation_elements(m, 1, 2 * T) - 2 * activation_elements(m, 1, T) == 2 * m.num_layers * m.num_heads * T**2
    remat = ffl.load_config("gpt_tiny", overrides=["model.remat_policy=full"]).model
    assert activation_elements(remat, 2, T) < activation_elements(m, 2, T) / 2


def test_a_model_larger_than_memory_is_summarised_without_allocating():
    cfg = ffl.load_config("gpt2_small", overrides=[
        "model.scan_layers=true", "model.num_layers=48", "model.d_model=8192", "model.num_heads=64",
        "model.d_ff=32768"])
    first = ffl.summary(cfg).splitlines()[0]
    count = int(first.rsplit(", ", 1)[1].split()[0].replace(",", ""))
    assert count > 38_000_000_000  # 150 GiB of float32: it cannot have been allocated here


def test_summary_command(capsys):
    assert main(["summary", "--config", "gpt_tiny", "--set", "data.batch_size=2", "model.num_layers=3"]) == 0
    out = capsys.readouterr().out
    assert "layers[0..2]/" in out and "memory at batch 2" in out
    assert main(["summary", "--config", "gpt_tiny", "--set", "model.num_layerz=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "num_layerz" in err
