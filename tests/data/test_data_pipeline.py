"""Pipelines: packing, padding, epochs, sharding, id checks and resuming iterators."""

import itertools
import json
from collections import Counter

import numpy as np
import pytest

from flaxformer_lite.data import (
    ByteTokenizer,
    DataError,
    build,
    builtin_classification,
    check_ids,
    load_texts,
    make_dataset,
    shard,
)
from flaxformer_lite.data.pipeline import check_batch_ids, truncate

T = 16


def _docs(n=60, seed=0):
    """Token sequences of length 1..T, ids 1..99 (0 is padding)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 100, size=int(rng.integers(1, T + 1))).astype(np.int32) for _ in range(n)]


def _identity(doc, rng):
    del rng
    return {"tokens": doc}


def _dataset(examples, *, pack, train=False, batch_size=4, seed=0):
    """Batches of raw rows (no objective): tokens, tokens_segment_ids, tokens_positions."""
    return build(
        examples,
        features=_identity,
        lengths={"tokens": T},
        finalize=lambda b: b,
        batch_size=batch_size,
        vocab_size=100,
        seed=seed,
        train=train,
        pack=pack,
    )


def _segments(batches):
    """Every segment of every row, as a tuple of tokens."""
    out = []
    for b in batches:
        for ids, seg in zip(b["tokens"], b["tokens_segment_ids"]):
            out.extend(tuple(ids[seg == s]) for s in range(1, seg.max() + 1))
    return out


@pytest.mark.parametrize("pack", [True, False])
def test_rows_have_consistent_segments_and_positions(pack):
    docs = _docs()
    batches = list(_dataset(docs, pack=pack))
    for b in batches:
        ids, seg, pos = b["tokens"], b["tokens_segment_ids"], b["tokens_positions"]
        assert ids.shape == seg.shape == pos.shape == (4, T)
        for row_ids, row_seg, row_pos in zip(ids, seg, pos):
            used = row_seg > 0
            # Segments 1..k, contiguous, then padding to the end.
            n = used.sum()
            assert used[:n].all() and not used[n:].any()
            assert (np.diff(row_seg[:n]) >= 0).all() and (np.diff(row_seg[:n]) <= 1).all()
            if n:
                assert row_seg[0] == 1
            for s in range(1, row_seg.max() + 1):
                assert (row_pos[row_seg == s] == np.arange((row_seg == s).sum())).all()
            assert (row_ids[~used] == 0).all() and (row_pos[~used] == 0).all()
    # No token lost or duplicated: the segments are exactly the documents.
    assert Counter(_segments(batches)) == Counter(tuple(d) for d in docs)
    if pack:  # several documents share rows
        assert sum(len(b["tokens"]) for b in batches) < len(docs)


def test_eval_last_batch_is_padded_with_empty_rows():
    batches = list(_dataset(_docs(n=7), pack=False, batch_size=4))
    assert [len(b["tokens"]) for b in batches] == [4, 4]
    assert (batches[-1]["tokens_segment_ids"][3] == 0).all()


def test_training_is_endless_and_reshuffles_each_epoch():
    items = [np.array([i + 1], np.int32) for i in range(10)]
    it = iter(_dataset(items, pack=False, train=True, batch_size=1, seed=3))
    seen = [int(next(it)["tokens"][0, 0]) for _ in range(30)]
    epochs = [seen[0:10], seen[10:20], seen[20:30]]
    for epoch in epochs:
        assert sorted(epoch) == list(range(1, 11))
    assert epochs[0] != epochs[1] != epochs[2]
    it_again = iter(_dataset(items, pack=False, train=True, batch_size=1, seed=3))
    assert [int(next(it_again)["tokens"][0, 0]) for _ in range(30)] == seen
    other_seed = iter(_dataset(items, pack=False, train=True, batch_size=1, seed=4))
    assert [int(next(other_seed)["tokens"][0, 0]) for _ in range(10)] != seen[:10]


def test_shards_are_disjoint_and_cover_everything():
    items = list(range(10))
    parts = [shard(items, i, 3) for i in range(3)]
    assert sorted(x for p in parts for x in p) == items
    assert shard(range(1_000_000), 1, 4)[:2] == range(1, 9, 4)  # stays lazy
    with pytest.raises(DataError, match=r"shard_index=3 must be in \[0, shard_count=3\)"):
        shard(items, 3, 3)
    with pytest.raises(DataError, match="shard 2 of 3 is empty: the corpus has only 2 examples"):
        shard([1, 2], 2, 3)


def test_sharded_datasets_see_disjoint_documents():
    docs = [f"document number {i}" for i in range(12)]
    tok = ByteTokenizer()
    seen = []
    for index in range(3):
        ds = make_dataset(
            "causal_lm",
            docs,
            tokenizer=tok,
            batch_size=4,
            seq_len=64,
            train=False,
            shard_index=index,
            shard_count=3,
        )
        segments = _segments({"tokens": b["input_ids"], "tokens_segment_ids": b["segment_ids"]} for b in ds)
        seen.append({tok.decode(s) for s in segments})
    assert set.union(*seen) == set(docs)
    assert sum(len(s) for s in seen) == len(docs)


def test_ids_at_or_above_vocab_size_are_rejected():
    with pytest.raises(DataError, match=r"token id 7 is outside \[0, vocab_size=7\)"):
        check_ids(np.array([1, 7, 3]), 7, "here")
    with pytest.raises(DataError, match=r"token id -1 is outside"):
        check_ids(np.array([-1, 2]), 7, "here")
    with pytest.raises(DataError, match=r"batch\['labels'\]: token id 500 is outside \[0, vocab_size=300\)"):
        check_batch_ids({"input_ids": np.zeros((2, 3), np.int32), "labels": np.full((2, 3), 500)}, 300)
    # Bytes of "hello" are ids 108..115 under ByteTokenizer: a 100-row embedding cannot hold them.
    with pytest.raises(
        DataError, match=r"document 0 \('hello'...\): token id 1\d\d is outside \[0, vocab_size=100\)"
    ):
        make_dataset(
            "causal_lm", ["hello"], tokenizer=ByteTokenizer(), batch_size=1, seq_len=8, vocab_size=100
        )
    # The text fits in 300 ids but ByteTokenizer's sentinels (259..359) do not: caught per batch.
    ds = make_dataset(
        "span_corruption",
        ["hello world"] * 8,
        tokenizer=ByteTokenizer(),
        batch_size=2,
        seq_len=32,
        vocab_size=300,
    )
    with pytest.raises(
        DataError, match=r"batch\['input_ids'\]: token id 359 is outside \[0, vocab_size=300\)"
    ):
        next(iter(ds))


def test_truncation_warns_with_a_count():
    with pytest.warns(UserWarning, match="things: truncated 2 of 3 sequences longer than 2 tokens"):
        assert truncate([[1, 2, 3], [1], [1, 2, 3, 4]], 2, "things") == [[1, 2], [1], [1, 2]]


_RESUME_CASES = {
    "causal_lm": dict(seq_len=32),
    "masked_lm": dict(seq_len=32),
    "span_corruption": dict(seq_len=32),
    "classification": dict(seq_len=32),
    "copy": dict(seq_len=12),
}


@pytest.mark.filterwarnings("ignore:classification texts. truncated")
@pytest.mark.parametrize("objective", sorted(_RESUME_CASES))
@pytest.mark.parametrize("train", [True, False])
def test_resumed_iterator_yields_the_same_next_batches(objective, train):
    data = builtin_classification().examples[:200] if objective == "classification" else load_texts()[:150]
    kwargs = dict(tokenizer=ByteTokenizer(), batch_size=4, seed=5, train=train, **_RESUME_CASES[objective])
    ds = make_dataset(objective, data, **kwargs)
    it = iter(ds)
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # must survive a JSON round trip
    expected = list(itertools.islice(it, 5))
    resumed = iter(ds)
    resumed.set_state(state)
    got = list(itertools.islice(resumed, 5))
    assert len(got) == len(expected) == 5
    for a, b in zip(expected, got):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    # And the state differs from a fresh iterator's, so the test is not vacuous.
    assert json.dumps(iter(ds).get_state()) != json.dumps(state)
