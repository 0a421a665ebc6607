"""Golden parameter trees: names, shapes and logical axes cannot drift unnoticed.

Each file in tests/testdata/golden/ maps a parameter path to [shape, logical axes] for one
preset (plus overrides). After an intended change to the parameter tree, regenerate them
explicitly and review the diff:

    python tests/core/test_core_golden.py

The tests themselves never write these files.
"""

import json
import pathlib
import sys

import jax
import pytest

import flaxformer_lite as ffl
from flaxformer_lite.models import init_params, param_logical_axes

GOLDEN_DIR = pathlib.Path(__file__).resolve().parent.parent / "testdata" / "golden"
REGENERATE = "python tests/core/test_core_golden.py"

# name -> (preset, overrides). Together they hold every kind of parameter the core creates.
GOLDEN = {
    "decoder_gpt": ("gpt_tiny", []),  # learned positions, LayerNorm with bias, tied head
    "decoder_llama": ("llama_tiny", []),  # GQA, RMSNorm, SwiGLU gate, no biases, untied head
    "decoder_llama_scan": ("llama_tiny", ["model.scan_layers=true"]),  # stacked 'layers' axis
    "encoder_bert": ("bert_tiny", ["model.num_labels=3"]),  # token types, MLM head, pooler, classifier
    "encoder_decoder_t5": ("t5_tiny", []),  # relative position tables, cross-attention
    # LayerNorm with biases in both stacks, separate decoder embedding, untied lm_head:
    "encoder_decoder_2017": ("transformer_base", ["model.num_layers=1", "model.num_decoder_layers=1",
                                                  "model.share_embeddings=false", "model.tie_embeddings=false",
                                                  "model.scan_layers=false"]),
}


def live_tree(preset: str, overrides: list) -> dict:
    """{'path/to/param': [shape, logical axes]} of the model, without allocating it."""
    cfg = ffl.load_config(preset, overrides=overrides).model
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    axes = param_logical_axes(cfg)
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
    name = lambda path: "/".join(k.key for k in path)  # noqa: E731
    specs = {name(p): s for p, s in jax.tree_util.tree_leaves_with_path(axes["params"], is_leaf=is_spec)}
    return {name(p): [list(x.shape), list(specs[name(p)])]
            for p, x in jax.tree_util.tree_leaves_with_path(shapes["params"])}


def golden_path(name: str) -> pathlib.Path:
    return GOLDEN_DIR / f"{name}.json"


def write_golden(name: str) -> pathlib.Path:
    preset, overrides = GOLDEN[name]
    path = golden_path(name)
    # One parameter per line, so a regeneration diff reads as the list of what changed.
    entries = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in live_tree(preset, overrides).items())
    path.write_text(f'{{\n "preset": {json.dumps(preset)},\n "overrides": {json.dumps(overrides)},\n'
                    f' "params": {{\n{entries}\n }}\n}}\n')
    return path


def describe_drift(golden: dict, live: dict) -> str:
    lines = [f"- missing now: {k} {golden[k]}" for k in sorted(golden.keys() - live.keys())]
    lines += [f"+ new: {k} {live[k]}" for k in sorted(live.keys() - golden.keys())]
    lines += [f"~ changed: {k} {golden[k]} -> {live[k]}"
              for k in sorted(golden.keys() & live.keys()) if golden[k] != live[k]]
    return "\n".join(lines)


@pytest.mark.parametrize("name", GOLDEN)
def test_parameter_tree_matches_golden_file(name):
    path = golden_path(name)
    assert path.exists(), f"{path} is missing: create it with `{REGENERATE}`"
    golden = json.loads(path.read_text())
    preset, overrides = GOLDEN[name]
    assert (golden["preset"], golden["overrides"]) == (preset, overrides), f"{path} was made from another config"
    live = live_tree(preset, overrides)
    assert live == golden["params"], (
        f"parameter tree of {preset} {overrides} drifted from {path}:\n{describe_drift(golden['params'], live)}\n"
        f"If the change is intended, regenerate with `{REGENERATE}` and review the diff."
    )


def test_golden_files_have_no_strays():
    assert sorted(p.stem for p in GOLDEN_DIR.glob("*.json")) == sorted(GOLDEN)


if __name__ == "__main__":
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    for stray in set(p.stem for p in GOLDEN_DIR.glob("*.json")) - set(GOLDEN):
        print(f"note: {golden_path(stray)} is not in GOLDEN; delete it if it is obsolete", file=sys.stderr)
    for name in GOLDEN:
        print(f"wrote {write_golden(name)}")
