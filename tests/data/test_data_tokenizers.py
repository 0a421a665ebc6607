"""Tokenizers: round trips, special ids, training, loading and their errors."""

import hypothesis
import hypothesis.strategies as st
import pytest
import tokenizers as hf

from flaxformer_lite.data import (
    ByteTokenizer,
    DataError,
    HFTokenizer,
    builtin_documents,
    load_tokenizer,
    train_tokenizer,
)

# Text with combining marks, astral characters, controls and whitespace runs.
_TRICKY = [
    "",
    "a",
    "</s> <extra_id_0> <pad>",
    "héllo wörld",
    "☃ 𝄞 🚀",
    "tab\there\nnew  line",
    "e\u0301",
    "\x00\x7f",
    "  lead",
    "trail  ",
]


@pytest.fixture(scope="module")
def corpus():
    return builtin_documents()[:20]


@pytest.fixture(scope="module")
def bpe(corpus, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bpe")
    train_tokenizer(corpus, kind="bpe", vocab_size=600, out_path=folder, num_sentinels=10)
    return load_tokenizer(folder)


@hypothesis.settings(database=None)
@hypothesis.given(st.text())
def test_byte_round_trip_unicode(text):
    tok = ByteTokenizer()
    assert tok.decode(tok.encode(text)) == text


@hypothesis.settings(database=None)
@hypothesis.given(st.binary())
def test_byte_decode_of_arbitrary_bytes_replaces_invalid_utf8(data):
    tok = ByteTokenizer()
    ids = [b + ByteTokenizer.BYTE_OFFSET for b in data]
    assert tok.decode(ids) == data.decode("utf-8", errors="replace")


def test_byte_layout_and_specials():
    tok = ByteTokenizer(num_sentinels=100)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id) == (0, 1, 2, 3)
    assert tok.vocab_size == 4 + 256 + 100
    assert tok.encode("A") == [ord("A") + 4]
    assert tok.encode("A", bos=True, eos=True) == [1, ord("A") + 4, 2]
    sentinels = [tok.sentinel_id(i) for i in range(100)]
    assert sentinels[0] == tok.vocab_size - 1 and sentinels == sorted(sentinels, reverse=True)
    assert set(sentinels) | {0, 1, 2, 3} == tok.special_ids
    assert tok.decode([1, ord("h") + 4, tok.sentinel_id(3), ord("i") + 4, 2, 0, 10_000]) == "hi"
    with pytest.raises(DataError, match="sentinel 100 out of range"):
        tok.sentinel_id(100)


def test_bpe_train_save_load_round_trip(bpe, tmp_path):
    assert isinstance(bpe, HFTokenizer)
    assert bpe.vocab_size == 600
    assert (bpe.pad_id, bpe.bos_id, bpe.eos_id, bpe.mask_id) == (0, 1, 2, 3)
    assert bpe.num_sentinels == 10
    assert bpe.sentinel_id(0) == bpe.vocab_size - 1
    assert {bpe.sentinel_id(i) for i in range(10)} | {0, 1, 2, 3} == bpe.special_ids
    for text in _TRICKY:
        assert bpe.decode(bpe.encode(text)) == text
    assert len(bpe.encode("the statement")) < len("the statement")  # merges were learned
    assert bpe.special_ids.isdisjoint(bpe.encode("</s><extra_id_0>"))  # quoted, not injected
    ids = bpe.encode("x", bos=True, eos=True)
    assert ids[0] == bpe.bos_id and ids[-1] == bpe.eos_id and bpe.decode(ids) == "x"


@hypothesis.settings(max_examples=50, deadline=None, database=None)
@hypothesis.given(st.text())
def test_bpe_round_trip_any_unicode(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_wordpiece_train_and_load_json_path(corpus, tmp_path):
    path = tmp_path / "wp" / "my_tokenizer.json"
    path.parent.mkdir()
    tok = train_tokenizer(corpus, kind="wordpiece", vocab_size=800, out_path=path, num_sentinels=5)
    loaded = load_tokenizer(path)
    assert (loaded.pad_id, loaded.bos_id, loaded.eos_id, loaded.mask_id) == (0, 1, 2, 3)
    assert loaded.num_sentinels == 5 and loaded.vocab_size == tok.vocab_size
    for text in ["The assert statement is a convenient way to insert debugging assertions.", "x = y + 1"]:
        assert loaded.decode(loaded.encode(text)) == text


def test_train_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match="kind 'sentencepiece' is not one of"):
        train_tokenizer(["a"], kind="sentencepiece", vocab_size=1000, out_path=tmp_path)
    with pytest.raises(DataError, match="vocab_size=300 leaves no room"):
        train_tokenizer(["a"], kind="bpe", vocab_size=300, out_path=tmp_path)


def test_load_tokenizer_byte_and_passthrough():
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    tok = ByteTokenizer(num_sentinels=3)
    assert load_tokenizer(tok) is tok


def test_load_tokenizer_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match=r"nowhere/tokenizer\.json: no such tokenizer file; pass 'byte'"):
        load_tokenizer(tmp_path / "nowhere" / "tokenizer.json")
    with pytest.raises(DataError, match=f"{tmp_path}: folder has no tokenizer.json"):
        load_tokenizer(tmp_path)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(DataError, match=r"broken\.json: cannot load as a HuggingFace tokenizer\.json"):
        load_tokenizer(broken)


def test_missing_special_token_is_a_clear_error(tmp_path):
    # A T5-like vocabulary: pad and eos, no bos and no mask.
    tok = hf.Tokenizer(hf.models.WordLevel({"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3}, unk_token="<unk>"))
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    loaded = load_tokenizer(tmp_path)
    assert loaded.pad_id == 0 and loaded.eos_id == 1
    with pytest.raises(DataError, match=r"tokenizer\.json has no mask token \(looked for <mask>, \[MASK\]"):
        loaded.mask_id
    with pytest.raises(DataError, match="has 0 sentinel tokens"):
        loaded.sentinel_id(0)


def _smol_like(folder):
    """SmolLM2's layout: <|endoftext|> 0, <|im_start|> 1, <|im_end|> 2; no <pad>."""
    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "a": 3, "b": 4, "</s>": 5}
    tok = hf.Tokenizer(hf.models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = hf.pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    return folder


def test_roles_come_from_the_folders_files(tmp_path):
    import json

    folder = _smol_like(tmp_path / "smol")
    guessed = load_tokenizer(folder)  # a bare tokenizer.json: roles from token strings
    assert guessed.eos_id == 5 and guessed.pad_id is None
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>", "special": True}, "pad_token": None}
    ))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    (folder / "config.json").write_text(json.dumps({"eos_token_id": 4, "bos_token_id": 3}))
    tok = load_tokenizer(folder)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, None)  # never "</s>" (5)
    assert tok.eos_ids == (2, 0, 4)  # every stop id the files name, eos_id first
    with pytest.raises(DataError, match="has no mask token .its tokenizer_config.json and config files name none"):
        tok.mask_id
    # Ids only from config.json: taken as they are; what no file names is still guessed.
    (folder / "tokenizer_config.json").unlink()
    (folder / "generation_config.json").unlink()
    tok = load_tokenizer(folder)
    assert (tok.bos_id, tok.eos_id, tok.eos_ids) == (3, 4, (4,))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(DataError, match=r"tokenizer_config.json eos_token '<\|nope\|>' is not in tokenizer.json"):
        load_tokenizer(folder)


def test_sampling_defaults_are_the_generation_configs_keys(tmp_path):
    import json

    from flaxformer_lite.data import sampling_defaults

    assert sampling_defaults(tmp_path) == ({}, {})  # no generation_config.json
    config = tmp_path / "generation_config.json"
    # Qwen2.5-Instruct's settings, and one this library names as not applied.
    config.write_text(json.dumps({"do_sample": True, "repetition_penalty": 1.05, "temperature": 0.7, "top_p": 0.8,
                                  "top_k": 20, "min_p": 0.0, "typical_p": 0.9, "eos_token_id": [2, 0]}))
    assert sampling_defaults(tmp_path) == ({"temperature": 0.7, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.05},
                                           {"typical_p": 0.9})  # min_p 0 is neutral: nothing to name
    config.write_text(json.dumps({"temperature": 1, "top_p": None}))  # ints are floats; null is absent
    applied = sampling_defaults(tmp_path).applied
    assert applied == {"temperature": 1.0} and isinstance(applied["temperature"], float)
    for bad, rule in (({"top_p": 1.5}, r"top_p=1.5 must be in \(0, 1\]"), ({"top_k": 2.5}, "top_k=2.5 must be an integer"),
                      ({"temperature": -1}, "temperature=-1 must be >= 0"),
                      ({"repetition_penalty": 0}, r"repetition_penalty=0 must be > 0 \(1: off\)")):
        config.write_text(json.dumps(bad))
        with pytest.raises(DataError, match=f"generation_config.json: {rule}.*fix it there"):
            sampling_defaults(tmp_path)


def test_bert_roles_are_cls_and_sep(tmp_path):
    import json

    tok = hf.Tokenizer(hf.models.WordLevel({"[PAD]": 0, "[unused0]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4,
                                            "[UNK]": 5}, unk_token="[UNK]"))
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "mask_token": "[MASK]", "unk_token": "[UNK]"}
    ))
    loaded = load_tokenizer(tmp_path)
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.mask_id) == (2, 3, 0, 4)


def test_causal_lm_without_bos_or_pad_tokens(tmp_path):
    """Qwen's files name no bos and no pad: documents are text + eos, padding takes id 0."""
    import json

    import numpy as np

    from flaxformer_lite.data import make_dataset

    folder = _smol_like(tmp_path / "qwen")
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "eos_token": "<|im_end|>"}))
    tok = load_tokenizer(folder)
    texts = ["a b a", "b b a b a b"]
    batch = next(iter(make_dataset("causal_lm", texts, tokenizer=tok, batch_size=2, seq_len=16, train=False)))
    rows = [tok.encode(t) + [tok.eos_id] for t in texts]
    packed = np.concatenate(rows)
    segments = batch["segment_ids"][0]
    np.testing.assert_array_equal(batch["input_ids"][0][segments > 0], packed)
    assert (batch["input_ids"][0][segments == 0] == 0).all() and (batch["weights"][0][segments == 0] == 0).all()
