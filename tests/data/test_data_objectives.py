"""Objectives: the batch contract, BERT masking statistics, span corruption invariants."""

from collections import Counter

import numpy as np
import pytest
import tokenizers as hf

from flaxformer_lite.data import (
    OBJECTIVES,
    ByteTokenizer,
    DataError,
    HFTokenizer,
    builtin_classification,
    causal_lm_batch,
    load_corpus,
    load_texts,
    make_dataset,
    mask_tokens,
    random_spans_noise_mask,
    span_corruption,
    span_corruption_lengths,
    train_tokenizer,
)
from flaxformer_lite.data.finetune import Record
from flaxformer_lite.data.objectives import _noise_counts

TOK = ByteTokenizer()
INT, FLOAT = np.int32, np.float32
ENCODER_KEYS = {"input_ids": INT, "segment_ids": INT, "positions": INT}
LM_KEYS = {**ENCODER_KEYS, "labels": INT, "weights": FLOAT}
SEQ2SEQ_KEYS = {
    **ENCODER_KEYS,
    "decoder_input_ids": INT,
    "labels": INT,
    "weights": FLOAT,
    "decoder_segment_ids": INT,
    "decoder_positions": INT,
}
CONTRACT = {
    "causal_lm": LM_KEYS,
    "masked_lm": LM_KEYS,
    "span_corruption": SEQ2SEQ_KEYS,
    "seq2seq": SEQ2SEQ_KEYS,
    "copy": SEQ2SEQ_KEYS,
    "reverse": SEQ2SEQ_KEYS,
    "classification": {**ENCODER_KEYS, "label": INT},
    "sft": LM_KEYS,
    "dpo": {f"{side}_{k}": v for side in ("chosen", "rejected") for k, v in LM_KEYS.items()},
    "grpo": {"prompt_ids": INT, "prompt_lengths": INT, "example": INT},
}
PAIRS = [(f"question {i}", f"answer number {i}") for i in range(40)]


def _data(objective):
    if objective == "seq2seq":
        return PAIRS
    if objective == "classification":
        return builtin_classification(max_words=8).examples[:64]
    if objective in ("copy", "reverse"):
        return None
    if objective == "sft":
        return [Record(f"mem:{i}", {"prompt": q, "completion": a}) for i, (q, a) in enumerate(PAIRS)]
    if objective == "dpo":
        return [Record(f"mem:{i}", {"prompt": q, "chosen": a, "rejected": q}) for i, (q, a) in enumerate(PAIRS)]
    if objective == "grpo":
        return [Record(f"mem:{i}", {"prompt": q, "answer": a}) for i, (q, a) in enumerate(PAIRS)]
    return load_texts()[:60]


def _batches(objective, n=3, **kwargs):
    kwargs = {"tokenizer": TOK, "batch_size": 4, "seq_len": 64, "seed": 0, "max_new_tokens": 16, **kwargs}
    it = iter(make_dataset(objective, _data(objective), **kwargs))
    return [next(it) for _ in range(n)]


def _segment(row, segment_ids, s):
    return row[segment_ids == s]


@pytest.mark.filterwarnings("ignore:classification texts. truncated")
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_batch_contract_keys_shapes_dtypes(objective):
    b = _batches(objective, n=1, target_len=None if objective == "span_corruption" else 24)[0]
    assert {k: v.dtype for k, v in b.items()} == CONTRACT[objective]
    decoder_keys = {"decoder_input_ids", "labels", "weights", "decoder_segment_ids", "decoder_positions"}
    seq2seq = "decoder_input_ids" in b
    if objective == "span_corruption":
        assert b["labels"].shape[1] == span_corruption_lengths(64, 0.15, 3.0)[1]
    for k, v in b.items():
        if k in ("label", "prompt_lengths", "example"):
            assert v.shape == (4,)
        elif seq2seq and k in decoder_keys:
            assert v.shape == (4, b["labels"].shape[1]) and (
                objective == "span_corruption" or v.shape[1] == 24
            )
        else:
            assert v.shape == (4, 64)


def test_grpo_rows_are_the_prompts_and_point_at_their_records():
    b = _batches("grpo", n=1)[0]
    for ids, n, example in zip(b["prompt_ids"], b["prompt_lengths"], b["example"]):
        assert TOK.decode(ids[1:n].tolist()) == PAIRS[example][0] and ids[0] == TOK.bos_id and not ids[n:].any()
    long = [Record("mem:7", {"prompt": "x" * 60})]
    with pytest.raises(DataError, match=r"mem:7: the prompt has 61 tokens and a row holds 48 .*data.max_new_tokens=16"):
        next(iter(make_dataset("grpo", long, tokenizer=TOK, batch_size=1, seq_len=64, max_new_tokens=16)))


def test_load_corpus_dispatches_by_objective():
    assert load_corpus("causal_lm") == load_texts()
    assert load_corpus("masked_lm", document_unit="file") == load_texts(unit="file")
    assert load_corpus("classification") == builtin_classification()
    assert load_corpus("copy") is None
    with pytest.raises(DataError, match="objective 'gpt' is not one of causal_lm"):
        load_corpus("gpt")
    with pytest.raises(DataError, match="masked_lm needs data"):
        make_dataset("masked_lm", None, tokenizer=TOK, batch_size=2, seq_len=8)


# ------------------------------------------------------------------------------- causal LM


def test_causal_lm_labels_are_next_tokens_within_segments():
    rows = {
        "tokens": np.array([[1, 5, 6, 2, 1, 7, 2, 0]]),
        "tokens_segment_ids": np.array([[1, 1, 1, 1, 2, 2, 2, 0]]),
        "tokens_positions": np.array([[0, 1, 2, 3, 0, 1, 2, 0]]),
    }
    b = causal_lm_batch(rows, pad_id=0)
    np.testing.assert_array_equal(b["labels"], [[5, 6, 2, 0, 7, 2, 0, 0]])
    np.testing.assert_array_equal(b["weights"], [[1, 1, 1, 0, 1, 1, 0, 0]])


def test_causal_lm_makes_every_prediction_of_long_documents_exactly_once():
    docs = ["a" * 50 + "b" * 47, "short one", "x" * 17]  # longer than seq_len: split
    ds = make_dataset("causal_lm", docs, tokenizer=TOK, batch_size=2, seq_len=16, train=False)
    predictions = Counter()
    for b in ds:
        w = b["weights"] > 0
        predictions.update(zip(b["input_ids"][w].tolist(), b["labels"][w].tolist()))
        assert (b["input_ids"][b["segment_ids"] == 0] == TOK.pad_id).all()
    expected = Counter()
    for d in docs:
        ids = TOK.encode(d, bos=True, eos=True)
        expected.update(zip(ids[:-1], ids[1:]))
    assert predictions == expected


@pytest.mark.parametrize("objective", ["causal_lm", "masked_lm"])
def test_training_windows_shift_every_epoch_and_stay_inside_documents(objective):
    rng = np.random.default_rng(3)
    text = "".join(chr(c) for c in rng.integers(ord("a"), ord("z") + 1, 300))
    as_text = lambda ids: "".join(map(chr, ids))  # noqa: E731
    doc = as_text(TOK.encode(text, bos=True, eos=True))

    def windows(**kw):  # one row a batch, one window a row: about 40 rows in 4 epochs
        it = iter(make_dataset(objective, [text], tokenizer=TOK, batch_size=1, seq_len=32, pack=False, **kw))
        out = []
        for b in (next(it) for _ in range(40)):
            real = b["segment_ids"][0] > 0
            ids = b["input_ids"][0][real]
            if objective == "masked_lm":  # undo the masking; drop the added bos and eos
                ids = np.where(b["weights"][0] > 0, b["labels"][0], b["input_ids"][0])[real][1:-1]
                assert len(ids) == 30
            out.append(as_text(ids))
        return out

    shifted, fixed = windows(), windows(shift_windows=False)
    assert all(w in doc for w in shifted + fixed)
    assert len(set(fixed)) <= 11  # the same cuts every epoch
    assert len(set(shifted)) > 30  # new cuts every epoch


# ------------------------------------------------------------------------------- masked LM


def test_bert_masking_statistics():
    rng = np.random.default_rng(0)
    ids = rng.integers(TOK.BYTE_OFFSET, TOK.BYTE_OFFSET + 256, size=400_000).astype(np.int32)
    ids[::10] = TOK.eos_id  # specials must never be picked
    specials = np.asarray(sorted(TOK.special_ids))
    regular = np.arange(TOK.BYTE_OFFSET, TOK.BYTE_OFFSET + 256)
    inputs, labels, weights = mask_tokens(
        ids,
        rng,
        mask_probability=0.15,
        mask_id=TOK.mask_id,
        pad_id=0,
        special_ids=specials,
        random_ids=regular,
    )
    picked = weights > 0
    assert not picked[::10].any()
    assert abs(picked[ids != TOK.eos_id].mean() - 0.15) < 0.003
    np.testing.assert_array_equal(labels[picked], ids[picked])
    assert (labels[~picked] == 0).all() and (inputs[~picked] == ids[~picked]).all()
    masked = (inputs[picked] == TOK.mask_id).mean()
    kept = (inputs[picked] == ids[picked]).mean()
    replaced = 1 - masked - kept
    assert abs(masked - 0.8) < 0.01
    # A random replacement equals the original 1/256 of the time; it then counts as kept.
    assert abs(kept - (0.1 + 0.1 / 256)) < 0.007
    assert abs(replaced - (0.1 - 0.1 / 256)) < 0.007
    assert np.isin(inputs[picked & (inputs != TOK.mask_id)], regular).all()


def test_masked_lm_batches_never_pick_specials_and_label_originals():
    for b in _batches("masked_lm", n=4, mask_probability=0.3):
        w = b["weights"] > 0
        assert w.any()
        assert not np.isin(b["labels"][w], sorted(TOK.special_ids)).any()
        changed = w & (b["input_ids"] != b["labels"])
        assert (
            changed.any()
            and not np.isin(b["input_ids"][changed], sorted(TOK.special_ids - {TOK.mask_id})).any()
        )
        assert (b["input_ids"][~w] != TOK.mask_id).all()
        assert (b["segment_ids"][w] > 0).all()
        for ids, seg in zip(b["input_ids"], b["segment_ids"]):
            for s in range(1, seg.max() + 1):
                piece = _segment(ids, seg, s)
                assert piece[0] == TOK.bos_id and piece[-1] == TOK.eos_id  # [CLS] ... [SEP]


@pytest.mark.parametrize("objective", ["masked_lm", "span_corruption"])
def test_trained_hf_tokenizer_end_to_end(objective, tmp_path):
    texts = load_texts()[:300]
    tok = train_tokenizer(texts, kind="bpe", vocab_size=500, out_path=tmp_path, num_sentinels=40)
    special = sorted(tok.special_ids)
    for b in _batches(objective, n=2, tokenizer=tok, seq_len=128):
        assert b["input_ids"].max() < tok.vocab_size
        if objective == "masked_lm":
            assert (b["input_ids"] == tok.mask_id).any()
            assert not np.isin(b["labels"][b["weights"] > 0], special).any()
        else:
            assert (b["labels"][:, 0] == tok.sentinel_id(0)).all()
            assert np.isin(b["input_ids"], [tok.sentinel_id(i) for i in range(40)]).any()
    with pytest.raises(DataError, match=r"token id 4\d\d is outside \[0, vocab_size=400\)"):
        next(
            iter(make_dataset(objective, texts[:50], tokenizer=tok, batch_size=2, seq_len=64, vocab_size=400))
        )


def test_masked_lm_needs_a_mask_token(tmp_path):
    tok = hf.Tokenizer(
        hf.models.WordLevel({"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "a": 4}, unk_token="<unk>")
    )
    tok.pre_tokenizer = hf.pre_tokenizers.Whitespace()
    with pytest.raises(DataError, match="has no mask token"):
        make_dataset("masked_lm", ["a a a"], tokenizer=HFTokenizer(tok), batch_size=1, seq_len=8)


# ------------------------------------------------------------------------- span corruption


def test_span_corruption_lengths_match_t5():
    assert span_corruption_lengths(512, 0.15, 3.0) == (568, 114)
    raw, target_len = span_corruption_lengths(64, 0.15, 3.0)
    for n in range(2, raw + 1):
        noise, spans = _noise_counts(n, 0.15, 3.0)
        assert n - noise + spans + 1 <= 64 and noise + spans + 1 <= target_len
    shorter_raw, shorter = span_corruption_lengths(64, 0.15, 3.0, target_len=10)
    assert shorter == 10 and shorter_raw < raw


@pytest.mark.parametrize("length", [2, 3, 7, 50, 568])
def test_span_corruption_reconstructs_the_original(length):
    rng = np.random.default_rng(length)
    sentinels = np.arange(999, 899, -1)
    for _ in range(20):
        ids = rng.integers(4, 260, size=length).astype(np.int32)
        inputs, targets = span_corruption(
            ids, rng, noise_density=0.15, mean_noise_span_length=3.0, sentinel_ids=sentinels, eos_id=2
        )
        assert inputs[-1] == 2 and targets[-1] == 2
        in_body, tgt_body = inputs[:-1].tolist(), targets[:-1].tolist()
        used = [t for t in in_body if t in set(sentinels.tolist())]
        assert used == sentinels[: len(used)].tolist() and len(used) >= 1  # in order, no gaps
        assert [t for t in tgt_body if t >= 899] == used  # targets start with sentinel 0
        assert tgt_body[0] == sentinels[0]
        # Put each span back in place of its sentinel.
        spans, current = {}, None
        for t in tgt_body:
            if t in used:
                current = t
                spans[current] = []
            else:
                spans[current].append(t)
        rebuilt = [x for t in in_body for x in (spans[t] if t in spans else [t])]
        assert rebuilt == ids.tolist()


def test_noise_mask_density_and_span_length():
    rng = np.random.default_rng(0)
    masks = [random_spans_noise_mask(568, 0.15, 3.0, rng) for _ in range(200)]
    assert all(not m[0] for m in masks)  # starts clean, as in T5
    density = np.mean([m.mean() for m in masks])
    spans = sum(int((m[1:] & ~m[:-1]).sum()) for m in masks)
    assert abs(density - 85 / 568) < 1e-9  # round(568 * 0.15) noise tokens, exactly
    assert abs(sum(m.sum() for m in masks) / spans - 3.0) < 0.1


def test_span_corruption_batches():
    for b in _batches("span_corruption", n=3):
        enc_seg, dec_seg = b["segment_ids"], b["decoder_segment_ids"]
        assert enc_seg.max(axis=1).tolist() == dec_seg.max(axis=1).tolist()  # same examples
        for row in range(4):
            for s in range(1, dec_seg[row].max() + 1):
                labels = _segment(b["labels"][row], dec_seg[row], s)
                dec_in = _segment(b["decoder_input_ids"][row], dec_seg[row], s)
                inputs = _segment(b["input_ids"][row], enc_seg[row], s)
                assert labels[0] == TOK.sentinel_id(0) and labels[-1] == TOK.eos_id
                assert dec_in[0] == TOK.pad_id and (dec_in[1:] == labels[:-1]).all()
                assert inputs[-1] == TOK.eos_id and TOK.sentinel_id(0) in inputs
        assert (b["weights"] == (dec_seg > 0)).all()


def test_bad_objective_options_are_named():
    with pytest.raises(DataError, match=r"noise_density=1.0 must be in \(0, 1\)"):
        span_corruption_lengths(64, 1.0, 3.0)
    with pytest.raises(DataError, match=r"mask_probability=0.0 must be in \(0, 1\)"):
        _batches("masked_lm", mask_probability=0.0)


def test_span_corruption_needs_enough_sentinels():
    with pytest.raises(DataError, match="makes up to 22 noise spans but the tokenizer has 5 sentinels"):
        make_dataset(
            "span_corruption",
            ["x" * 500],
            tokenizer=ByteTokenizer(num_sentinels=5),
            batch_size=1,
            seq_len=400,
        )


# ----------------------------------------------------------------- seq2seq, copy, reverse


def test_seq2seq_pairs_end_with_eos_and_shift_right():
    ds = make_dataset("seq2seq", PAIRS, tokenizer=TOK, batch_size=4, seq_len=32, target_len=24, train=False)
    found = set()
    for b in ds:
        for row in range(4):
            for s in range(1, b["decoder_segment_ids"][row].max() + 1):
                src = _segment(b["input_ids"][row], b["segment_ids"][row], s)
                tgt = _segment(b["labels"][row], b["decoder_segment_ids"][row], s)
                dec_in = _segment(b["decoder_input_ids"][row], b["decoder_segment_ids"][row], s)
                assert src[-1] == tgt[-1] == TOK.eos_id
                assert dec_in.tolist() == [TOK.pad_id] + tgt[:-1].tolist()
                found.add((TOK.decode(src), TOK.decode(tgt)))
    assert found == set(PAIRS)


def test_seq2seq_truncation_is_counted():
    pairs = [("s" * 40, "t"), ("s", "t" * 40), ("s", "t")]
    with pytest.warns(UserWarning) as record:
        ds = make_dataset("seq2seq", pairs, tokenizer=TOK, batch_size=3, seq_len=16, train=False, pack=False)
    assert {str(r.message) for r in record} == {
        "seq2seq sources: truncated 1 of 3 sequences longer than 15 tokens",
        "seq2seq targets: truncated 1 of 3 sequences longer than 15 tokens",
    }
    b = next(iter(ds))
    assert b["input_ids"][0].tolist() == TOK.encode("s" * 15, eos=True)
    assert b["labels"][1].tolist() == TOK.encode("t" * 15, eos=True)


@pytest.mark.parametrize("objective", ["copy", "reverse"])
def test_copy_and_reverse_targets(objective):
    symbols = set(range(TOK.BYTE_OFFSET, TOK.BYTE_OFFSET + 32))
    for b in _batches(objective, n=2, seq_len=20, synthetic_vocab=32):
        for row in range(4):
            for s in range(1, b["segment_ids"][row].max() + 1):
                src = _segment(b["input_ids"][row], b["segment_ids"][row], s).tolist()
                tgt = _segment(b["labels"][row], b["decoder_segment_ids"][row], s).tolist()
                assert src[-1] == tgt[-1] == TOK.eos_id and set(src[:-1]) <= symbols
                assert tgt[:-1] == (src[:-1] if objective == "copy" else src[-2::-1])


def test_synthetic_eval_set_differs_from_training_start():
    train = _batches("copy", n=1, seq_len=20, pack=False, train=True)[0]
    evaluation = _batches("copy", n=1, seq_len=20, pack=False, train=False)[0]
    assert not np.array_equal(train["input_ids"], evaluation["input_ids"])


# -------------------------------------------------------------------------- classification


def test_classification_rows_and_padded_last_eval_batch():
    examples = [("good", 1), ("bad", 0), ("fine", 1), ("meh", 0), ("great", 1)]
    batches = list(
        make_dataset("classification", examples, tokenizer=TOK, batch_size=4, seq_len=8, train=False)
    )
    assert len(batches) == 2
    first, last = batches
    assert first["label"].tolist() == [1, 0, 1, 0]
    assert TOK.decode(first["input_ids"][0]) == "good"
    assert first["input_ids"][0, 0] == TOK.bos_id and first["input_ids"][0, 5] == TOK.eos_id
    assert first["segment_ids"][0].tolist() == [1] * 6 + [0] * 2
    assert first["positions"][0].tolist() == [0, 1, 2, 3, 4, 5, 0, 0]
    assert last["label"].tolist() == [1, 0, 0, 0] and (last["segment_ids"][1:] == 0).all()
