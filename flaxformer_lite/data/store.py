"""The token store: a corpus tokenized once into flat shards of ids, with a manifest.

    store = Store.open("data/web")            # DATADIR; shard sizes and checksums verified
    train_docs = store.documents("train")      # Documents: random access, read on demand
    ds = make_dataset("causal_lm", train_docs, tokenizer=tok, batch_size=32, seq_len=128)

On disk (`prepare` writes it; docs/data.md has the whole format):

    DATADIR/manifest.json           written last: its presence means the store is complete
    DATADIR/tokenizer.json          a copy of the tokenizer, when it is not the byte tokenizer
    DATADIR/prepare.json            the options and sources `prepare` was started with
    DATADIR/shards/SSSSS-CCCC.tokens   token ids of source S, chunk C, back to back (uint16
                                    when the vocabulary fits, else uint32; little-endian)
    DATADIR/shards/SSSSS-CCCC.docs  uint64 pairs per document: (end offset in .tokens,
                                    split hash)
    DATADIR/shards/SSSSS-CCCC.mask  sft/dpo stores only: one byte a token, bit 0 set where
                                    the loss covers the token, bit 1 on a DPO pair's rejected
                                    answer (a pair is one document: chosen, then rejected)
    DATADIR/shards/SSSSS-CCCC.json  the chunk's counts and checksums (written after the rest)

Documents are stored without bos/eos; the objectives add what they need. The split is
not baked into the files: the manifest records the rule (`hash`: documents whose split
hash is at most `threshold` are validation; `tail`: documents from `val_start` on) and
`documents(split)` applies it, so parts prepared on different machines merge without
rewriting a byte. The hash is `corpora.split_hashes`, so both give the same split.

A store holds the documents of an `objective`: "text" (any self-supervised objective) or
"sft"/"dpo" (examples rendered and tokenized once, with their loss masks; the manifest
records the chat template's hash so a run with another template is refused).

Format versions: 3 (this one) adds the objective, the chat template and the .mask files;
2 kept `corpora.split_hashes` (text only); 1 kept a keyed BLAKE2b of the document's JSON.
All are read: the rule is applied to whatever hashes the files hold, and a store without
an objective holds text.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Optional, Sequence

import numpy as np

from flaxformer_lite.data.errors import DataError

FORMAT = "flaxformer_lite token store"
VERSION = 3
MANIFEST = "manifest.json"
PREPARE_FILE = "prepare.json"
TOKENIZER_FILE = "tokenizer.json"
SHARDS = "shards"
SPLITS = ("train", "val", "all")
OBJECTIVES = ("text", "sft", "dpo")  # what a store's documents are for
TRAINED, REJECTED = 1, 2  # bits of a .mask byte
_CHUNK = 1 << 22  # bytes read at a time when checksumming


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def file_sha256(path: pathlib.Path) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def is_store(path) -> bool:
    """True when `path` is a folder holding a manifest.json (a prepared DATADIR)."""
    if path is None or isinstance(path, (list, tuple)):
        return False
    return (pathlib.Path(path) / MANIFEST).is_file()


def read_json(path: pathlib.Path, what: str) -> dict:
    """A JSON object from `path`; DataError naming the file if it is not one."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read the {what} ({e}); prepare the corpus again") from e
    if not isinstance(value, dict):
        raise DataError(f"{path}: the {what} is not a JSON object; prepare the corpus again")
    return value


def block(count: int, index: int, parts: int) -> range:
    """Items of contiguous part `index` of `parts` (sizes differ by at most one)."""
    if parts < 1 or not 0 <= index < parts:
        raise DataError(f"shard_index={index} must be in [0, shard_count={parts})")
    return range(index * count // parts, (index + 1) * count // parts)


def split_rule(hashes: Optional[np.ndarray], documents: int, method: str, val_fraction: float, seed: int) -> dict:
    """The manifest's split rule: `corpora.split`'s over `documents` documents.

    hash: validation is every document whose hash (uint64, in corpus order) is at most
    `threshold`, the n-th smallest for n = round(val_fraction * documents); tail: the
    documents from `val_start` on. `hashes` is unused for tail.
    """
    rule = {"method": method, "val_fraction": val_fraction, "seed": seed}
    if val_fraction == 0.0:
        return {**rule, "val_documents": 0, "val_start": documents, "threshold": None}
    if documents < 2:
        raise DataError(f"cannot split {documents} document(s) into train and validation; add data")
    n_val = min(max(1, round(val_fraction * documents)), documents - 1)
    if method == "tail":
        return {**rule, "val_documents": n_val, "val_start": documents - n_val}
    threshold = np.partition(hashes, n_val - 1)[n_val - 1]
    val = int(np.count_nonzero(hashes <= threshold))
    if val == documents:
        raise DataError(f"all {documents} documents are identical; cannot split them")
    return {**rule, "val_documents": val, "threshold": int(threshold)}


def read_hashes(path: pathlib.Path, shards: Sequence[dict]) -> np.ndarray:
    """Every document's split hash (uint64), in corpus order, from the shards' .docs files."""
    return np.concatenate([np.fromfile(path / s["files"]["docs"], "<u8").reshape(-1, 2)[:, 1] for s in shards])


# ------------------------------------------------------------------------------ documents


class ShardFile:
    """A shard file as a read-only 1-D array: `f[i]`, `f[a:b]`, `np.asarray(f)`, `len(f)`.

    Reads are positioned reads (`os.pread`) of just the bytes asked for. A memory map
    would do the same I/O, but every page it touches stays in the process's resident
    memory (with the kernel's fault-around, 64 KB a random read), so a long run would
    look as if it held the whole corpus. `stride=2` reads every other item (the end
    offsets of a .docs file). Pickles by path, so worker processes reopen the file.
    """

    def __init__(self, path: pathlib.Path, dtype: np.dtype, stride: int = 1):
        self.path, self.dtype, self.stride = pathlib.Path(path), np.dtype(dtype), stride
        self._len = self.path.stat().st_size // (self.dtype.itemsize * stride)
        self._fd: Optional[int] = None

    def __len__(self) -> int:
        return self._len

    def _read(self, first: int, count: int) -> np.ndarray:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        step = self.dtype.itemsize * self.stride
        return np.frombuffer(os.pread(self._fd, count * step, first * step), self.dtype)[:: self.stride]

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(self._len)
            if step != 1:
                raise IndexError("ShardFile slices take step 1")
            return self._read(start, max(stop - start, 0))
        if not 0 <= key < self._len:
            raise IndexError(key)
        return self._read(key, 1)[0]

    def __array__(self, dtype=None, copy=None):
        data = np.fromfile(self.path, self.dtype)[:: self.stride]
        return data if dtype is None else data.astype(dtype)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None}

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


class Documents:
    """Tokenized documents with random access, backed by flat token arrays.

    Array a holds its documents back to back; `ends[a][i]` is where its document i ends.
    The arrays are shard files (`ShardFile`, a Store) or one in-memory array (`from_arrays`).
    A Documents is a selection of those documents by global id (a `range` when it is
    contiguous, as for the tail split or a process's block), so it costs nothing per
    document until `lengths` is asked for, and reading a window touches only its own bytes.
    """

    def __init__(self, arrays: Sequence[np.ndarray], ends: Sequence[np.ndarray], ids=None, *,
                 max_id: int, name: str, masks: Optional[Sequence[np.ndarray]] = None):
        self._arrays, self._ends = list(arrays), list(ends)
        self._masks = None if masks is None else list(masks)  # a mask byte per token, beside each array
        self._first = np.concatenate([[0], np.cumsum([len(e) for e in self._ends])]).tolist()
        self._ids = range(self._first[-1]) if ids is None else ids
        self.max_id = max_id  # the largest id in any array (-1: none), for the vocab check
        self.name = name

    @classmethod
    def from_arrays(cls, docs: Sequence[np.ndarray], name: str = "documents") -> "Documents":
        """Documents held in memory, one array of ids each."""
        flat = np.concatenate([np.asarray(d, np.int32) for d in docs]) if len(docs) else np.zeros(0, np.int32)
        ends = np.cumsum([len(d) for d in docs], dtype=np.int64)
        return cls([flat], [ends], max_id=int(flat.max()) if flat.size else -1, name=name)

    def __len__(self) -> int:
        return len(self._ids)

    def _span(self, d: int) -> tuple[int, int, int]:
        """(index of its array, start, end) of document d."""
        g = int(self._ids[d])
        a = bisect.bisect_right(self._first, g) - 1
        i, ends = g - self._first[a], self._ends[a]
        return a, int(ends[i - 1]) if i else 0, int(ends[i])

    def length(self, d: int) -> int:
        """Tokens in document d."""
        _, start, end = self._span(d)
        return end - start

    @property
    def lengths(self) -> np.ndarray:
        """Tokens in each document (int64; computed, 8 bytes a document, not kept)."""
        every = np.empty(self._first[-1], np.int64)
        for first, ends in zip(self._first, self._ends):
            ends = np.asarray(ends, np.int64)
            part = every[first : first + len(ends)]
            part[:] = ends
            part[1:] -= ends[:-1]
        if isinstance(self._ids, range):
            return every[self._ids.start : self._ids.stop]
        return every[self._ids]

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def tokens(self, d: int) -> np.ndarray:
        """Document d's ids (int32)."""
        a, start, end = self._span(d)
        return np.asarray(self._arrays[a][start:end], np.int32)

    def mask(self, d: int) -> np.ndarray:
        """Document d's mask bytes (uint8; `TRAINED`, `REJECTED` bits), in an sft/dpo store."""
        if self._masks is None:
            raise DataError(f"{self.name} holds text documents without loss masks")
        a, start, end = self._span(d)
        return np.asarray(self._masks[a][start:end], np.uint8)

    def window(self, d: int, start: int, size: int, bos: Optional[int] = None, eos: Optional[int] = None) -> np.ndarray:
        """Ids [start, start + size) of document d as if it were [bos] + ids + [eos] (int32)."""
        a, first, last = self._span(d)
        array, pre, n = self._arrays[a], int(bos is not None), last - first
        total = pre + n + int(eos is not None)
        end = min(start + size, total)
        out = np.empty(max(end - start, 0), np.int32)
        lo, hi = max(start - pre, 0), min(end - pre, n)  # the stored ids this window covers
        at = 0
        if pre and start == 0 and end > 0:
            out[0], at = bos, 1
        if hi > lo:
            out[at : at + hi - lo] = array[first + lo : first + hi]
        if eos is not None and end == total and end > start:
            out[-1] = eos
        return out

    def select(self, indices, name: Optional[str] = None) -> "Documents":
        """The documents at `indices` (a range or an integer array), in that order."""
        if isinstance(indices, range) and isinstance(self._ids, range):
            ids = self._ids[indices.start : indices.stop]
        else:
            ids = np.asarray(self._ids)[np.asarray(indices)]
        return Documents(self._arrays, self._ends, ids, max_id=self.max_id, name=name or self.name, masks=self._masks)

    def shard(self, index: int, count: int) -> "Documents":
        """Process `index` of `count`'s contiguous block of documents (disjoint, covering all)."""
        mine = block(len(self), index, count)
        if count > 1 and not len(mine):
            raise DataError(
                f"shard {index} of {count} is empty: {self.name} has only {len(self)} documents; use "
                "more data or fewer processes"
            )
        return self.select(mine)


# ---------------------------------------------------------------------------------- store


@dataclasses.dataclass(frozen=True)
class Store:
    """A prepared DATADIR, opened; see the module docstring for its files."""

    path: pathlib.Path
    manifest: dict

    @classmethod
    def open(cls, path, *, verify: bool = True) -> "Store":
        """Read and check the manifest and the shard sizes; with `verify`, every checksum.

        Checksumming reads every shard once (about 1 s per GB on one core); the
        `data.verify_shards` config key turns it off for very large stores.
        """
        path = pathlib.Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise DataError(
                f"{path}: no {MANIFEST}; it is not a prepared corpus, or its prepare did not finish "
                "(run `flaxformer-lite prepare` again with the same options: it continues)"
            )
        manifest = read_json(manifest_path, "manifest")
        if manifest.get("format") != FORMAT:
            raise DataError(f"{manifest_path}: not a flaxformer_lite token store manifest")
        version = manifest.get("version")
        if not isinstance(version, int) or version > VERSION:
            raise DataError(
                f"{manifest_path}: format version {version} is newer than this flaxformer_lite reads "
                f"({VERSION}); upgrade flaxformer_lite or prepare the corpus again with this one"
            )
        store = cls(path, manifest)
        for shard in manifest["shards"]:
            store._check_shard(shard, verify)
        return store

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest["dtype"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def objective(self) -> str:
        """What the documents are for: "text" (stores before format 3 too), "sft" or "dpo"."""
        return self.manifest.get("objective", "text")

    def _check_shard(self, shard: dict, verify: bool) -> None:
        sizes = {"tokens": shard["tokens"] * self.dtype.itemsize, "docs": shard["documents"] * 16}
        if self.objective != "text":
            sizes["mask"] = shard["tokens"]
        for key, size in sizes.items():
            file = self.path / shard["files"][key]
            fix = "prepare the corpus again into a new folder"
            if not file.is_file():
                raise DataError(f"{file}: shard file missing; {fix}")
            if file.stat().st_size != size:
                raise DataError(
                    f"{file}: shard is truncated or damaged ({file.stat().st_size} bytes, the manifest "
                    f"says {size}); {fix}"
                )
            if verify and file_sha256(file) != shard["sha256"][key]:
                raise DataError(f"{file}: shard checksum does not match the manifest (corrupted); {fix}")

    def documents(self, split: str = "train") -> Documents:
        """The documents of a split ('train', 'val' or 'all'), in corpus order."""
        if split not in SPLITS:
            raise DataError(f"split {split!r} is not one of {', '.join(SPLITS)}")
        shards, rule = self.manifest["shards"], self.manifest["split"]
        n = sum(s["documents"] for s in shards)
        if split == "all":
            ids = range(n)
        elif rule["method"] == "tail" or rule.get("threshold") is None:
            self._check_rule(None, n)
            start = rule.get("val_start", n)
            ids = range(start) if split == "train" else range(start, n)
        else:  # hash: read each shard's hashes once, keep the chosen ids
            hashes = read_hashes(self.path, shards)
            self._check_rule(hashes, n)
            val = hashes <= np.uint64(rule["threshold"])
            ids = np.flatnonzero(val if split == "val" else ~val)
        if not len(ids):
            raise DataError(
                f"{self.path}: no {split} documents (prepared with val_fraction="
                f"{rule['val_fraction']}); prepare again with another --val-fraction"
            )
        arrays = [ShardFile(self.path / s["files"]["tokens"], self.dtype) for s in shards]
        ends = [ShardFile(self.path / s["files"]["docs"], np.dtype("<u8"), stride=2) for s in shards]
        max_id = max((s["max_id"] for s in shards), default=-1)
        masks = None if self.objective == "text" else [ShardFile(self.path / s["files"]["mask"], np.uint8) for s in shards]
        return Documents(arrays, ends, ids, max_id=max_id, name=f"{self.path} ({split})", masks=masks)

    def _check_rule(self, hashes: Optional[np.ndarray], documents: int) -> None:
        """DataError unless the manifest's split is the rule its own options give (an edit shows)."""
        rule = self.manifest["split"]
        try:
            expected = split_rule(hashes, documents, rule["method"], rule["val_fraction"], rule["seed"])
        except (DataError, KeyError, TypeError, ValueError) as e:
            expected = {"error": str(e)}
        if any(rule.get(k) != v for k, v in expected.items()):
            raise DataError(
                f"{self.path / MANIFEST}: its split {rule} does not match its shards' documents (expected "
                f"{expected}); the manifest was edited or damaged: prepare the corpus again into a new folder"
            )

    def check_matches(self, *, tokenizer_identity: dict, tokenizer_spec: str, vocab_size: int) -> None:
        """DataError naming both sides when the run's tokenizer or model disagrees with the manifest.

        The split is the store's own (`manifest["split"]`); a run on a DATADIR adopts it.
        """
        m, where = self.manifest, self.path / MANIFEST
        if m["tokenizer"] != tokenizer_identity:
            hint = self.path / TOKENIZER_FILE if (self.path / TOKENIZER_FILE).is_file() else "byte"
            raise DataError(
                f"data.tokenizer={tokenizer_spec} is {tokenizer_identity} but {where} was prepared with "
                f"{m['tokenizer']}: set data.tokenizer={hint}, or prepare the corpus with this tokenizer"
            )
        if m["max_id"] >= vocab_size:
            raise DataError(
                f"{where}: token id {m['max_id']} is outside [0, vocab_size={vocab_size}) of the model "
                f"(model.vocab_size; the tokenizer has {m['vocab_size']}): set model.vocab_size >= "
                f"{m['max_id'] + 1}, or use a smaller tokenizer"
            )

    def check_objective(self, objective: str, chat_template: Optional[dict]) -> None:
        """DataError unless the store's documents are for `objective` and, for sft/dpo, were
        rendered with the run's chat template (`chat_template_record` of it; None: none)."""
        where, ours = self.path / MANIFEST, self.objective
        wanted = objective if objective in ("sft", "dpo") else "text"
        if ours != wanted:
            what = "text documents" if ours == "text" else f"{ours} examples"
            fix = f"--objective {wanted}" if wanted != "text" else "without --objective"
            raise DataError(f"{where}: the store holds {what}, not what data.objective={objective} reads; prepare "
                            f"the corpus {fix}")
        theirs = self.manifest.get("chat_template")
        if ours != "text" and theirs is not None and theirs != chat_template:
            if chat_template is not None and chat_template["sha256"] == theirs["sha256"]:
                run = "the same template with other special tokens"
            else:
                run = "none" if chat_template is None else f"chat template sha256 {chat_template['sha256'][:12]}"
            raise DataError(
                f"{where}: rendered with chat template sha256 {theirs['sha256'][:12]} but data.tokenizer's folder "
                f"has {run}: set data.tokenizer to the folder the store was prepared with (or {self.path}), "
                "or prepare the corpus again with this one"
            )


def chat_template_record(template) -> Optional[dict]:
    """What a store's manifest records of a `data.chat.ChatTemplate` (None for None)."""
    if template is None:
        return None
    return {"sha256": template.sha256, "special_tokens": dict(sorted(template.special_tokens.items()))}
