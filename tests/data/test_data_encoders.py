"""prepare's faster encoder: tiktoken built from a tokenizer.json, token for token HF's ids."""

import numpy as np
import pytest
import tokenizers as hf
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from flaxformer_lite.data import HFTokenizer, PrepareOptions, Store, iter_texts, prepare, train_tokenizer
from flaxformer_lite.data import encoders

# Llama 3's pre-tokenizing pattern (a Split before a ByteLevel without its own regex).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _awkward(rng: np.random.Generator, n: int) -> list[str]:
    """Documents of emoji, CJK, scripts with combining marks, odd spaces and long whitespace runs."""
    pieces = ["hello", "world", "It's", "they'll", "we've", "naïve", "café", "東京都", "日本語のテキスト", "中文",
              "😀", "👩‍👩‍👧", "🇫🇷", "مرحبا", "नमस्ते", "e\u0301", "Ω≈ç√", "\u00a0", "\u3000", "\u200b", "12345",
              "3.14", "   ", "\t\t", "\n", " \n \n", " " * 40, "\t \t" * 7, "\ufffd", "x\ufffd\ufffdy", "--",
              "...", "<s>", "</s>", "<extra_id_0>", "\r\n"]
    return ["".join(rng.choice(pieces, int(rng.integers(1, 30)))) for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Awkward documents in a file, with bytes that are not UTF-8 (replaced when read)."""
    path = tmp_path_factory.mktemp("awkward") / "awkward.jsonl"
    import json

    docs = _awkward(np.random.default_rng(0), 400)
    path.write_bytes(b"".join(json.dumps({"text": d}).encode() + b"\n" for d in docs))
    raw = path.parent / "raw.txt"  # invalid UTF-8: replaced with U+FFFD by prepare
    raw.write_bytes(b"caf\xe9 \xff\xfe bytes\n\n" + "\n\n".join(docs[:50]).encode() + b"\n\xc3(\n")
    return path.parent


def _train_llama_style(texts: list[str], path) -> HFTokenizer:
    tok = hf.Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(hf.Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=700, special_tokens=["<|begin_of_text|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    tok.save(str(path))
    return HFTokenizer.from_file(path)


@pytest.mark.parametrize("kind", ["gpt2", "llama3"])
def test_tiktoken_gives_hf_ids_on_awkward_text(kind, corpus, tmp_path):
    texts = list(iter_texts(corpus, errors="replace"))
    assert any("\ufffd" in t for t in texts) and any(" " * 40 in t for t in texts)
    if kind == "gpt2":
        tok = train_tokenizer(texts, vocab_size=700, out_path=tmp_path / "tok.json", num_sentinels=5)
    else:
        tok = _train_llama_style(texts, tmp_path / "tok.json")
    reason, _, _ = encoders.tiktoken_reason(tok)
    assert reason is None
    encode, note = encoders.batch_encoder(tok)
    assert isinstance(encode, encoders.TiktokenEncoder) and note is None
    fresh = texts + _awkward(np.random.default_rng(1), 300)  # text the tokenizer did not learn from
    ours, theirs = encode(fresh), tok.encode_batch(fresh)
    assert sum(len(i) for i in ours) > len(fresh)
    for text, a, b in zip(fresh, ours, theirs):
        assert a.dtype == np.int32 and a.tolist() == b.tolist(), text


def test_tokenizers_tiktoken_cannot_match_are_named(tmp_path):
    texts = _awkward(np.random.default_rng(2), 100)
    wordpiece = train_tokenizer(texts, kind="wordpiece", vocab_size=300, out_path=tmp_path / "wp.json",
                                num_sentinels=0)
    assert encoders.tiktoken_reason(wordpiece)[0] == "its model is WordPiece, not BPE"
    encode, note = encoders.batch_encoder(wordpiece)
    assert encode == wordpiece.encode_batch and "encoded by HF tokenizers: tiktoken would differ (its model" in note
    normalized = hf.Tokenizer(models.BPE())
    normalized.normalizer = normalizers.NFKC()
    normalized.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    normalized.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    assert encoders.tiktoken_reason(HFTokenizer(normalized))[0] == "it has a normalizer (NFKC)"


@pytest.mark.filterwarnings("ignore:.*invalid UTF-8 sequences were replaced")
def test_prepare_with_tiktoken_stores_hf_ids_and_redoes_a_source_where_they_differ(corpus, tmp_path, monkeypatch,
                                                                                    capfd):
    texts = list(iter_texts(corpus, errors="replace"))
    tok = train_tokenizer(texts, vocab_size=700, out_path=tmp_path / "tok.json", num_sentinels=5)
    options = PrepareOptions(tokenizer=tok.name, val_fraction=0.0)

    def stored(out):
        docs = Store.open(out).documents("all")
        return [docs.tokens(i).tolist() for i in range(len(docs))]

    expected = [ids.tolist() for ids in tok.encode_batch(texts)]
    assert stored(prepare(corpus, tmp_path / "fast", options, progress=False)) == expected
    real = encoders.batch_encoder

    def off_by_one_later(t):  # right on the first batch, wrong from the CHECK_EVERY-th
        encode, calls = real(t)[0], []

        def wrong(batch):
            calls.append(1)
            ids = encode(batch)
            return ids if len(calls) == 1 else [i + 1 for i in ids]

        return wrong, None

    monkeypatch.setattr(encoders, "batch_encoder", off_by_one_later)
    monkeypatch.setattr("flaxformer_lite.data.preparation.BATCH_DOCUMENTS", 8)
    monkeypatch.setattr("flaxformer_lite.data.preparation.CHECK_EVERY", 3)
    assert stored(prepare(corpus, tmp_path / "redone", options, progress=False)) == expected
    assert "tiktoken and HF tokenizers differ on" in capfd.readouterr().err
