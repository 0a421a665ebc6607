"""hf.load / hf.save refuse what they cannot represent, with errors naming the key or tensor."""

import dataclasses
import json
import pathlib
import pickle
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file, save_file

import flaxformer_lite as ffl
from flaxformer_lite.interop import families, hf, parity
from flaxformer_lite.models import build_model, dummy_inputs

transformers.logging.set_verbosity_error()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One saved tiny HF model per case used below."""
    root = tmp_path_factory.mktemp("hf")
    return {name: (parity.build_hf(name, root / name), root / name) for name in ("bert", "gpt2", "llama", "t5 v1.0")}


def variant(folders, case, tmp_path, config=None, tensors=None) -> pathlib.Path:
    """A copy of a case's folder with config.json keys replaced and/or tensors rewritten."""
    out = tmp_path / "variant"
    shutil.copytree(folders[case][1], out)
    if config:
        hf_config = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**hf_config, **config}))
    if tensors:
        file = out / "model.safetensors"
        weights = load_file(file)
        tensors(weights)
        save_file(weights, file, metadata={"format": "pt"})
    return out


@pytest.mark.parametrize(
    "case, change, named",
    [
        ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "'yarn'"),
        ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0, "beta_fast": 32}},
         "beta_fast"),
        ("llama", {"model_type": "gemma2", "use_bidirectional_attention": True}, "use_bidirectional_attention"),
        ("llama", {"model_type": "qwen2", "layer_types": ["full_attention", "chunked_attention"]}, "layer_types"),
        ("llama", {"model_type": "qwen3", "attention_bias": True}, "attention_bias"),
        ("llama", {"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "'dynamic'"),
        ("llama", {"attention_bias": True}, "attention_bias"),
        ("bert", {"position_embedding_type": "relative_key"}, "position_embedding_type"),
        ("bert", {"hidden_act": "gelu_fast"}, "hidden_act"),
        ("t5 v1.0", {"feed_forward_proj": "gated-relu"}, "feed_forward_proj"),
        ("t5 v1.0", {"model_type": "bart"}, "model_type='bart'"),
    ],
)
def test_unsupported_hf_option_is_a_clear_error(folders, tmp_path, case, change, named):
    with pytest.raises(hf.HFError, match="config.json") as err:
        hf.load(variant(folders, case, tmp_path, config=change))
    assert named in str(err.value)


def test_pickle_only_folder_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "unpickled"

    class Trap:
        def __reduce__(self):  # unpickling this would create the marker file
            return pathlib.Path.touch, (marker,)

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 32}))
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(Trap()))
    with pytest.raises(hf.HFError) as err:
        hf.load(tmp_path)
    message = str(err.value)
    assert "pytorch_model.bin" in message and "never opens" in message and "save_pretrained" in message
    assert not marker.exists()


def test_missing_and_unexpected_tensors_are_listed(folders, tmp_path):
    def edit(weights):
        del weights["transformer.h.1.mlp.c_fc.bias"]
        weights["transformer.h.0.attn.extra"] = np.ones(3, np.float32)

    with pytest.raises(hf.HFError) as err:
        hf.load(variant(folders, "gpt2", tmp_path, tensors=edit))
    message = str(err.value)
    assert "missing: transformer.h.1.mlp.c_fc.bias" in message
    assert "unexpected: transformer.h.0.attn.extra" in message


def test_tied_copies_and_buffers_of_older_checkpoints_are_accepted(folders, tmp_path):
    def edit(weights):
        weights["cls.predictions.decoder.weight"] = weights["bert.embeddings.word_embeddings.weight"]
        weights["cls.predictions.decoder.bias"] = weights["cls.predictions.bias"]
        weights["bert.embeddings.position_ids"] = np.arange(32)[None]

    _, expected = hf.load(folders["bert"][1])
    _, params = hf.load(variant(folders, "bert", tmp_path, tensors=edit))
    jax.tree.map(np.testing.assert_array_equal, params, expected)


def test_a_tied_copy_that_differs_is_an_error(folders, tmp_path):
    def edit(weights):
        weights["cls.predictions.decoder.weight"] = weights["bert.embeddings.word_embeddings.weight"] + 1

    with pytest.raises(hf.HFError, match="cls.predictions.decoder.weight differs"):
        hf.load(variant(folders, "bert", tmp_path, tensors=edit))


def test_unexpected_head_can_be_skipped_knowingly(tmp_path):
    import torch

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
    model = transformers.BertForPreTraining(config)
    model.save_pretrained(tmp_path)
    with pytest.raises(hf.HFError, match="cls.seq_relationship.bias, cls.seq_relationship.weight"):
        hf.load(tmp_path)
    cfg, params = hf.load(tmp_path, skip=("cls.seq_relationship.",))
    assert cfg.mlm_head and cfg.pooler
    np.testing.assert_array_equal(
        params["params"]["pooler"]["kernel"], model.bert.pooler.dense.weight.detach().numpy().T
    )


def test_shape_mismatch_names_the_tensor(folders, tmp_path):
    def edit(weights):
        weights["bert.encoder.layer.1.attention.self.key.weight"] = np.ones((32, 30), np.float32)

    with pytest.raises(hf.HFError, match=r"bert.encoder.layer.1.attention.self.key.weight has shape \(32, 30\)"):
        hf.load(variant(folders, "bert", tmp_path, tensors=edit))


def test_integer_weights_name_the_tensor(folders, tmp_path):
    def edit(weights):
        weights["model.norm.weight"] = np.ones(weights["model.norm.weight"].shape, np.int32)

    with pytest.raises(hf.HFError, match="model.norm.weight has dtype I32"):
        hf.load(variant(folders, "llama", tmp_path, tensors=edit))


def test_sharded_folder_loads_the_same_params(folders, tmp_path):
    model, folder = folders["llama"]
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    _, whole = hf.load(folder)
    _, sharded = hf.load(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, whole, sharded)


def test_index_may_only_name_files_beside_it(folders, tmp_path):
    folder = variant(folders, "gpt2", tmp_path)
    (folder / "model.safetensors").unlink()
    index = {"weight_map": {"transformer.wte.weight": "../elsewhere.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(hf.HFError, match="names shard '../elsewhere.safetensors'"):
        hf.load(folder)


def test_bfloat16_params_and_scan_layers_on_request(folders):
    _, folder = folders["t5 v1.0"]
    cfg, params = hf.load(folder)
    cfg16, params16 = hf.load(folder, param_dtype="bfloat16", scan_layers=True)
    assert cfg16 == dataclasses.replace(cfg, param_dtype="bfloat16", scan_layers=True)
    query = params["params"]["encoder"]["layers_1"]["self_attention"]["query"]
    stacked = params16["params"]["encoder"]["layers"]["self_attention"]["query"]
    assert stacked.dtype == jax.numpy.bfloat16
    np.testing.assert_array_equal(stacked[1], query.astype(jax.numpy.bfloat16))


def test_t5_init_scale_comes_from_initializer_factor(folders, tmp_path):
    cfg, params = hf.load(variant(folders, "t5 v1.0", tmp_path, config={"initializer_factor": 0.5}))
    # HF T5 draws k/v/wi at factor * d_model**-0.5 and the shared table at factor.
    assert cfg.initializer_range == pytest.approx(0.5 * cfg.d_model**-0.5)
    assert cfg.embedding_init_std == 0.5
    hf.save(cfg, params, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["initializer_factor"] == pytest.approx(0.5)


def test_load_rejects_settings_that_change_the_model(folders):
    with pytest.raises(hf.HFError, match="accepts only"):
        hf.load(folders["gpt2"][1], num_layers=3)


def test_missing_folder_says_nothing_is_downloaded(tmp_path):
    with pytest.raises(hf.HFError, match="downloads nothing"):
        hf.load(tmp_path / "bert-base-uncased")


def tiny(name, *overrides):
    shape = ["model.d_model=32", "model.num_heads=2", "model.d_ff=64", "model.num_layers=1", "model.vocab_size=64"]
    return ffl.load_config(name, overrides=shape + list(overrides)).model


def random_params(cfg):
    """Random values in the model's parameter shapes (no init compile: these tests never run it)."""
    model = build_model(cfg)
    shapes = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), *dummy_inputs(cfg)))["params"])
    rng = np.random.default_rng(0)
    return {"params": jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)}


@pytest.mark.parametrize(
    "name, overrides, model_type, named",
    [
        ("gpt_tiny", ["model.position=alibi"], "gpt2", "model.position='alibi'"),
        ("llama_tiny", ["model.num_kv_heads=1", "model.use_bias=true"], "llama", "model.use_bias=True"),
        ("transformer_base", ["model.num_decoder_layers=1"], "t5", "model.position='sinusoidal'"),
        ("bert_tiny", ["model.norm_position=pre"], "roberta", "model.norm_position='pre'"),
    ],
)
def test_export_refuses_what_the_hf_family_cannot_express(tmp_path, name, overrides, model_type, named):
    cfg = tiny(name, *overrides)
    params = random_params(cfg)
    with pytest.raises(hf.HFError, match=f"cannot export to HF {model_type}") as err:
        hf.save(cfg, params, tmp_path, model_type=model_type)
    assert named in str(err.value)
    assert not (tmp_path / "config.json").exists()


def test_export_names_params_that_do_not_fit_the_config(tmp_path):
    cfg = tiny("gpt_tiny")
    params = random_params(cfg)
    params["params"]["decoder"]["layers_0"]["mlp"]["wi"] = np.ones((32, 65), np.float32)
    with pytest.raises(hf.HFError, match="decoder/layers_0/mlp/wi"):
        hf.save(cfg, params, tmp_path)


class PublishedTensors:
    """Names and shapes of a published checkpoint's embedding tables; distinct values per name."""

    def __init__(self, tables: dict[str, tuple[int, int]]):
        self.tables = tables

    def keys(self):
        return set(self.tables)

    def shape(self, name):
        return self.tables[name]

    def get(self, name):
        return np.full(2, sorted(self.tables).index(name), np.float32)


# config.json keys of published checkpoints (sizes only), their tables, and the parameter
# counts transformers reports for them (t5 counts: DESIGN.md; gpt2/bert: tests/test_presets.py).
PUBLISHED = [
    ("gpt2", {"model_type": "gpt2", "vocab_size": 50257, "n_embd": 768, "n_head": 12, "n_layer": 12,
              "n_positions": 1024}, {"wte.weight": (50257, 768)}, 124_439_808),
    ("bert-base-uncased (BertModel)", {"model_type": "bert", "vocab_size": 30522, "hidden_size": 768,
     "num_attention_heads": 12, "num_hidden_layers": 12, "intermediate_size": 3072},
     {"pooler.dense.weight": (768, 768)}, 109_482_240),
    ("t5-small", {"model_type": "t5", "vocab_size": 32128, "d_model": 512, "d_kv": 64, "d_ff": 2048,
                  "num_heads": 8, "num_layers": 6}, {"shared.weight": (32128, 512)}, 60_506_624),
    ("t5-v1_1-small", {"model_type": "t5", "vocab_size": 32128, "d_model": 512, "d_kv": 64, "d_ff": 1024,
                       "num_heads": 6, "num_layers": 8, "feed_forward_proj": "gated-gelu",
                       "tie_word_embeddings": False},
     {"shared.weight": (32128, 512), "lm_head.weight": (32128, 512)}, 76_961_152),
]


@pytest.mark.parametrize("name, hf_config, tables, count", PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_published_configs_map_to_published_parameter_counts(name, hf_config, tables, count):
    cfg, _ = families.family_for(hf_config["model_type"]).config_in(hf_config, PublishedTensors(tables), "")
    model = build_model(cfg)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *dummy_inputs(cfg)))["params"]
    assert ffl.count_params(nn.unbox(shapes)) == count


@pytest.mark.parametrize("preset", ["gemma3_tiny", "t5_tiny", "bert_tiny"])
def test_shapes_traced_with_scanned_layers_are_the_unrolled_models(preset):
    cfg = ffl.load_config(preset).model
    unrolled = dataclasses.replace(cfg, scan_layers=False)
    model = build_model(unrolled)
    tree = jax.eval_shape(lambda: model.init(jax.random.key(0), *dummy_inputs(unrolled)))["params"]
    flat = jax.tree_util.tree_flatten_with_path(nn.unbox(tree))[0]
    expected = {"/".join(k.key for k in path): tuple(x.shape) for path, x in flat}
    assert hf._expected_shapes(cfg) == expected
