"""Objectives: text to batches. `make_dataset` is the one call a trainer makes.

    tok = load_tokenizer("byte")
    train_docs, val_docs = split(load_corpus("causal_lm"), val_fraction=0.05)
    ds = make_dataset("causal_lm", train_docs, tokenizer=tok, batch_size=32, seq_len=128,
                      shard_index=jax.process_index(), shard_count=jax.process_count())
    it = iter(ds)                  # grain.DatasetIterator, endless when train=True
    batch = next(it)
    state = it.get_state()         # JSON-serialisable; a fresh iter(ds).set_state(state)
                                   # continues with exactly the next batch
    val = make_dataset("causal_lm", val_docs, tokenizer=tok, batch_size=32, seq_len=128,
                       train=False)        # one pass; the last batch padded with empty rows

Batch contract: dicts of numpy arrays; B batch_size, T seq_len, S target_len.
  causal_lm        input_ids, labels, segment_ids, positions [B,T] int32; weights [B,T] float32
                   labels[t] is the token after input_ids[t] in the same document; weights
                   are 0 on padding and on each document's last token (nothing follows it).
  masked_lm        the same keys; labels hold the original token and weights are 1 only
                   at the positions picked for prediction (BERT 80/10/10 rule).
  span_corruption, seq2seq, copy, reverse
                   encoder: input_ids, segment_ids, positions [B,T] int32;
                   decoder: decoder_input_ids, labels, decoder_segment_ids,
                   decoder_positions [B,S] int32; weights [B,S] float32.
                   decoder_input_ids are the labels shifted right in each segment, starting
                   with the decoder start id = pad_id (as in T5).
  classification   input_ids, segment_ids, positions [B,T] int32; label [B] int32.
  sft              the causal_lm keys; weights are 1 only where the next token is one
                   to learn (an assistant turn or completion, data/finetune.py).
  dpo              the sft keys twice, prefixed chosen_ and rejected_; segment k of row b
                   is the same example's preferred and rejected answer on both sides.
  grpo             prompt_ids [B,T] int32 (left-aligned, padded), prompt_lengths [B] and
                   example [B] int32 (the record's index in the data given; -1 on padding
                   rows): the trainer samples the completions (train/grpo.py).
segment_ids number the examples packed into a row 1, 2, ... and are 0 on padding;
positions restart at 0 in every segment; padding ids are the tokenizer's pad_id (0 if it
has none: padding carries no weight; seq2seq needs one as its decoder start). Rows of
the padded last evaluation batch have segment_ids 0 everywhere (and label 0).

Sequences: causal_lm documents are bos + text + eos where the tokenizer puts bos first
(`adds_bos`: as generate and serve encode a prompt), else text + eos (SmolLM2, Qwen,
GPT-2); masked_lm and classification rows
are bos + text + eos (the [CLS] ... [SEP] of BERT); seq2seq inputs and targets end with
eos. Documents longer than a row are split, never cut, for the self-supervised
objectives (causal_lm, masked_lm, span_corruption); causal_lm chunks overlap by one token
so every next-token prediction is made exactly once. In training, causal_lm and masked_lm
windows of long documents shift by a random offset every epoch (`shift_windows`). Paired
and labelled examples cannot be split: seq2seq and classification truncate them, with one
warning that counts them.

sft and dpo examples longer than a row are cut to seq_len, with one warning that counts
them (a cut example keeps its start: the prompt and the beginning of the answer).

Every batch is checked for ids outside [0, vocab_size) (`vocab_size`: the model's,
default the tokenizer's), which a JAX gather would otherwise clamp silently.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import warnings
from typing import Any, Callable, NamedTuple, Optional, Sequence

import grain
import numpy as np

from flaxformer_lite.data import corpora, finetune, pipeline
from flaxformer_lite.data.errors import DataError
from flaxformer_lite.data.pipeline import Batch, Example
from flaxformer_lite.data.store import REJECTED, TRAINED, Documents
from flaxformer_lite.data.tokenizers import Tokenizer, leading_bos

OBJECTIVES = (
    "causal_lm", "masked_lm", "span_corruption", "seq2seq", "classification", "copy", "reverse", "sft", "dpo",
    "grpo",
)
# Fine-tuning objectives over JSON lines of conversations, preference pairs or prompts.
FINETUNE_OBJECTIVES = ("sft", "dpo", "grpo")
# Objectives over a token stream: they read Documents, in memory or from a prepared store.
STREAM_OBJECTIVES = ("causal_lm", "masked_lm", "span_corruption")

# Synthetic copy/reverse sets: examples are drawn lazily from a seeded stream per index, so
# size costs nothing; evaluation draws from a different stream than training.
SYNTHETIC_TRAIN_EXAMPLES = 1_000_000
SYNTHETIC_EVAL_EXAMPLES = 1_024


# ------------------------------------------------------------------------ pure batch functions


def causal_lm_batch(rows: Batch, pad_id: int) -> Batch:
    """Packed rows {tokens, tokens_segment_ids, tokens_positions} -> the causal_lm contract."""
    ids_BT, seg_BT = rows["tokens"], rows["tokens_segment_ids"]
    next_ids_BT = np.roll(ids_BT, -1, axis=1)
    next_seg_BT = np.pad(seg_BT[:, 1:], ((0, 0), (0, 1)))
    predicts_BT = (seg_BT > 0) & (next_seg_BT == seg_BT)
    return {
        "input_ids": np.where(seg_BT > 0, ids_BT, pad_id).astype(np.int32),
        "labels": np.where(predicts_BT, next_ids_BT, pad_id).astype(np.int32),
        "weights": predicts_BT.astype(np.float32),
        "segment_ids": seg_BT.astype(np.int32),
        "positions": rows["tokens_positions"].astype(np.int32),
    }


def sft_batch(rows: Batch, pad_id: int) -> Batch:
    """Packed rows {tokens, loss_mask (+ segment ids, positions)} -> the sft contract:
    causal_lm's batch with weight only where the next token is a trained one."""
    batch = causal_lm_batch(rows, pad_id)
    next_trained_BT = np.pad(rows["loss_mask"][:, 1:], ((0, 0), (0, 1))) > 0
    batch["weights"] = batch["weights"] * next_trained_BT
    return batch


def dpo_batch(rows: Batch, pad_id: int) -> Batch:
    """Packed rows {chosen, chosen_mask, rejected, rejected_mask (+ segment ids, positions)}
    -> the dpo contract: sft_batch of each side, its keys prefixed chosen_ / rejected_."""
    out = {}
    for side in ("chosen", "rejected"):
        sub = {"tokens": rows[side], "loss_mask": rows[f"{side}_mask"],
               "tokens_segment_ids": rows[f"{side}_segment_ids"], "tokens_positions": rows[f"{side}_positions"]}
        out.update({f"{side}_{k}": v for k, v in sft_batch(sub, pad_id).items()})
    return out


def mask_tokens(
    ids: np.ndarray,
    rng: np.random.Generator,
    *,
    mask_probability: float,
    mask_id: int,
    pad_id: int,
    special_ids: np.ndarray,
    random_ids: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BERT masking: (inputs, labels, weights) for one sequence.

    Each non-special token is picked with probability `mask_probability`; a picked
    token becomes `mask_id` 80% of the time, a uniform draw from `random_ids` 10%, and
    stays itself 10%. labels hold the original token where picked (pad_id elsewhere);
    weights are 1 exactly where picked.
    """
    picked = ~np.isin(ids, special_ids) & (rng.random(ids.shape) < mask_probability)
    action = rng.random(ids.shape)
    to_mask = picked & (action < 0.8)
    to_random = picked & (action >= 0.8) & (action < 0.9)
    inputs = np.where(to_mask, mask_id, ids)
    inputs[to_random] = rng.choice(random_ids, size=int(to_random.sum()))
    labels = np.where(picked, ids, pad_id)
    return inputs.astype(np.int32), labels.astype(np.int32), picked.astype(np.float32)


def masked_lm_batch(rows: Batch, pad_id: int) -> Batch:
    """Packed rows {tokens, labels, weights (+ segment ids, positions)} -> the masked_lm contract."""
    seg_BT = rows["tokens_segment_ids"]
    picked_BT = (rows["weights"] > 0) & (seg_BT > 0)
    return {
        "input_ids": np.where(seg_BT > 0, rows["tokens"], pad_id).astype(np.int32),
        "labels": np.where(picked_BT, rows["labels"], pad_id).astype(np.int32),
        "weights": picked_BT.astype(np.float32),
        "segment_ids": seg_BT.astype(np.int32),
        "positions": rows["tokens_positions"].astype(np.int32),
    }


def _noise_counts(length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) for a sequence of `length` >= 2 tokens, as T5 rounds them."""
    num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    num_spans = int(round(num_noise / mean_noise_span_length))
    return num_noise, min(max(num_spans, 1), num_noise, length - num_noise)


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths of a uniformly random split of num_items into num_segments non-empty runs."""
    cuts = np.sort(rng.choice(num_items - 1, num_segments - 1, replace=False)) + 1
    return np.diff(np.concatenate([[0], cuts, [num_items]]))


def random_spans_noise_mask(
    length: int, noise_density: float, mean_noise_span_length: float, rng: np.random.Generator
) -> np.ndarray:
    """T5's noise mask: bool [length], alternating clean/noise spans, starting clean."""
    num_noise, num_spans = _noise_counts(length, noise_density, mean_noise_span_length)
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)
    clean_lengths = _random_segmentation(length - num_noise, num_spans, rng)
    span_lengths = np.stack([clean_lengths, noise_lengths], axis=1).reshape(-1)
    return np.repeat(np.arange(2 * num_spans) % 2 == 1, span_lengths)


def span_corruption(
    ids: np.ndarray,
    rng: np.random.Generator,
    *,
    noise_density: float,
    mean_noise_span_length: float,
    sentinel_ids: np.ndarray,
    eos_id: int,
) -> tuple[np.ndarray, np.ndarray]:
    """T5 span corruption of one sequence (>= 2 tokens): (inputs, targets), both ending in eos.

    Noise span i is replaced by sentinel_ids[i] in the inputs; the targets are
    sentinel_ids[0], span 0, sentinel_ids[1], span 1, ... so putting each span back in
    place of its sentinel rebuilds `ids`.
    """
    noise = random_spans_noise_mask(len(ids), noise_density, mean_noise_span_length, rng)
    span_start = noise & ~np.pad(noise[:-1], (1, 0))
    span_index = np.cumsum(span_start) - 1
    if span_start.sum() > len(sentinel_ids):
        raise DataError(
            f"span corruption needs {span_start.sum()} sentinels but the tokenizer has "
            f"{len(sentinel_ids)}; lower seq_len or use a tokenizer with more <extra_id_N>"
        )
    inputs = np.where(span_start, sentinel_ids[span_index], ids)[~noise | span_start]
    noise_starts = np.flatnonzero(span_start[noise])
    targets = np.insert(ids[noise], noise_starts, sentinel_ids[: len(noise_starts)])
    eos = np.array([eos_id])
    return np.concatenate([inputs, eos]).astype(np.int32), np.concatenate([targets, eos]).astype(np.int32)


def span_corruption_lengths(
    seq_len: int,
    noise_density: float,
    mean_noise_span_length: float,
    target_len: Optional[int] = None,
) -> tuple[int, int]:
    """(raw chunk length, target_len) so that corrupted chunks fit seq_len and target_len.

    As T5's `random_spans_helper`: the longest raw chunk whose inputs (clean tokens +
    one sentinel a span + eos) fit seq_len, and, if given, whose targets fit target_len;
    target_len defaults to the longest targets such chunks make.
    """

    if not 0.0 < noise_density < 1.0 or mean_noise_span_length < 1.0:
        raise DataError(
            f"noise_density={noise_density} must be in (0, 1) and mean_noise_span_length="
            f"{mean_noise_span_length} at least 1 (T5: 0.15 and 3.0)"
        )

    def sizes(n: int) -> tuple[int, int]:
        num_noise, num_spans = _noise_counts(n, noise_density, mean_noise_span_length)
        return n - num_noise + num_spans + 1, num_noise + num_spans + 1

    longest_inputs = longest_targets = 0
    raw = 1
    while True:
        inputs, targets = sizes(raw + 1)
        if max(longest_inputs, inputs) > seq_len or (
            target_len and max(longest_targets, targets) > target_len
        ):
            break
        raw += 1
        longest_inputs, longest_targets = max(longest_inputs, inputs), max(longest_targets, targets)
    if raw < 2:
        raise DataError(
            f"span_corruption cannot fit any chunk into seq_len={seq_len}, target_len={target_len}; "
            "raise them"
        )
    return raw, target_len or longest_targets


def seq2seq_batch(rows: Batch, pad_id: int) -> Batch:
    """Packed rows {inputs, targets (+ segment ids, positions)} -> the seq2seq contract."""
    enc_seg_BT, dec_seg_BS = rows["inputs_segment_ids"], rows["targets_segment_ids"]
    targets_BS, dec_pos_BS = rows["targets"], rows["targets_positions"]
    # Shift right inside each segment: position 0 of every segment gets the start id.
    decoder_input_ids_BS = np.where(dec_pos_BS == 0, pad_id, np.roll(targets_BS, 1, axis=1))
    return {
        "input_ids": np.where(enc_seg_BT > 0, rows["inputs"], pad_id).astype(np.int32),
        "segment_ids": enc_seg_BT.astype(np.int32),
        "positions": rows["inputs_positions"].astype(np.int32),
        "decoder_input_ids": np.where(dec_seg_BS > 0, decoder_input_ids_BS, pad_id).astype(np.int32),
        "labels": np.where(dec_seg_BS > 0, targets_BS, pad_id).astype(np.int32),
        "weights": (dec_seg_BS > 0).astype(np.float32),
        "decoder_segment_ids": dec_seg_BS.astype(np.int32),
        "decoder_positions": dec_pos_BS.astype(np.int32),
    }


def classification_batch(rows: Batch, pad_id: int) -> Batch:
    """Padded rows {tokens (+ segment ids, positions), label} -> the classification contract."""
    seg_BT = rows["tokens_segment_ids"]
    return {
        "input_ids": np.where(seg_BT > 0, rows["tokens"], pad_id).astype(np.int32),
        "segment_ids": seg_BT.astype(np.int32),
        "positions": rows["tokens_positions"].astype(np.int32),
        "label": np.asarray(rows["label"], np.int32),
    }


# --------------------------------------------------------------------------------- plans


@dataclasses.dataclass(frozen=True)
class _Spec:
    """make_dataset's arguments, as the plan builders read them."""

    tokenizer: Tokenizer
    vocab_size: int
    seq_len: int
    target_len: Optional[int]
    train: bool
    seed: int
    pack: bool
    mask_probability: float
    noise_density: float
    mean_noise_span_length: float
    synthetic_vocab: int
    shift_windows: bool
    chat_template: Any  # data.chat.ChatTemplate or None: renders sft/dpo/grpo message lists
    max_new_tokens: int  # grpo: the room each prompt leaves in its row


class _Plan(NamedTuple):
    """What `pipeline.build` needs for one objective."""

    examples: Sequence[Any]
    features: Callable[[Any, np.random.Generator], Example]
    lengths: dict[str, int]
    finalize: Callable[[Batch], Batch]
    pack: bool


class _Windows(Sequence):
    """(document, start) of every window of `size` tokens every `step` tokens, computed on
    access from per-document counts: memory is 8 bytes a document, not a list of windows.

    A document of n tokens has windows at 0, step, ... while start < max(n - (size - step), 1),
    so windows overlap by size - step tokens and every document has at least one.
    """

    def __init__(self, lengths: np.ndarray, size: int, step: int, min_last: int = 0):
        # In place where it can be: this runs over every document of a large corpus.
        counts = np.maximum(lengths - (size - step), 1)
        counts += step - 1
        counts //= step
        if min_last:  # drop a last window shorter than min_last tokens
            counts -= (lengths - (counts - 1) * step) < min_last
        self._ends = np.cumsum(counts, out=counts)
        self._step = step

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        d = int(np.searchsorted(self._ends, i, side="right"))
        return d, (i - (int(self._ends[d - 1]) if d else 0)) * self._step


def _window(item: tuple[int, int], rng: np.random.Generator, *, docs: Documents, size: int, shift: bool,
            bos: Optional[int] = None, eos: Optional[int] = None) -> np.ndarray:
    """The window `item` names, of the document [bos] + ids + [eos]; with `shift`, moved by
    a uniform offset of up to half a window either way (kept inside its document), so
    each epoch cuts long documents at new places and a row is not the same token
    sequence every pass."""
    d, start = item
    n = docs.length(d) + (bos is not None) + (eos is not None)
    if shift and n > size:
        half = (size - 1) // 2
        start = int(np.clip(start + rng.integers(-half, half + 1), 0, n - size))
    return docs.window(d, start, size, bos=bos, eos=eos)


def _documents(spec: _Spec, texts: Sequence[str]) -> Documents:
    """Texts tokenized into in-memory Documents (what a store holds, without the disk)."""
    docs = spec.tokenizer.encode_batch(texts)
    for i, (text, ids) in enumerate(zip(texts, docs)):
        if ids.size and (ids.max() >= spec.vocab_size or ids.min() < 0):
            pipeline.check_ids(ids, spec.vocab_size, f"document {i} ({text[:40]!r}...)")
    return Documents.from_arrays(docs)


def _tokenize(spec: _Spec, texts: Sequence[str], what: str) -> list[list[int]]:
    out = []
    for i, text in enumerate(texts):
        ids = spec.tokenizer.encode(text)
        if ids and (max(ids) >= spec.vocab_size or min(ids) < 0):
            pipeline.check_ids(np.asarray(ids), spec.vocab_size, f"{what} {i} ({text[:40]!r}...)")
        out.append(ids)
    return out


def _regular_ids(spec: _Spec) -> np.ndarray:
    """Ids below both vocab sizes that are not special tokens, ascending."""
    ids = np.arange(min(spec.tokenizer.vocab_size, spec.vocab_size))
    return ids[~np.isin(ids, sorted(spec.tokenizer.special_ids))]


def grpo_batch(rows: Batch, pad_id: int) -> Batch:
    """Padded rows {prompt, prompt_segment_ids, example} -> the grpo contract."""
    seg_BT = rows["prompt_segment_ids"]
    real_B = seg_BT[:, 0] > 0
    return {
        "prompt_ids": np.where(seg_BT > 0, rows["prompt"], pad_id).astype(np.int32),
        "prompt_lengths": np.sum(seg_BT > 0, axis=1).astype(np.int32),
        "example": np.where(real_B, rows["example"], -1).astype(np.int32),
    }


def _pad_id(tok: Tokenizer, *, decoder_start: bool = False) -> int:
    """The id padding takes. Padding sits under segment id 0 and zero loss weight, so a
    tokenizer without a pad token (GPT-2, LLaMA, Mistral) pads with 0; only seq2seq
    batches need a real one, as the decoder's start id."""
    if tok.pad_id is not None:
        return tok.pad_id
    if decoder_start:
        raise DataError(
            f"{tok!r} has no pad token, which seq2seq batches start the decoder with (as T5 does); "
            "use a tokenizer with one, e.g. add it with tokenizer.add_special_tokens(['<pad>'])"
        )
    return 0


def _finalizer(fn: Callable[..., Batch], spec: _Spec) -> Callable[[Batch], Batch]:
    return functools.partial(fn, pad_id=_pad_id(spec.tokenizer, decoder_start=fn is seq2seq_batch))


def _token_features(item: tuple[int, int], rng: np.random.Generator, **window_kwargs) -> Example:
    return {"tokens": _window(item, rng, **window_kwargs)}


def _causal_lm_plan(docs: Documents, spec: _Spec) -> _Plan:
    tok, seq_len = spec.tokenizer, spec.seq_len
    if seq_len < 2:
        raise DataError(f"causal_lm needs seq_len >= 2, got {seq_len}")
    bos = leading_bos(tok)
    features = functools.partial(
        _token_features, docs=docs, size=seq_len, shift=spec.shift_windows, bos=bos, eos=tok.eos_id
    )
    lengths = docs.lengths
    lengths += 1 + (bos is not None)  # eos, and bos where the tokenizer puts one first
    windows = _Windows(lengths, seq_len, seq_len - 1)
    return _Plan(windows, features, {"tokens": seq_len}, _finalizer(causal_lm_batch, spec), spec.pack)


def _masked_lm_features(
    item: tuple[int, int], rng: np.random.Generator, *, window_kwargs: dict, bos_id: int, eos_id: int, **mask_kwargs
) -> Example:
    ids = np.concatenate([[bos_id], _window(item, rng, **window_kwargs), [eos_id]]).astype(np.int32)
    inputs, labels, weights = mask_tokens(ids, rng, **mask_kwargs)
    return {"tokens": inputs, "labels": labels, "weights": weights}


def _masked_lm_plan(docs: Documents, spec: _Spec) -> _Plan:
    tok, seq_len = spec.tokenizer, spec.seq_len
    if seq_len < 3:
        raise DataError(f"masked_lm needs seq_len >= 3 (bos, a token, eos), got {seq_len}")
    if not 0.0 < spec.mask_probability < 1.0:
        raise DataError(f"mask_probability={spec.mask_probability} must be in (0, 1) (BERT: 0.15)")
    body = seq_len - 2
    doc_lengths = docs.lengths
    if not doc_lengths.all():
        docs, doc_lengths = docs.select(np.flatnonzero(doc_lengths)), doc_lengths[doc_lengths > 0]
    features = functools.partial(
        _masked_lm_features,
        window_kwargs=dict(docs=docs, size=body, shift=spec.shift_windows),
        bos_id=tok.bos_id,
        eos_id=tok.eos_id,
        mask_probability=spec.mask_probability,
        mask_id=tok.mask_id,
        pad_id=_pad_id(tok),
        special_ids=np.asarray(sorted(tok.special_ids)),
        random_ids=_regular_ids(spec),
    )
    lengths = {"tokens": seq_len, "labels": seq_len, "weights": seq_len}
    windows = _Windows(doc_lengths, body, body)
    return _Plan(windows, features, lengths, _finalizer(masked_lm_batch, spec), spec.pack)


def _span_corruption_features(
    item: tuple[int, int], rng: np.random.Generator, *, docs: Documents, size: int, **span_kwargs
) -> Example:
    inputs, targets = span_corruption(docs.window(*item, size), rng, **span_kwargs)
    return {"inputs": inputs, "targets": targets}


def _span_corruption_plan(docs: Documents, spec: _Spec) -> _Plan:
    tok, density, mean_span = spec.tokenizer, spec.noise_density, spec.mean_noise_span_length
    raw_len, target_len = span_corruption_lengths(spec.seq_len, density, mean_span, spec.target_len)
    most_spans = max(_noise_counts(n, density, mean_span)[1] for n in range(2, raw_len + 1))
    if most_spans > tok.num_sentinels:
        raise DataError(
            f"span_corruption at seq_len={spec.seq_len} makes up to {most_spans} noise spans but "
            f"the tokenizer has {tok.num_sentinels} sentinels; lower seq_len or add sentinels"
        )
    # A one-token chunk has no clean token to keep beside its noise; it is dropped.
    chunks = _Windows(docs.lengths, raw_len, raw_len, min_last=2)
    features = functools.partial(
        _span_corruption_features,
        docs=docs,
        size=raw_len,
        noise_density=density,
        mean_noise_span_length=mean_span,
        sentinel_ids=np.asarray([tok.sentinel_id(i) for i in range(most_spans)]),
        eos_id=tok.eos_id,
    )
    lengths = {"inputs": spec.seq_len, "targets": target_len}
    return _Plan(chunks, features, lengths, _finalizer(seq2seq_batch, spec), spec.pack)


def _pair_features(pair: tuple[list[int], list[int]], rng: np.random.Generator) -> Example:
    del rng  # no randomness: the pair is fixed by the corpus
    return {"inputs": np.asarray(pair[0], np.int32), "targets": np.asarray(pair[1], np.int32)}


def _seq2seq_plan(pairs: Sequence[tuple[str, str]], spec: _Spec) -> _Plan:
    eos, target_len = spec.tokenizer.eos_id, spec.target_len or spec.seq_len
    sources = _tokenize(spec, [p[0] for p in pairs], "source")
    targets = _tokenize(spec, [p[1] for p in pairs], "target")
    sources = [s + [eos] for s in pipeline.truncate(sources, spec.seq_len - 1, "seq2seq sources")]
    targets = [t + [eos] for t in pipeline.truncate(targets, target_len - 1, "seq2seq targets")]
    lengths = {"inputs": spec.seq_len, "targets": target_len}
    return _Plan(
        list(zip(sources, targets)), _pair_features, lengths, _finalizer(seq2seq_batch, spec), spec.pack
    )


def _labeled_features(example: tuple[list[int], int], rng: np.random.Generator) -> Example:
    del rng  # no randomness: the example is fixed by the corpus
    return {"tokens": np.asarray(example[0], np.int32), "label": np.int32(example[1])}


def _classification_plan(examples: Sequence[tuple[str, int]], spec: _Spec) -> _Plan:
    tok = spec.tokenizer
    texts = _tokenize(spec, [e[0] for e in examples], "example")
    texts = pipeline.truncate(texts, spec.seq_len - 2, "classification texts")
    rows = [([tok.bos_id] + ids + [tok.eos_id], label) for ids, (_, label) in zip(texts, examples)]
    # One example a row: the label belongs to the row, so rows are never packed.
    lengths = {"tokens": spec.seq_len}
    return _Plan(rows, _labeled_features, lengths, _finalizer(classification_batch, spec), False)


def _synthetic_features(
    index: int,
    rng: np.random.Generator,
    *,
    reverse: bool,
    symbols: np.ndarray,
    max_len: int,
    eos_id: int,
    stream: tuple[int, int],
) -> Example:
    del rng  # each example is a function of its index, so training sees a fixed set
    rng = np.random.default_rng(stream + (index,))
    seq = rng.choice(symbols, size=int(rng.integers(1, max_len + 1)))
    target = seq[::-1] if reverse else seq
    eos = np.array([eos_id])
    return {
        "inputs": np.concatenate([seq, eos]).astype(np.int32),
        "targets": np.concatenate([target, eos]).astype(np.int32),
    }


def _synthetic_plan(indices: Sequence[int], spec: _Spec, *, reverse: bool) -> _Plan:
    target_len = spec.target_len or spec.seq_len
    symbols = _regular_ids(spec)[: spec.synthetic_vocab]
    if len(symbols) < spec.synthetic_vocab:
        raise DataError(
            f"synthetic_vocab={spec.synthetic_vocab} exceeds the {len(symbols)} non-special ids "
            f"below vocab_size={spec.vocab_size}"
        )
    max_len = min(spec.seq_len, target_len) - 1
    if max_len < 1:
        raise DataError(f"copy/reverse need seq_len and target_len >= 2, got {spec.seq_len}, {target_len}")
    features = functools.partial(
        _synthetic_features,
        reverse=reverse,
        symbols=symbols,
        max_len=max_len,
        eos_id=spec.tokenizer.eos_id,
        stream=(spec.seed, int(spec.train)),
    )
    lengths = {"inputs": spec.seq_len, "targets": target_len}
    return _Plan(indices, features, lengths, _finalizer(seq2seq_batch, spec), spec.pack)


def _finetune_features(example: tuple[np.ndarray, ...], rng: np.random.Generator, *, keys: tuple[str, ...]) -> Example:
    del rng  # no randomness: the example is fixed by the corpus
    return {k: np.asarray(v, np.int32) for k, v in zip(keys, example)}


def _cut(spec: _Spec, examples: list[tuple[np.ndarray, ...]], what: str) -> list[tuple[np.ndarray, ...]]:
    """Examples with every sequence cut to seq_len, with one `note:` line on stderr that
    counts them (a notice about the data, not a Python warning about code)."""
    cut = sum(any(len(a) > spec.seq_len for a in e) for e in examples)
    if cut:
        print(f"note: {what}: cut {cut} of {len(examples)} examples longer than data.seq_len={spec.seq_len} tokens "
              "to their first seq_len tokens", file=sys.stderr)
    return [tuple(a[: spec.seq_len] for a in e) for e in examples]


class _StoredExamples(Sequence):
    """The sft examples (ids, trained) or dpo pairs (chosen, its mask, rejected, its mask) of a
    prepared store's documents, read on access and cut to `seq_len`."""

    def __init__(self, docs: Documents, seq_len: int, dpo: bool):
        self.docs, self.seq_len, self.dpo = docs, seq_len, dpo

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i: int) -> tuple[np.ndarray, ...]:
        ids, mask = self.docs.tokens(i), self.docs.mask(i)
        trained = (mask & TRAINED) > 0
        if not self.dpo:
            return ids[: self.seq_len], trained[: self.seq_len]
        first_rejected = int(np.argmax((mask & REJECTED) > 0))
        sides = ((ids[:first_rejected], trained[:first_rejected]), (ids[first_rejected:], trained[first_rejected:]))
        return tuple(a[: self.seq_len] for side in sides for a in side)

    def cut(self) -> int:
        """How many examples (pairs: either side) are longer than seq_len; a pair's mask is
        read only when its two sides together are."""
        lengths = self.docs.lengths
        long = np.flatnonzero(lengths > self.seq_len)
        if not self.dpo:
            return len(long)

        def longest_side(i: int) -> int:
            rejected = int(np.count_nonzero(self.docs.mask(i) & REJECTED))
            return max(int(lengths[i]) - rejected, rejected)

        return sum(longest_side(i) > self.seq_len for i in long)


def _stored_finetune_examples(docs: Documents, spec: _Spec, dpo: bool) -> _StoredExamples:
    if docs.max_id >= spec.vocab_size:
        pipeline.check_ids(np.array([docs.max_id]), spec.vocab_size, docs.name)
    examples = _StoredExamples(docs, spec.seq_len, dpo)
    cut = examples.cut()
    if cut:
        warnings.warn(
            f"{'dpo pairs' if dpo else 'sft examples'}: cut {cut} of {len(docs)} examples longer than "
            f"seq_len={spec.seq_len} tokens to their first seq_len tokens", stacklevel=5,
        )
    return examples


def _finetune_plan(records: Sequence[finetune.Record] | Documents, spec: _Spec, *, dpo: bool) -> _Plan:
    if spec.seq_len < 2:
        raise DataError(f"{'dpo' if dpo else 'sft'} needs seq_len >= 2, got {spec.seq_len}")
    keys = ("chosen", "chosen_mask", "rejected", "rejected_mask") if dpo else ("tokens", "loss_mask")
    features = functools.partial(_finetune_features, keys=keys)
    finalize = _finalizer(dpo_batch if dpo else sft_batch, spec)
    if isinstance(records, Documents):  # a prepared store: tokenized once, read on demand
        examples = _stored_finetune_examples(records, spec, dpo)
        return _Plan(examples, features, {k: spec.seq_len for k in keys}, finalize, spec.pack)
    tokens = finetune.dpo_tokens if dpo else finetune.sft_tokens
    examples = []
    for record in records:
        example = tokens(record, spec.tokenizer, spec.chat_template)
        for ids in example[::2]:
            if ids.size and (ids.max() >= spec.vocab_size or ids.min() < 0):
                pipeline.check_ids(ids, spec.vocab_size, record.where)
        examples.append(example)
    examples = _cut(spec, examples, "dpo pairs" if dpo else "sft examples")
    return _Plan(examples, features, {k: spec.seq_len for k in keys}, finalize, spec.pack)


def _grpo_features(example: tuple[np.ndarray, int], rng: np.random.Generator) -> Example:
    del rng  # no randomness: the prompt is fixed by the corpus
    return {"prompt": example[0], "example": np.int32(example[1])}


def _grpo_plan(records: Sequence[finetune.Record], spec: _Spec) -> _Plan:
    """Prompts alone, one a row: each must leave data.max_new_tokens of the row free."""
    if isinstance(records, Documents):
        raise DataError("grpo reads its JSON lines directly (a prepared store holds no reward fields): "
                        "set data.corpus to the .jsonl file")
    room = spec.seq_len - spec.max_new_tokens
    examples = []
    for index, record in enumerate(records):
        ids = finetune.grpo_prompt_tokens(record, spec.tokenizer, spec.chat_template)
        if not 0 < len(ids) <= room:
            raise DataError(
                f"{record.where}: the prompt has {len(ids)} tokens and a row holds {room} "
                f"(data.seq_len={spec.seq_len} - data.max_new_tokens={spec.max_new_tokens}): raise data.seq_len, "
                "lower data.max_new_tokens or shorten the prompt"
            )
        pipeline.check_ids(ids, spec.vocab_size, record.where)
        examples.append((ids, index))
    return _Plan(examples, _grpo_features, {"prompt": spec.seq_len}, _finalizer(grpo_batch, spec), False)


_PLANS: dict[str, Callable[[Sequence[Any], _Spec], _Plan]] = {
    "causal_lm": _causal_lm_plan,
    "masked_lm": _masked_lm_plan,
    "span_corruption": _span_corruption_plan,
    "seq2seq": _seq2seq_plan,
    "classification": _classification_plan,
    "copy": functools.partial(_synthetic_plan, reverse=False),
    "reverse": functools.partial(_synthetic_plan, reverse=True),
    "sft": functools.partial(_finetune_plan, dpo=False),
    "dpo": functools.partial(_finetune_plan, dpo=True),
    "grpo": _grpo_plan,
}


# ----------------------------------------------------------------------------------- public


def load_corpus(
    objective: str,
    corpus: corpora.Source = corpora.BUILTIN,
    *,
    text_field: str = "text",
    label_field: str = "label",
    document_unit: corpora.Unit = "paragraph",
) -> Any:
    """The data `make_dataset(objective, data)` takes, read from `corpus` ("builtin": offline).

    Documents (list[str]) for causal_lm/masked_lm/span_corruption, (source, target)
    pairs for seq2seq, a `LabeledCorpus` for classification, `finetune.Record`s of JSON
    lines for sft/dpo/grpo, None for copy/reverse.
    `document_unit` is `load_texts`'s `unit` for the documents.
    """
    _check_objective(objective)
    if objective in ("causal_lm", "masked_lm", "span_corruption"):
        return corpora.load_texts(corpus, text_field=text_field, unit=document_unit)
    if objective == "seq2seq":
        return corpora.load_pairs(corpus)
    if objective == "classification":
        return corpora.load_labeled(corpus, text_field=text_field, label_field=label_field)
    if objective in FINETUNE_OBJECTIVES:
        return finetune.load_records(corpus, objective)
    return None


def _check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise DataError(f"objective {objective!r} is not one of {', '.join(OBJECTIVES)}")


def make_dataset(
    objective: str,
    data: Any = None,
    *,
    tokenizer: Tokenizer,
    batch_size: int,
    seq_len: int,
    target_len: Optional[int] = None,
    train: bool = True,
    seed: int = 0,
    vocab_size: Optional[int] = None,
    shard_index: int = 0,
    shard_count: int = 1,
    pack: bool = True,
    mask_probability: float = 0.15,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    synthetic_vocab: int = 32,
    shift_windows: bool = True,
    chat_template: Any = None,
    max_new_tokens: int = 0,
) -> grain.IterDataset:
    """A grain dataset of batches for `objective` (see the module docstring for the contract).

    data: what `load_corpus(objective, ...)` returns (ignored by copy/reverse); for
      causal_lm, masked_lm and span_corruption also `Documents`, e.g.
      `Store.open(DATADIR).documents("train")`, read from the store's shards on demand;
      for sft and dpo also the Documents of a store prepared with that objective.
    train: endless, reshuffled every epoch, random packing-bin order; else one pass.
    seed: shuffling, masks and noise spans; the same seed gives the same batches.
    target_len: decoder length for the seq2seq family; None: seq_len, except for
      span_corruption, where None means the longest targets a full chunk can make.
    vocab_size: the model's vocabulary; ids at or above it raise DataError. None: the
      tokenizer's.
    shard_index, shard_count: this process's share of the examples
      (jax.process_index(), jax.process_count()); each process gets its own batches.
      Documents are shared out in contiguous blocks (each process reads its own part of
      a store), other examples round robin.
      Evaluation shards may end after different numbers of batches; a multi-process
      evaluation loop must agree when all are done.
    pack: several examples per row (not for classification, always one per row).
    shift_windows: causal_lm and masked_lm training rows of a document longer than a row
      move by a random offset (up to half a row either way) every epoch, so passes over
      a small corpus do not repeat the same rows. Evaluation never shifts.
    chat_template: sft/dpo/grpo: the `data.chat.ChatTemplate` that renders message lists
      (the checkpoint's); None: only plain prompt/completion strings are accepted.
    max_new_tokens: grpo: the tokens a completion may add; each prompt must leave them
      free in its row of seq_len.
    """
    _check_objective(objective)
    spec = _Spec(
        tokenizer=tokenizer,
        vocab_size=vocab_size or tokenizer.vocab_size,
        seq_len=seq_len,
        target_len=target_len,
        train=train,
        seed=seed,
        pack=pack,
        mask_probability=mask_probability,
        noise_density=noise_density,
        mean_noise_span_length=mean_noise_span_length,
        synthetic_vocab=synthetic_vocab,
        shift_windows=shift_windows and train,
        chat_template=chat_template,
        max_new_tokens=max_new_tokens,
    )
    if objective in ("copy", "reverse"):
        data = range(SYNTHETIC_TRAIN_EXAMPLES if train else SYNTHETIC_EVAL_EXAMPLES)
    elif data is None:
        raise DataError(f"{objective} needs data: pass load_corpus({objective!r}, ...) or a split of it")
    elif isinstance(data, corpora.LabeledCorpus):
        data = data.examples
    if objective in FINETUNE_OBJECTIVES and isinstance(data, Documents):
        mine = data.shard(shard_index, shard_count)
    elif objective in STREAM_OBJECTIVES:
        if isinstance(data, Documents):
            mine = data.shard(shard_index, shard_count)
            if mine.max_id >= spec.vocab_size:
                pipeline.check_ids(np.array([mine.max_id]), spec.vocab_size, mine.name)
        else:
            mine = _documents(spec, pipeline.shard_block(data, shard_index, shard_count))
    else:
        mine = pipeline.shard(data, shard_index, shard_count)
    plan = _PLANS[objective](mine, spec)
    if not plan.examples:
        raise DataError(f"{objective}: none of this shard's {len(mine)} items makes an example")
    return pipeline.build(
        plan.examples,
        features=plan.features,
        lengths=plan.lengths,
        finalize=plan.finalize,
        batch_size=batch_size,
        vocab_size=spec.vocab_size,
        seed=seed,
        train=train,
        pack=plan.pack,
    )
