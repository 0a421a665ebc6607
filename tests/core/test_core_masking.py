"""Padding and packing: pad tokens change nothing real; packed segments equal separate sequences."""

import jax
import numpy as np
import pytest
from core_helpers import B, ENC_DEC_POSITIONS, POSITIONS, T, init, random_ids, tiny

from flaxformer_lite.models import build_model

FAMILY_POSITIONS = {"decoder": POSITIONS, "encoder": POSITIONS, "encoder_decoder": ENC_DEC_POSITIONS}


def model_and_params(family, position):
    cfg = tiny(family=family, position=position, mlm_head=family == "encoder")
    return cfg, build_model(cfg), init(cfg)


# ------------------------------------------------------------------------------ padding


def left_and_right_padded(seed, vocab):
    """ids, attention mask, per-row positions: row 0 padded on the left, row 1 on the right."""
    ids = random_ids(seed, B, T, vocab)
    mask = np.ones((B, T), np.int32)
    mask[0, :3] = 0
    mask[1, 5:] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return ids, mask, positions


def scramble_padding(ids, mask, seed, vocab):
    """The same ids with every padded slot replaced by another random token."""
    return np.where(mask == 1, ids, random_ids(seed, *ids.shape, vocab))


@pytest.mark.parametrize("family", ["decoder", "encoder"])
def test_padded_tokens_do_not_change_real_outputs(family):
    for position in FAMILY_POSITIONS[family]:
        cfg, model, params = model_and_params(family, position)
        ids, mask, positions = left_and_right_padded(0, cfg.vocab_size)
        other = scramble_padding(ids, mask, 1, cfg.vocab_size)
        run = lambda x: model.apply(params, x, attention_mask=mask, positions=positions)  # noqa: E731
        a, b = run(ids), run(other)
        real = mask == 1
        np.testing.assert_array_equal(np.asarray(a.logits)[real], np.asarray(b.logits)[real], err_msg=position)
        assert not np.array_equal(np.asarray(a.logits)[~real], np.asarray(b.logits)[~real])


def test_padded_tokens_do_not_change_real_outputs_encoder_decoder():
    for position in FAMILY_POSITIONS["encoder_decoder"]:
        cfg, model, params = model_and_params("encoder_decoder", position)
        src, src_mask, src_pos = left_and_right_padded(0, cfg.vocab_size)
        tgt, tgt_mask, tgt_pos = left_and_right_padded(2, cfg.vocab_size)
        tgt_mask[0], tgt_pos[0] = 1, np.arange(T)  # decoder rows: one full, one right-padded

        def run(s, t):
            return model.apply(params, s, t, attention_mask=src_mask, decoder_attention_mask=tgt_mask,
                               positions=src_pos, decoder_positions=tgt_pos)

        a = run(src, tgt)
        b = run(scramble_padding(src, src_mask, 1, cfg.vocab_size), scramble_padding(tgt, tgt_mask, 3, cfg.vocab_size))
        real_src, real_tgt = src_mask == 1, tgt_mask == 1
        np.testing.assert_array_equal(np.asarray(a.encoder_hidden_states)[real_src],
                                      np.asarray(b.encoder_hidden_states)[real_src], err_msg=position)
        np.testing.assert_array_equal(np.asarray(a.logits)[real_tgt], np.asarray(b.logits)[real_tgt],
                                      err_msg=position)


# ------------------------------------------------------------------------------ packing


def pack(lengths_per_row, length, vocab, seed):
    """Packed ids/segment ids/positions and the same sequences one per row, right-padded."""
    g = np.random.default_rng(seed)
    ids, segments, positions = (np.zeros((len(lengths_per_row), length), np.int32) for _ in range(3))
    alone, alone_mask, spans = [], [], []  # spans: (row, start, length) of each sequence
    for b, lengths in enumerate(lengths_per_row):
        start = 0
        for seg, n in enumerate(lengths, start=1):
            seq = g.integers(3, vocab, n)
            ids[b, start:start + n], segments[b, start:start + n] = seq, seg
            positions[b, start:start + n] = np.arange(n)
            alone.append(np.pad(seq, (0, length - n), constant_values=0))
            alone_mask.append(np.arange(length) < n)
            spans.append((b, start, n))
            start += n
    return dict(ids=ids, segments=segments, positions=positions, alone=np.stack(alone).astype(np.int32),
                alone_mask=np.stack(alone_mask).astype(np.int32), spans=spans)


def in_chunks_of_B(run, *arrays_NT):
    """run(*rows) over consecutive B-row chunks, outputs concatenated (one batch shape: fewer compiles)."""
    outs = [run(*(a[i:i + B] for a in arrays_NT)) for i in range(0, len(arrays_NT[0]), B)]
    return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)


def assert_packed_equals_alone(packed_BTX, alone_BTX, spans, msg):
    for i, (b, start, n) in enumerate(spans):
        np.testing.assert_allclose(np.asarray(packed_BTX)[b, start:start + n], np.asarray(alone_BTX)[i, :n],
                                   rtol=1e-5, atol=1e-5, err_msg=f"{msg}, sequence {i}")


@pytest.mark.parametrize("family", ["decoder", "encoder"])
def test_packed_batch_equals_sequences_run_one_by_one(family):
    p = pack([[3, 4], [5, 3]], T, 64, seed=0)
    for position in FAMILY_POSITIONS[family]:
        cfg, model, params = model_and_params(family, position)
        packed = model.apply(params, p["ids"], segment_ids=p["segments"], positions=p["positions"])
        alone = in_chunks_of_B(lambda ids, mask: model.apply(params, ids, attention_mask=mask),
                               p["alone"], p["alone_mask"])
        assert_packed_equals_alone(packed.logits, alone.logits, p["spans"], position)


def test_packed_segments_do_not_see_each_other():
    """Rewriting the second segment of a row leaves the first one's outputs bit-identical."""
    p = pack([[3, 4], [5, 3]], T, 64, seed=0)
    first = p["segments"] == 1
    for family in ("encoder", "decoder"):
        cfg, model, params = model_and_params(family, "relative")
        other = np.where(p["segments"] == 2, random_ids(5, B, T, cfg.vocab_size), p["ids"])
        a, b = (model.apply(params, x, segment_ids=p["segments"], positions=p["positions"]) for x in (p["ids"], other))
        np.testing.assert_array_equal(np.asarray(a.logits)[first], np.asarray(b.logits)[first], err_msg=family)
        assert not np.array_equal(np.asarray(a.logits)[~first], np.asarray(b.logits)[~first])


def test_packed_encoder_decoder_equals_pairs_run_one_by_one():
    src = pack([[3, 4], [5, 3]], T, 64, seed=0)
    tgt = pack([[2, 5], [4, 2]], T, 64, seed=1)  # decoder segment i reads encoder segment i
    for position in FAMILY_POSITIONS["encoder_decoder"]:
        cfg, model, params = model_and_params("encoder_decoder", position)
        packed = model.apply(params, src["ids"], tgt["ids"], segment_ids=src["segments"],
                             decoder_segment_ids=tgt["segments"], positions=src["positions"],
                             decoder_positions=tgt["positions"])
        alone = in_chunks_of_B(
            lambda s, t, s_mask, t_mask: model.apply(params, s, t, attention_mask=s_mask,
                                                     decoder_attention_mask=t_mask),
            src["alone"], tgt["alone"], src["alone_mask"], tgt["alone_mask"])
        assert_packed_equals_alone(packed.encoder_hidden_states, alone.encoder_hidden_states, src["spans"], position)
        assert_packed_equals_alone(packed.logits, alone.logits, tgt["spans"], position)
