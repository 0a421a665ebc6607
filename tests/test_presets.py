"""Every preset parses and builds at full size (eval_shape), with published counts."""

import pathlib

import flax.linen as nn
import jax
import pytest

import flaxformer_lite as ffl
from flaxformer_lite.models import build_model, dummy_inputs

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
