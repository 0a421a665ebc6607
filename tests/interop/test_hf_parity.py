"""Parity with transformers (PyTorch) on tiny random models: import, export, round trip.

Each case builds a randomly initialised model with transformers, loads it here and
compares last hidden states and logits (max abs diff <= 1e-4, float32, a padded batch
compared at real tokens), then exports it and compares what transformers reloads.
"""

import pytest
import transformers

from flaxformer_lite.interop import parity

transformers.logging.set_verbosity_error()

# HF -> here -> HF rebuilds only tensors transformers never reads:
# - RoBERTa position rows below padding_idx (positions start at padding_idx + 1);
# - T5's `shared` table once both stacks own their input tables.
NEVER_READ = {
    "roberta": ["roberta.embeddings.position_embeddings.weight rows [0]"],
    "roberta (classifier)": ["roberta.embeddings.position_embeddings.weight rows [0]"],
    "t5 (own tables, gated-silu)": ["shared.weight"],
}


# scan_layers changes only how layers are stacked, the same for every case of a family:
# one scanned case per HF model_type keeps the folder fast (each case compiles a model).
SCANNED = ["bert (MiniLM-shaped)", "roberta (classifier)", "gpt2", "llama", "mistral (window 4, MQA)", "t5 v1.1",
           # per-layer windows and RoPE bases are traced under scan
           "qwen2 (qkv bias, window 4 on layer 1)", "gemma3 (q/k norms, local RoPE base)"]


@pytest.mark.parametrize(
    "case, scan_layers",
    [(c, False) for c in parity.CASES] + [(c, True) for c in SCANNED],
    ids=lambda v: v if isinstance(v, str) else ("scan" if v else "unrolled"),
)
def test_parity_with_transformers(case, scan_layers, tmp_path):
    row = parity.measure(case, tmp_path, scan_layers=scan_layers)
    for key in ("import_hidden", "import_logits", "export_hidden", "export_logits"):
        assert row[key] <= parity.TOLERANCE, (case, key, row[key])
    assert row["round_trip"] == NEVER_READ.get(case, [])
    if parity.CASES[case][0].startswith(("GPT2", "Llama", "Mistral", "Qwen", "Gemma")):
        ours, theirs = row["parameters"]  # the decoders hold exactly transformers' parameters
        assert ours == theirs, (case, ours, theirs)


def test_markdown_table_lists_every_row():
    rows = [
        {"case": "c", "hf_class": "K", "head": "h", "scan_layers": s, "import_hidden": 1e-7,
         "import_logits": 2e-7, "export_hidden": 3e-7, "export_logits": 4e-7, "round_trip": changed}
        for s, changed in ((False, []), (True, ["x rows [0]"]))
    ]
    lines = parity.markdown(rows).splitlines()
    assert len(lines) == 2 + len(rows)
    assert "| nothing |" in lines[2] and "| x rows [0] |" in lines[3]


@pytest.mark.parametrize("preset, model_type", [
    ("llama3_tiny", "llama"), ("qwen2_tiny", "qwen2"), ("qwen3_tiny", "qwen3"),
    ("gemma2_tiny", "gemma2"), ("gemma3_tiny", "gemma3_text"),
])
def test_family_presets_export_to_their_hf_family(preset, model_type, tmp_path):
    """A model made here (2 layers, one local and one global where the family has both)
    is written as its family, and transformers loads every tensor and computes its logits,
    on rows longer than the window (32)."""
    import jax
    import numpy as np
    import torch

    import flaxformer_lite as ffl
    from flaxformer_lite.models import build_model

    overrides = ["model.num_layers=2", "model.d_model=64", "model.d_ff=96", "model.vocab_size=96"]
    overrides += ["model.attention_types=[local, global]"] if "gemma" in preset else []
    cfg = ffl.load_config(preset, overrides=overrides).model
    params = ffl.init_params(cfg, jax.random.key(0))
    # Norm scales and biases start at 0 or 1: move every parameter off its init.
    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), params)
    ffl.hf.save(cfg, params, tmp_path)
    assert ffl.hf.read_config(tmp_path)["model_type"] == model_type
    model, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, (1, 40))
    with torch.no_grad():
        theirs = model.eval()(torch.from_numpy(ids)).logits.numpy()
    ours = jax.jit(build_model(cfg).apply)(params, ids).logits
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=parity.TOLERANCE)
