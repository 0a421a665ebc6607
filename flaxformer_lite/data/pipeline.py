"""Input pipelines on grain: shard, shuffle, repeat, pack or pad, batch, resume.

`build` turns a list of tokenized examples into a `grain.IterDataset` of batches:

    examples (one host's shard) -> MapDataset: seeded shuffle, repeat forever (training)
      -> random_map(features): per-example randomness, seeded by (seed, global index)
      -> pack into rows of fixed length (grain FirstFitPack) or pad one example a row
      -> batch -> finalize (the objective's batch dict) -> id range check
      -> prefetch a few batches on a background thread

`iter(dataset)` is a `grain.DatasetIterator`: `get_state()` returns a JSON-serialisable
dict and `set_state(state)` on a fresh iterator of the same dataset continues with
exactly the batch that would have come next. All randomness (shuffle order, masks,
noise spans, packing-bin order) is a function of the seed and the position in the
stream, which is what makes that true. Training iterates forever and reshuffles every
epoch (grain's `repeat` folds the epoch into the shuffle seed); evaluation makes one pass
in corpus order and pads its last batch with empty rows (segment_ids 0, weights 0).

Sequence features of an example are 1-D int32/float32 arrays. For each feature `k`
named in `lengths`, a packed or padded row carries `k`, `k_segment_ids` (1..n for the
examples in the row, 0 for padding) and `k_positions` (0, 1, ... restarting in each
example); other keys (e.g. a class label) pass through unpadded, one example a row.
"""

from __future__ import annotations

import atexit
import functools
import warnings
import weakref
from typing import Any, Callable, Mapping, Sequence, TypeVar

import grain
import numpy as np

from flaxformer_lite.data.errors import DataError
from flaxformer_lite.data.store import block

T = TypeVar("T")
Example = dict[str, Any]
Batch = dict[str, np.ndarray]

# The per-example work (masking, span noise) is light numpy: handing it to read threads
# costs more under the GIL than it saves (measured: 20 ms a 32x128 masked_lm batch with
# none, 37 ms with two). Whole batches are prefetched on one thread instead.
READ_OPTIONS = grain.ReadOptions(num_threads=0)
PREFETCH_BATCHES = 2

# Token-id keys of the batch contract; every batch is checked before it leaves.
ID_KEYS = ("input_ids", "labels", "decoder_input_ids") + tuple(
    f"{side}_{k}" for side in ("chosen", "rejected") for k in ("input_ids", "labels")
)


def shard(items: Sequence[T], shard_index: int, shard_count: int) -> Sequence[T]:
    """This process's share: items shard_index, shard_index + shard_count, ...

    The caller passes jax.process_index() and jax.process_count(); data/ stays jax-free.
    A slice, so a range stays lazy.
    """
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise DataError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")
    mine = items[shard_index::shard_count]
    if not mine:
        raise DataError(
            f"shard {shard_index} of {shard_count} is empty: the corpus has only {len(items)} "
            "examples; use more data or fewer processes"
        )
    return mine


def shard_block(items: Sequence[T], shard_index: int, shard_count: int) -> Sequence[T]:
    """This process's contiguous block of items (as `Documents.shard` cuts a store)."""
    part = block(len(items), shard_index, shard_count)
    mine = items[part.start : part.stop]
    if shard_count > 1 and not mine:
        raise DataError(
            f"shard {shard_index} of {shard_count} is empty: the corpus has only {len(items)} "
            "examples; use more data or fewer processes"
        )
    return mine


def check_ids(ids: np.ndarray, vocab_size: int, where: str) -> None:
    """DataError unless 0 <= ids < vocab_size: a JAX gather clamps bad ids silently."""
    if ids.size == 0:
        return
    hi, lo = int(ids.max()), int(ids.min())
    if hi >= vocab_size or lo < 0:
        bad = hi if hi >= vocab_size else lo
        raise DataError(
            f"{where}: token id {bad} is outside [0, vocab_size={vocab_size}); the model would "
            "embed a wrong row silently. Use a model vocab_size larger than every id the "
            "tokenizer makes (tokenizer.vocab_size), or a smaller tokenizer"
        )


def check_batch_ids(batch: Batch, vocab_size: int) -> Batch:
    """`check_ids` on every token-id key of a batch; returns the batch."""
    for key in ID_KEYS:
        if key in batch:
            check_ids(batch[key], vocab_size, f"batch[{key!r}]")
    return batch


def truncate(seqs: list[list[int]], max_len: int, what: str) -> list[list[int]]:
    """Cut sequences to max_len tokens, warning once with how many were cut."""
    cut = sum(len(s) > max_len for s in seqs)
    if cut:
        warnings.warn(
            f"{what}: truncated {cut} of {len(seqs)} sequences longer than {max_len} tokens",
            stacklevel=2,
        )
    return [s[:max_len] for s in seqs]


def pad_example(example: Example, lengths: Mapping[str, int]) -> Example:
    """One example alone in a row: the same keys packing makes, with one segment."""
    row = {k: v for k, v in example.items() if k not in lengths}
    for key, length in lengths.items():
        seq = np.asarray(example[key])
        n = len(seq)
        if n > length:
            raise DataError(f"feature {key!r} has {n} tokens, more than its row length {length}")
        row[key] = np.pad(seq, (0, length - n))
        row[f"{key}_segment_ids"] = (np.arange(length) < n).astype(np.int32)
        row[f"{key}_positions"] = np.where(np.arange(length) < n, np.arange(length), 0).astype(np.int32)
    return row


def pad_batch(batch: Batch, batch_size: int) -> Batch:
    """Append all-zero rows up to batch_size (the last, short, evaluation batch)."""
    missing = batch_size - len(next(iter(batch.values())))
    if missing == 0:
        return batch
    return {k: np.concatenate([v, np.zeros((missing,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}


def build(
    examples: Sequence[Any],
    *,
    features: Callable[[Any, np.random.Generator], Example],
    lengths: Mapping[str, int],
    finalize: Callable[[Batch], Batch],
    batch_size: int,
    vocab_size: int,
    seed: int,
    train: bool,
    pack: bool,
    num_packing_bins: int | None = None,
) -> grain.IterDataset:
    """A dataset of finished batches; see the module docstring for the stages.

    `features(example, rng)` makes an example's sequence features (its randomness from
    `rng` only); `lengths` gives each feature's row length; `finalize` turns a batch of
    rows into the objective's batch dict. `num_packing_bins` (default: batch_size, at
    least 8) trades padding for buffering: more bins fill rows better.
    """
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size} must be >= 1")
    ds = grain.MapDataset.source(examples).seed(seed)
    if train:
        ds = ds.shuffle().repeat(None)
    rows = ds.random_map(features).to_iter_dataset(READ_OPTIONS)
    if pack:
        rows = grain.experimental.FirstFitPackIterDataset(
            rows,
            length_struct=dict(lengths),
            num_packing_bins=num_packing_bins or max(batch_size, 8),
            seed=seed,
            shuffle_bins=train,
        )
    else:
        rows = rows.map(functools.partial(pad_example, lengths=dict(lengths)))
    batches = rows.batch(batch_size, drop_remainder=train)
    if not train:
        batches = batches.map(functools.partial(pad_batch, batch_size=batch_size))
    batches = batches.map(finalize).map(functools.partial(check_batch_ids, vocab_size=vocab_size))
    # One thread makes the next batches while the train step runs (JAX releases the GIL
    # while XLA computes); its iterator's state is still that of the last batch handed out.
    return _PrefetchClosedAtExit(batches, prefetch_buffer_size=PREFETCH_BATCHES)


# grain's prefetch iterator closes itself in __del__. For an iterator still alive at
# interpreter exit that runs during finalisation, when grain's module globals are gone
# ("AttributeError: 'NoneType' object has no attribute 'Empty'") and its thread may be
# torn down mid-call ("terminate called without an active exception", exit status 134).
# Closing the live ones from atexit, which runs before finalisation, avoids both; their
# __del__ then finds close() a no-op, as it would otherwise look up those globals again.
_LIVE_ITERATORS = weakref.WeakSet()


@atexit.register
def _close_live_iterators() -> None:
    for iterator in list(_LIVE_ITERATORS):
        iterator.close()
        iterator.close = lambda: None


class _PrefetchClosedAtExit(grain.experimental.ThreadPrefetchIterDataset):
    def __iter__(self):
        iterator = super().__iter__()
        _LIVE_ITERATORS.add(iterator)
        return iterator
