"""Sentence embeddings: ffl.embed and `flaxformer-lite embed` against sentence-transformers
on a tiny random BERT saved locally in the sentence-transformers folder layout."""

import json
import os
import pathlib
import shutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download; set before HF imports

import huggingface_hub
import jax
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from tokenizers import models, normalizers, pre_tokenizers, processors

import flaxformer_lite as ffl
from flaxformer_lite.cli import main
from flaxformer_lite.inference.embeddings import pool

TEXTS = ["The cat sat on the mat", "a red dog ran fast", "blue", "the slow cat ran"]
WORDS = "the a cat dog sat on mat ran fast slow red blue".split()
MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
]
NORMALIZE = {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """HF offline mode, also where huggingface_hub was imported before this module."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sys.modules[huggingface_hub.is_offline_mode.__module__], "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A random BertModel (with pooler, as sentence-transformers saves it) and a WordPiece
    tokenizer.json with [CLS] ... [SEP] post-processing, written with transformers."""
    path = tmp_path_factory.mktemp("bert")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {t: i for i, t in enumerate([*specials, *WORDS, *("##" + w[-2:] for w in WORDS)])}
    tok = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    ).save_pretrained(path)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    transformers.BertModel(config).eval().save_pretrained(path)
    return path


def st_folder(bert_dir, dest, pooling_config, normalize):
    """bert_dir in the sentence-transformers layout: modules.json, Pooling config, Normalize."""
    shutil.copytree(bert_dir, dest)
    (dest / "modules.json").write_text(json.dumps(MODULES + ([NORMALIZE] if normalize else [])))
    (dest / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 16, "do_lower_case": False}))
    (dest / "1_Pooling").mkdir()
    (dest / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **pooling_config}))
    if normalize:
        (dest / "2_Normalize").mkdir()
    return dest


@pytest.mark.parametrize(
    "pooling_config, normalize",
    [
        ({"pooling_mode_mean_tokens": True}, True),  # the all-MiniLM layout, older flag spelling
        ({"pooling_mode": "cls"}, False),  # sentence-transformers 6 spelling
        ({"pooling_mode": "max"}, True),
    ],
    ids=["mean", "cls", "max"],
)
def test_embed_command_matches_sentence_transformers(bert_dir, tmp_path, capsys, pooling_config, normalize):
    from sentence_transformers import SentenceTransformer

    folder = st_folder(bert_dir, tmp_path / "st", pooling_config, normalize)
    expected = SentenceTransformer(str(folder), device="cpu").encode(TEXTS, convert_to_numpy=True)
    argv = ["embed", "--hf", str(folder)]
    for text in TEXTS:
        argv += ["--text", text]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["pooling"] == (pooling_config.get("pooling_mode") or "mean")
    assert result["normalize"] is normalize and result["dim"] == 32
    assert [e["text"] for e in result["embeddings"]] == TEXTS
    got = np.array([e["embedding"] for e in result["embeddings"]])
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    if normalize:
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_embed_on_a_padded_batch_equals_one_row_at_a_time(bert_dir):
    cfg, params = ffl.hf.load(bert_dir)
    model = ffl.build_model(cfg)
    tok = tokenizers.Tokenizer.from_file(str(bert_dir / "tokenizer.json"))
    rows = [tok.encode(t).ids for t in TEXTS]
    width = max(map(len, rows))
    # Left-pad half the rows and right-pad the others: pooling must only see real tokens,
    # and positions must count real tokens only.
    ids = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), bool)
    for b, r in enumerate(rows):
        cols = slice(width - len(r), width) if b % 2 else slice(0, len(r))
        ids[b, cols], mask[b, cols] = r, True
    apply = jax.jit(model.apply)
    alone = [apply(params, np.asarray([r], np.int32)).hidden_states for r in rows]
    for pooling in ("mean", "cls", "max"):
        expected = np.concatenate([np.asarray(pool(h, np.ones(h.shape[:2], bool), pooling)) for h in alone])
        np.testing.assert_allclose(np.asarray(ffl.embed(model, params, ids, mask, pooling=pooling)), expected,
                                   atol=1e-5)


def test_pool_matches_a_numpy_reference():
    rng = np.random.default_rng(0)
    h = rng.normal(size=(3, 5, 4))
    mask = np.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], bool)
    real = [h[b][mask[b]] for b in range(3)]
    refs = {
        "mean": np.stack([r.mean(0) for r in real]),
        "max": np.stack([r.max(0) for r in real]),
        "cls": np.stack([r[0] for r in real]),
    }
    for pooling, ref in refs.items():
        np.testing.assert_allclose(np.asarray(pool(jax.numpy.asarray(h), mask, pooling, normalize=False)),
                                   ref, rtol=1e-5, atol=1e-6)
        unit = np.asarray(pool(jax.numpy.asarray(h), mask, pooling, normalize=True))
        np.testing.assert_allclose(unit, ref / np.linalg.norm(ref, axis=1, keepdims=True), rtol=1e-5, atol=1e-6)


def test_embed_rejects_decoders_and_unknown_poolings():
    cfg = ffl.load_config("gpt_tiny", overrides=["model.num_layers=1", "model.d_model=32"]).model
    model = ffl.build_model(cfg)
    with pytest.raises(ValueError, match="embed needs an encoder.*model.family='decoder'"):
        ffl.embed(model, None, [[1, 2]])
    enc = ffl.load_config("bert_tiny", overrides=["model.num_layers=1"]).model
    with pytest.raises(ValueError, match="unknown pooling='sum'; use one of mean, cls, max"):
        ffl.embed(ffl.build_model(enc), None, [[1, 2]], pooling="sum")


def test_embed_command_names_an_unsupported_module(bert_dir, tmp_path, capsys):
    folder = st_folder(bert_dir, tmp_path / "st", {"pooling_mode": "mean"}, normalize=False)
    dense = {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}
    (folder / "modules.json").write_text(json.dumps(MODULES + [dense]))
    assert main(["embed", "--hf", str(folder), "--text", "a cat"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "modules.json" in err and "sentence_transformers.models.Dense" in err and "2_Dense" in err


def test_embed_command_on_a_plain_hf_folder_takes_the_flags_and_normalizes(bert_dir, capsys):
    assert main(["embed", "--hf", str(pathlib.Path(bert_dir)), "--text", "a cat", "--pooling", "max"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["pooling"] == "max" and result["normalize"] is True
    assert abs(np.linalg.norm(result["embeddings"][0]["embedding"]) - 1) < 1e-5


def test_encoder_decoder_models_embed_with_their_encoder():
    cfg = ffl.load_config("t5_tiny", overrides=["model.num_layers=1"]).model
    model, params = ffl.build_model(cfg), jax.jit(ffl.init_params, static_argnums=0)(cfg, jax.random.key(0))
    ids = np.random.default_rng(0).integers(3, cfg.vocab_size, (2, 6)).astype(np.int32)
    mask = np.array([[1] * 6, [1] * 4 + [0] * 2], bool)
    encode = jax.jit(lambda p, i, m: model.apply(p, i, attention_mask=m, method="encode").hidden_states)
    hidden = np.asarray(encode(params, ids, mask), np.float64)
    expected = np.stack([hidden[b][mask[b]].mean(0) for b in range(2)])
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(ffl.embed(model, params, ids, mask)), expected, rtol=1e-5, atol=1e-6)
