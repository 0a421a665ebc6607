"""Corpora: documents, seq2seq pairs and labelled examples read from local files.

    docs = load_texts()                         # built-in: CPython's documentation text
    docs = load_texts("corpus/")                # a file, a folder (recursive), a glob
    docs = load_texts("web.jsonl", text_field="text")
    pairs = load_pairs("train.tsv")             # source<TAB>target, or .jsonl source/target
    labeled = load_labeled("reviews.tsv")       # text<TAB>label, or .jsonl text/label
    labeled = builtin_classification()          # derived from the built-in corpus, offline
    train_docs, val_docs = split(docs, val_fraction=0.05, seed=0)

A source is "builtin" (or None), a path to a file or folder, a glob pattern, or a list of
those. `load_texts` reads what `sources.iter_texts` streams (plain text, JSON lines,
compressed JSON lines, Parquet). In `load_pairs`/`load_labeled` files ending in .jsonl
(or .ndjson) are JSON lines and any other file is tab-separated; folders are searched
recursively for *.tsv and *.jsonl. Files are read in sorted order, so every list comes
out in the same order on every machine.

Bad input raises `DataError` naming the file and line and saying what was expected.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import zlib
from typing import Any, Iterator, Optional, Sequence, TypeVar

import numpy as np

from flaxformer_lite.data.errors import DataError
from flaxformer_lite.data.sources import (
    BUILTIN,
    JSONL_SUFFIXES,
    Source,
    Unit,
    builtin_documents,
    files,
    is_builtin,
    iter_texts,
    jsonl_records,
)

__all__ = ["BUILTIN", "LabeledCorpus", "builtin_classification", "builtin_documents", "load_labeled",
           "load_pairs", "load_texts", "split", "split_hashes"]

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class LabeledCorpus:
    """Classification examples `(text, label index)`; `label_names[i]` names label i."""

    examples: list[tuple[str, int]]
    label_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


# ------------------------------------------------------------------------------- reading files


def _read(path: pathlib.Path) -> str:
    """The file's text; DataError naming the line of the first byte that is not UTF-8."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror}); check the path and permissions") from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x}); re-encode the file as UTF-8"
        ) from e
    return text.removeprefix("\ufeff").replace("\r\n", "\n")


def _lines(path: pathlib.Path) -> Iterator[tuple[int, str]]:
    """(line number, line) for the file's non-blank lines, line endings removed."""
    for number, line in enumerate(_read(path).splitlines(), start=1):
        if line.strip():
            yield number, line


def _string(value: Any, path: pathlib.Path, number: int, field: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{path}:{number}: field {field!r} is a {type(value).__name__}, expected a string")
    return value


def _tsv(path: pathlib.Path, columns: tuple[str, str]) -> Iterator[tuple[int, str, str]]:
    """(line number, first, second) for each two-column row of a tab-separated file."""
    expected = f"{columns[0]}<TAB>{columns[1]}"
    for number, line in _lines(path):
        tabs = line.count("\t")
        if tabs != 1:
            what = "no tab" if tabs == 0 else f"{tabs} tabs"
            raise DataError(f"{path}:{number}: row has {what}; expected {expected}")
        first, second = line.split("\t")
        for name, value in zip(columns, (first, second)):
            if not value.strip():
                raise DataError(f"{path}:{number}: empty {name}; expected {expected}")
        yield number, first, second


def _nonempty(items: list[T], source: Source, what: str) -> list[T]:
    if not items:
        raise DataError(f"{source}: no {what} found; the corpus is empty")
    return items


# ------------------------------------------------------------------------------------ texts


def load_texts(source: Source = None, *, text_field: str = "text", unit: Unit = "paragraph") -> list[str]:
    """Documents for language modelling, all in memory (`sources.iter_texts` streams them).

    Plain text is cut into documents at blank lines (`unit="paragraph"`), at every line
    (`"line"`), or kept whole (`"file"`); each built-in topic counts as one file. A
    .jsonl line (or Parquet row) is one document, its `text_field`.
    """
    docs = list(iter_texts(source, text_field=text_field, unit=unit))
    return _nonempty(docs, BUILTIN if is_builtin(source) else source, "text")


# ------------------------------------------------------------------------------------ pairs


def load_pairs(
    source: Source, *, source_field: str = "source", target_field: str = "target"
) -> list[tuple[str, str]]:
    """(source, target) pairs for seq2seq: TSV rows `source<TAB>target`, or JSON lines."""
    if is_builtin(source):
        raise DataError(
            "there is no built-in seq2seq corpus; pass a TSV of source<TAB>target rows, or use "
            "the span_corruption objective (built-in text) or the copy/reverse tasks"
        )
    pairs: list[tuple[str, str]] = []
    for path in files(source, ("*.tsv", "*.jsonl")):
        if path.suffix in JSONL_SUFFIXES:
            for number, (src, tgt) in jsonl_records(path, (source_field, target_field)):
                pairs.append(
                    (_string(src, path, number, source_field), _string(tgt, path, number, target_field))
                )
        else:
            pairs.extend((src, tgt) for _, src, tgt in _tsv(path, ("source", "target")))
    return _nonempty(pairs, source, "pairs")


# ------------------------------------------------------------------------------ classification


def _label_order(names: set[str]) -> tuple[str, ...]:
    # Integer labels sort numerically, so "0".."9","10" keep their own values as indices.
    if all(re.fullmatch(r"-?\d+", n) for n in names):
        return tuple(sorted(names, key=int))
    return tuple(sorted(names))


def load_labeled(
    source: Source,
    *,
    text_field: str = "text",
    label_field: str = "label",
    label_names: Optional[Sequence[str]] = None,
) -> LabeledCorpus:
    """Classification examples: TSV rows `text<TAB>label`, or JSON lines with both fields.

    Labels become indices into `label_names`; by default the sorted set of labels seen
    (numerically when all are integers). Pass the training set's `label_names` when
    loading its validation set so both use the same indices; an unknown label is then
    an error naming its line. `source="builtin"` gives `builtin_classification()`.
    """
    if is_builtin(source):
        return builtin_classification()
    rows: list[tuple[pathlib.Path, int, str, str]] = []
    for path in files(source, ("*.tsv", "*.jsonl")):
        if path.suffix in JSONL_SUFFIXES:
            for number, (text, label) in jsonl_records(path, (text_field, label_field)):
                if not isinstance(label, (str, int)) or isinstance(label, bool):
                    raise DataError(
                        f"{path}:{number}: field {label_field!r} is a {type(label).__name__}, "
                        "expected a string or an integer"
                    )
                rows.append((path, number, _string(text, path, number, text_field), str(label)))
        else:
            rows.extend(
                (path, number, text, label.strip()) for number, text, label in _tsv(path, ("text", "label"))
            )
    _nonempty(rows, source, "labelled examples")
    names = tuple(label_names) if label_names is not None else _label_order({r[3] for r in rows})
    index = {name: i for i, name in enumerate(names)}
    examples = []
    for path, number, text, label in rows:
        if label not in index:
            raise DataError(f"{path}:{number}: label {label!r} is not one of {list(names)}")
        examples.append((text, index[label]))
    return LabeledCorpus(examples, names)


def builtin_classification(*, max_words: int = 20, min_words: int = 8, seed: int = 0) -> LabeledCorpus:
    """Word-order task from the built-in corpus: label 0 "original", 1 "shuffled".

    Each paragraph of the CPython documentation with at least `min_words` words, cut to
    its first `max_words` and with its whitespace collapsed to single spaces (so layout
    cannot give the label away), is one example: 1,799 of them with the defaults. A
    seeded half, exactly, have their inner words put in a random order that differs
    from the original; the first and last words stay, so a capital at the start or a
    full stop at the end does not give the label away either. Both classes hold the same
    words, so counting tokens cannot solve it; a model must learn word order. (A
    word-bigram lookup built from the training split scores about 85% on validation.)
    """
    rng = np.random.default_rng(seed)
    paragraphs = []
    for unit in load_texts(BUILTIN, unit="paragraph"):
        words = unit.split()[:max_words]
        if len(words) >= min_words and len(set(words[1:-1])) > 1:
            paragraphs.append(words)
    shuffled = np.zeros(len(paragraphs), dtype=bool)
    shuffled[rng.permutation(len(paragraphs))[: len(paragraphs) // 2]] = True
    examples = []
    for words, is_shuffled in zip(paragraphs, shuffled):
        if is_shuffled:
            inner = words[1:-1]
            order = np.arange(len(inner))
            # Two distinct inner words guarantee some order differs; redraw until one does.
            while [inner[i] for i in order] == inner:
                order = rng.permutation(len(inner))
            words = [words[0]] + [inner[i] for i in order] + [words[-1]]
        examples.append((" ".join(words), int(is_shuffled)))
    return LabeledCorpus(examples, ("original", "shuffled"))


# ---------------------------------------------------------------------------------- splitting

SPLIT_METHODS = ("hash", "tail")
_U64 = np.uint64


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijection of uint64 whose outputs look random."""
    x = x ^ (x >> _U64(30))
    x = x * _U64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> _U64(27))
    x = x * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


def split_hashes(texts: Sequence[str], seed: int = 0) -> np.ndarray:
    """The split hash of each text (uint64): CRC-32 and length of its UTF-8, mixed with the seed.

    What `split` ranks items by and what a token store keeps per document. About ten
    times cheaper than a cryptographic hash per document; the split needs only
    determinism and well-spread ranks, and identical texts share a hash.
    """
    data = [t.encode("utf-8", "surrogatepass") for t in texts]
    crc = np.fromiter(map(zlib.crc32, data), np.uint64, len(data))
    size = np.fromiter(map(len, data), np.uint64, len(data)) & _U64(0xFFFFFFFF)
    key = _mix(np.array([seed & 0xFFFFFFFFFFFFFFFF], np.uint64))
    return _mix(((crc << _U64(32)) | size) + key)


def split_text(item) -> str:
    """What `split` hashes for an item: a string itself, anything else its JSON (`str` of what
    JSON cannot hold, e.g. a fine-tuning record's fields)."""
    return item if isinstance(item, str) else json.dumps(item, default=str)


def split(
    items: Sequence[T], val_fraction: float, *, seed: int = 0, method: str = "hash"
) -> tuple[list[T], list[T]]:
    """(train, validation), deterministic and disjoint, both in the input's order.

    method="hash": each item is ranked by `split_hashes` of its text (a non-string item:
    of its JSON), and the lowest-ranked `round(val_fraction * len(items))` (at least
    one) go to validation. The split does not depend on the input order, and identical
    items land on the same side. method="tail": the last that many items, in corpus
    order, are validation (a held-out block, as for time-ordered corpora; `seed` is
    unused).
    """
    if method not in SPLIT_METHODS:
        raise DataError(f"split method {method!r} is not one of {', '.join(SPLIT_METHODS)}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction} must be in [0, 1)")
    if val_fraction == 0.0:
        return list(items), []
    if len(items) < 2:
        raise DataError(f"cannot split {len(items)} item(s) into train and validation; add data")
    n_val = min(max(1, round(val_fraction * len(items))), len(items) - 1)
    if method == "tail":
        return list(items[: len(items) - n_val]), list(items[len(items) - n_val :])
    hashes = split_hashes([split_text(i) for i in items], seed)
    threshold = np.partition(hashes, n_val - 1)[n_val - 1]
    train = [item for item, h in zip(items, hashes) if h > threshold]
    val = [item for item, h in zip(items, hashes) if h <= threshold]
    if not train:
        raise DataError(f"all {len(items)} items are identical; cannot split them")
    return train, val
