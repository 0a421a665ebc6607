"""`prepare`: tokenize a corpus once into a token store (see store.py for the format).

    prepare("corpus/", "data/web", PrepareOptions(tokenizer="tok.json"), workers=2)
    # or, scaled out over N machines or a job array, then one merge:
    prepare("corpus/", "data/web", options, part=(i, n))     # on machine i
    merge("data/web")                                         # once all parts are done
    path = cached("corpus.txt", options)    # what `train` does with a plain corpus

Each source file is tokenized on its own by `prepare_source` (the unit a worker
process, a job-array task, or a Ray/Beam task runs) into chunks of at most
`shard_tokens` tokens. Memory stays flat: documents stream in, ids stream out.

`objective="sft"` or `"dpo"` prepares JSON lines of fine-tuning examples instead
(data/finetune.py): each example is rendered with the tokenizer folder's chat template
and tokenized once, and stored with its loss mask (a DPO pair as one document, chosen
then rejected); the manifest records the template's hash. Their sources are tokenized
in the calling process (a chat template renders under the GIL).

Safety: every file is written under a temporary name, flushed to disk and renamed; a
chunk's .json is written last, and the manifest only when every source is complete. An
interrupted prepare leaves no manifest, so `train` never reads a half-made store; run
again with the same options, it keeps the finished chunks and continues within the
interrupted source. The output is a function of the input and options only: the same
bytes on every run, with any number of workers or parts.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import hashlib
import itertools
import json
import multiprocessing
import os
import pathlib
import signal
import sys
import threading
import time
import warnings
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
from tqdm import tqdm

from flaxformer_lite.data import corpora, encoders, finetune, sources, store
from flaxformer_lite.data.chat import ChatTemplate, tokenizer_template
from flaxformer_lite.data.errors import DataError
from flaxformer_lite.data.tokenizers import Tokenizer, load_tokenizer
from flaxformer_lite.runtime.host import cache_root

BATCH_DOCUMENTS = 512  # documents tokenized in one call
Progress = Callable[[int, int, int], None]  # (bytes, documents, tokens) just done


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
    """Everything besides the corpus that decides a store's bytes."""

    tokenizer: str = "byte"  # byte | path to tokenizer.json (or its folder)
    text_field: str = "text"
    document_unit: sources.Unit = "paragraph"
    val_fraction: float = 0.05
    split: str = "hash"  # hash | tail, as corpora.split
    seed: int = 0  # the hash split's key
    shard_tokens: int = 1 << 27  # tokens per chunk at most (256 MB of uint16)
    # Bytes that are not UTF-8: "replace" (with U+FFFD, counted and reported) or "strict"
    # (a DataError naming the file and line; what `train` on a plain corpus does).
    utf8_errors: str = "replace"
    # text: documents for the self-supervised objectives; sft, dpo: JSON lines of
    # fine-tuning examples, rendered with the tokenizer folder's chat template.
    objective: str = "text"

    def check(self) -> None:
        """DataError naming the option that is out of range."""
        sources.check_unit(self.document_unit)
        if self.objective not in store.OBJECTIVES:
            raise DataError(f"objective {self.objective!r} is not one of {', '.join(store.OBJECTIVES)}")
        if self.split not in corpora.SPLIT_METHODS:
            raise DataError(f"split {self.split!r} is not one of {', '.join(corpora.SPLIT_METHODS)}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise DataError(f"val_fraction={self.val_fraction} must be in [0, 1)")
        if self.utf8_errors not in ("replace", "strict"):
            raise DataError(f"utf8_errors={self.utf8_errors!r} is not one of 'replace', 'strict'")
        if self.shard_tokens < 1:
            raise DataError(f"shard_tokens={self.shard_tokens} must be >= 1")


def list_sources(corpus: sources.Source, objective: str = "text") -> list[dict]:
    """Each source file's name and identity (`sources.identity`), in reading order."""
    if objective != "text":
        return [{"name": str(p), **sources.identity(p)} for p in finetune.record_files(corpus, objective)]
    if sources.is_builtin(corpus):
        return [{"name": sources.BUILTIN, **sources.builtin_identity()}]
    return [{"name": str(p), **sources.identity(p)} for p in sources.files(corpus)]


def _identity(src: dict) -> dict:
    """What identifies a source's content: everything recorded but its name."""
    return {k: v for k, v in src.items() if k != "name"}


def _header(srcs: list[dict], options: PrepareOptions, tok: Tokenizer) -> dict:
    opts = dataclasses.asdict(options)
    opts.pop("tokenizer")
    header = {
        "format": store.FORMAT,
        "version": store.VERSION,
        "tokenizer": tok.identity,
        "vocab_size": tok.vocab_size,
        "dtype": store.token_dtype(tok.vocab_size).str,
        "options": opts,
        "sources": srcs,
    }
    if options.objective != "text":  # what rendering and encoding an example depend on besides the ids
        template = tokenizer_template(options.tokenizer)
        header["chat_template"] = None if template is None else dataclasses.asdict(template)
        header["roles"] = {r: finetune.optional_id(tok, r) for r in ("bos", "eos")}
    return header


def _check_same_job(record: pathlib.Path, theirs: dict, ours: dict) -> None:
    """DataError unless `ours` is the job `theirs` started: same options and source contents.

    Names may differ (a moved corpus); an edited source shows in its identity.
    """
    out = record.parent
    if theirs.get("version") != ours["version"]:
        raise DataError(f"{out} holds a prepare of store format {theirs.get('version')} by another flaxformer_lite "
                        f"({record}); pass a new --out, or delete the folder to start over")
    if {**theirs, "sources": None} != {**ours, "sources": None} or len(theirs["sources"]) != len(ours["sources"]):
        raise DataError(f"{out} holds a prepare of another corpus or other options ({record}); pass a new --out, "
                        "or delete the folder to start over")
    for old, new in zip(theirs["sources"], ours["sources"]):
        if _identity(old) != _identity(new):
            what = [k for k in ("size", "mtime_ns", "ends_sha256") if old.get(k) != new.get(k)]
            raise DataError(
                f"{new['name']}: changed ({', '.join(what)}) since {out} started preparing it: the store would "
                f"mix two versions of the file; delete {out} (or pass a new --out) and prepare again"
            )


# ---------------------------------------------------------------------------------- writing


def _write(f, data: bytes) -> None:
    """Every byte a prepare writes goes through here (tests inject a full disk)."""
    f.write(data)


def _write_file(path: pathlib.Path, data: bytes) -> None:
    """Write `path` atomically: a temporary file, flushed, then renamed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            _write(f, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _write_error(path, e) from e


def _write_error(path: pathlib.Path, e: OSError) -> DataError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DataError(
            f"{path}: disk full while preparing; free space (or pass another --out) and run prepare "
            "again: it keeps the finished shards and continues"
        )
    return DataError(f"{path}: cannot write ({e.strerror or e}); check the folder and its permissions")


def _json_bytes(value: dict) -> bytes:
    return (json.dumps(value, indent=1, sort_keys=True) + "\n").encode()


class _Chunk:
    """One shard being written: ids and document ends to temporary files, then renamed."""

    def __init__(self, shards: pathlib.Path, source: int, chunk: int, dtype: np.dtype, masks: bool = False):
        self.stem = f"{source:05d}-{chunk:04d}"
        keys = ("tokens", "docs", "mask") if masks else ("tokens", "docs")
        self.final = {k: shards / f"{self.stem}.{k}" for k in keys}
        # The pid keeps processes that prepare the same cache entry at once apart.
        self.tmp = {k: shards / f".{self.stem}.{k}.{os.getpid()}.tmp" for k in keys}
        self.dtype = dtype
        self.tokens = self.documents = 0
        self.max_id = -1
        self.sha = {k: hashlib.sha256() for k in self.final}
        self.files = {}
        for key, path in self.tmp.items():
            try:
                self.files[key] = open(path, "wb")
            except OSError as e:
                self.abort()
                raise _write_error(self.final[key], e) from e

    def _put(self, key: str, data: bytes) -> None:
        try:
            _write(self.files[key], data)
        except OSError as e:
            self.abort()
            raise _write_error(self.final[key], e) from e
        self.sha[key].update(data)

    def add(self, docs: Sequence[np.ndarray], hashes: Sequence[int], masks: Optional[Sequence[np.ndarray]] = None) -> None:
        """Append documents (arrays of ids), their split hashes and (sft/dpo) mask bytes."""
        lengths = np.fromiter(map(len, docs), np.int64, len(docs))
        flat = np.concatenate(docs)
        if flat.size:
            self.max_id = max(self.max_id, int(flat.max()))
        self._put("tokens", flat.astype(self.dtype).tobytes())
        if masks is not None:
            self._put("mask", np.concatenate(masks).astype(np.uint8).tobytes())
        ends = self.tokens + np.cumsum(lengths)
        self._put("docs", np.stack([ends.astype("<u8"), np.asarray(hashes, "<u8")], axis=1).tobytes())
        self.tokens = int(ends[-1])
        self.documents += len(docs)

    def finish(self, meta: dict) -> dict:
        """Flush, rename both files, then write the .json that marks the chunk done."""
        try:
            for f in self.files.values():
                f.flush()
                os.fsync(f.fileno())
                f.close()
            for key in self.final:
                os.replace(self.tmp[key], self.final[key])
        except OSError as e:
            self.abort()
            raise _write_error(self.final["tokens"], e) from e
        meta = {
            **meta,
            "files": {k: f"{store.SHARDS}/{p.name}" for k, p in self.final.items()},
            "tokens": self.tokens,
            "documents": self.documents,
            "max_id": self.max_id,
            "sha256": {k: h.hexdigest() for k, h in self.sha.items()},
        }
        _write_file(self.final["tokens"].with_suffix(".json"), _json_bytes(meta))
        return meta

    def abort(self) -> None:
        for key, f in self.files.items():
            f.close()
            self.tmp[key].unlink(missing_ok=True)


def _source_items(name: str, options: PrepareOptions, stats: sources.ReadStats) -> Iterator:
    """The texts of a source, or its fine-tuning records (objective sft or dpo)."""
    if options.objective != "text":
        return finetune.file_records(pathlib.Path(name), options.objective)
    if name == sources.BUILTIN:
        return sources.builtin_texts(options.document_unit, stats)
    return sources.file_texts(pathlib.Path(name), text_field=options.text_field, unit=options.document_unit,
                              errors=options.utf8_errors, stats=stats)


def _done_chunks(shards: pathlib.Path, index: int, src: dict) -> list[dict]:
    """The finished chunks of source `index` (empty if they are of another file)."""
    done = [store.read_json(p, "shard record") for p in sorted(shards.glob(f"{index:05d}-*.json"))]
    stale = any(_identity(d["source"]) != _identity(src) for d in done)
    if stale or [d["chunk"] for d in done] != list(range(len(done))):
        for p in shards.glob(f"{index:05d}-*"):
            p.unlink()
        return []
    return done


CHECK_EVERY = 64  # a faster encoder's batches compared with the tokenizer's own: the first, then 1 in this


class _EncodersDiffer(Exception):
    """tiktoken and the tokenizer gave different ids for a batch."""


def prepare_source(out, index: int, tokenizer: Optional[Tokenizer] = None,
                   progress: Optional[Progress] = None) -> list[dict]:
    """Tokenize source `index` of the prepare started in `out`; return its chunk records.

    The unit of work of `prepare`: independent of every other source, so any engine may
    run it (a process pool, a job array, Ray or Beam) once `start` has made `out`.
    Finished chunks are kept; an interrupted source continues after its last one.
    A faster encoder (`encoders.batch_encoder`) is compared with the tokenizer on the
    first batch and 1 in `CHECK_EVERY`; if they ever differ, the source is done again
    with the tokenizer alone.
    """
    out = pathlib.Path(out)
    header = store.read_json(out / store.PREPARE_FILE, "prepare record")
    options = PrepareOptions(tokenizer=_tokenizer_spec(out, header), **header["options"])
    tok = tokenizer or load_tokenizer(options.tokenizer)
    shards = out / store.SHARDS
    for stale in shards.glob(f".{index:05d}-*.tmp"):
        if not _alive(int(stale.name.split(".")[-2])):
            stale.unlink(missing_ok=True)
    if options.objective != "text":
        return _tokenize_source(out, header, index, options, _example_tokenizer(header, tok), progress)
    encode = encoders.batch_encoder(tok)[0]
    try:
        return _tokenize_source(out, header, index, options, _text_tokenizer(tok, encode), progress)
    except _EncodersDiffer:
        name = header["sources"][index]["name"]
        print(f"note: tiktoken and HF tokenizers differ on {name}; it is prepared again with HF tokenizers",
              file=sys.stderr)
        for path in shards.glob(f"{index:05d}-*"):
            path.unlink()
        return _tokenize_source(out, header, index, options, _text_tokenizer(tok, tok.encode_batch), progress)


# A batch of a source's items -> (ids per document, mask bytes per document or None, split texts).
ItemTokenizer = Callable[[list, int], tuple[list[np.ndarray], Optional[list[np.ndarray]], list[str]]]


def _text_tokenizer(tok: Tokenizer, encode: encoders.BatchEncoder) -> ItemTokenizer:
    """Texts: `encode`, compared with the tokenizer's own on the first batch and 1 in CHECK_EVERY."""
    def tokenize(batch: list[str], number: int):
        ids = encode(batch)
        if encode != tok.encode_batch and number % CHECK_EVERY == 0 and not all(
                map(np.array_equal, ids, tok.encode_batch(batch))):
            raise _EncodersDiffer
        return ids, None, batch
    return tokenize


def _example_tokenizer(header: dict, tok: Tokenizer) -> ItemTokenizer:
    """Fine-tuning records: rendered and tokenized (finetune.sft_tokens / dpo_tokens) with the
    template and the bos/eos the prepare started with; a DPO pair is chosen + rejected."""
    roles = {r: finetune.optional_id(tok, r) for r in ("bos", "eos")}
    if roles != header["roles"]:
        raise DataError(f"the tokenizer's bos/eos ids {roles} are not the {header['roles']} this prepare started "
                        "with; pass the tokenizer (folder) it was started with")
    template = header["chat_template"] and ChatTemplate(**header["chat_template"])
    dpo = header["options"]["objective"] == "dpo"

    def tokenize(batch: list[finetune.Record], number: int):
        ids, masks = [], []
        for record in batch:
            if dpo:
                chosen, chosen_mask, rejected, rejected_mask = finetune.dpo_tokens(record, tok, template)
                ids.append(np.concatenate([chosen, rejected]))
                masks.append(np.concatenate([chosen_mask * store.TRAINED,
                                             rejected_mask * store.TRAINED | store.REJECTED]))
            else:
                example, mask = finetune.sft_tokens(record, tok, template)
                ids.append(example)
                masks.append(mask * store.TRAINED)
        return ids, masks, [corpora.split_text(r) for r in batch]
    return tokenize


def _tokenize_source(out: pathlib.Path, header: dict, index: int, options: PrepareOptions,
                     tokenize: ItemTokenizer, progress: Optional[Progress]) -> list[dict]:
    src, dtype, shards = header["sources"][index], np.dtype(header["dtype"]), out / store.SHARDS
    done = _done_chunks(shards, index, src)
    if done and done[-1]["last"]:
        return done
    skip = sum(d["documents"] for d in done)
    stats = sources.ReadStats()
    items = _source_items(src["name"], options, stats)
    for _ in zip(range(skip), items):  # already in finished chunks: read, not tokenized
        pass
    hashing, masked = options.split == "hash", options.objective != "text"
    chunk = _Chunk(shards, index, len(done), dtype, masked)
    first_document, replaced_before, read_before = skip, stats.replaced, stats.bytes_read
    try:
        for number in itertools.count():
            batch = [t for _, t in zip(range(BATCH_DOCUMENTS), items)]
            if not batch:
                break
            ids, masks, texts = tokenize(batch, number)
            hashes = corpora.split_hashes(texts, options.seed) if hashing else np.zeros(len(batch), np.uint64)
            ends = np.cumsum([len(i) for i in ids])
            at = 0
            while at < len(batch):
                # The documents that fit, and one alone if even it does not.
                room = options.shard_tokens - chunk.tokens + (ends[at - 1] if at else 0)
                k = max(int(np.searchsorted(ends[at:], room, side="right")), 0 if chunk.documents else 1)
                if k:
                    chunk.add(ids[at : at + k], hashes[at : at + k], masks and masks[at : at + k])
                    at += k
                if at < len(batch):
                    meta = _chunk_meta(src, index, chunk, first_document, stats.replaced - replaced_before, False)
                    done.append(chunk.finish(meta))
                    first_document += chunk.documents
                    replaced_before = stats.replaced
                    chunk = _Chunk(shards, index, len(done), dtype, masked)
            if progress:
                progress(stats.bytes_read - read_before, len(batch), int(ends[-1]))
            read_before = stats.bytes_read
    except BaseException:
        chunk.abort()
        raise
    meta = _chunk_meta(src, index, chunk, first_document, stats.replaced - replaced_before, True)
    meta["first_replaced"] = stats.first_replaced
    done.append(chunk.finish(meta))
    return done


def _alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (its temporary files are in use)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _chunk_meta(src: dict, index: int, chunk: _Chunk, first_document: int, replaced: int, last: bool) -> dict:
    return {"source": src, "source_index": index, "chunk": int(chunk.stem[-4:]),
            "first_document": first_document, "replaced": replaced, "last": last}


def _tokenizer_spec(out: pathlib.Path, header: dict) -> str:
    """'byte', or the store's own copy of the tokenizer.json."""
    return "byte" if header["tokenizer"]["kind"] == "byte" else str(out / store.TOKENIZER_FILE)


# ---------------------------------------------------------------------------------- driving


def start(corpus: sources.Source, out, options: PrepareOptions, tokenizer: Optional[Tokenizer] = None) -> dict:
    """Make `out` (or check it holds a prepare of the same job); return its header.

    Writes prepare.json and the tokenizer copy. Every part of a scaled-out prepare calls
    it; they write the same bytes, so the order does not matter.
    """
    options.check()
    tok = tokenizer or load_tokenizer(options.tokenizer)
    header = _header(list_sources(corpus, options.objective), options, tok)
    out = pathlib.Path(out)
    record = out / store.PREPARE_FILE
    if record.is_file():
        theirs = store.read_json(record, "prepare record")
        _check_same_job(record, theirs, header)
        if theirs != header:  # the same files under new names (a moved corpus): read the new ones
            _write_file(record, _json_bytes(header))
        return header
    try:
        (out / store.SHARDS).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _write_error(out, e) from e
    if header["tokenizer"]["kind"] != "byte":
        _write_file(out / store.TOKENIZER_FILE, tok.to_str().encode())
    _write_file(record, _json_bytes(header))
    return header


class _Bar:
    """tqdm in input bytes, with documents/s and tokens/s beside it."""

    def __init__(self, total: Optional[int], enabled: bool, desc: str = "prepare"):
        # Shown after a second only: a small corpus prepares without a word.
        self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, disable=not enabled,
                        desc=desc, dynamic_ncols=True, mininterval=0.5, delay=1.0)
        self.started, self.docs, self.tokens = time.perf_counter(), 0, 0

    def __call__(self, nbytes: int, docs: int, tokens: int) -> None:
        self.docs, self.tokens = self.docs + docs, self.tokens + tokens
        seconds = max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix_str(f"{self.docs / seconds:,.0f} docs/s, {self.tokens / seconds:,.0f} tokens/s",
                                 refresh=False)
        self.bar.update(nbytes)

    def close(self) -> None:
        self.bar.close()


def prepare(
    corpus: sources.Source,
    out,
    options: PrepareOptions = PrepareOptions(),
    *,
    workers: int = 1,
    part: Optional[tuple[int, int]] = None,
    progress: bool = True,
    tokenizer: Optional[Tokenizer] = None,
) -> pathlib.Path:
    """Tokenize `corpus` into the store `out`; return `out`.

    workers: source files tokenized at once, in worker processes (a HF tokenizer also
      uses several threads of its own). part=(i, n): only sources i, i + n, ...; no
      manifest is written, `merge(out)` does that once all n parts are done.
    A finished store is left as it is; an unfinished one is continued.
    """
    out = pathlib.Path(out)
    if part is not None and not (part[1] >= 1 and 0 <= part[0] < part[1]):
        raise DataError(f"--part {part[0]}/{part[1]}: need 0 <= I < N")
    tok = tokenizer or load_tokenizer(options.tokenizer)
    header = start(corpus, out, options, tok)
    if (out / store.MANIFEST).is_file():
        return out
    note = encoders.batch_encoder(tok)[1] if options.objective == "text" else None
    if note:
        print(f"note: {note}", file=sys.stderr)
    mine = [i for i in range(len(header["sources"])) if part is None or i % part[1] == part[0]]
    plain = all(sources.kind(pathlib.Path(s["name"])) == "text" and not s["name"].endswith((".gz", ".zst"))
                for s in header["sources"])
    bar = _Bar(sum(header["sources"][i]["size"] for i in mine) if plain else None, progress, f"prepare {out}")
    try:
        if workers > 1 and len(mine) > 1 and options.objective == "text":
            _in_pool(out, mine, workers, bar)
        else:
            for i in mine:
                prepare_source(out, i, tok, bar)
    finally:
        bar.close()
    if part is None:
        merge(out)
    return out


def _in_pool(out: pathlib.Path, mine: list[int], workers: int, bar: _Bar) -> None:
    # spawn, not fork: the caller may hold threads (JAX, grain) that fork would copy broken.
    # Leaving the `with` (an error, Ctrl-C, SIGTERM) terminates the workers; a parent that is
    # killed outright takes them with it (`_worker_start`).
    context = multiprocessing.get_context("spawn")
    with _stop_on_sigterm(), context.Pool(workers, initializer=_worker_start, initargs=(os.getpid(),)) as pool:
        for chunks in pool.imap_unordered(_prepare_in_worker, [(out, i) for i in mine]):
            src = chunks[0]["source"]
            bar(src["size"], sum(c["documents"] for c in chunks), sum(c["tokens"] for c in chunks))


def _prepare_in_worker(job: tuple[pathlib.Path, int]) -> list[dict]:
    return prepare_source(*job)


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _worker_start(parent: int) -> None:
    """Pool worker initializer: die with the parent, however it ends (SIGKILL included).

    Linux delivers SIGKILL to the worker when its parent exits (prctl PR_SET_PDEATHSIG);
    elsewhere a thread polls the parent. A parent that died before this ran is caught by
    the pid check. Ctrl-C is the parent's to handle: it terminates the pool.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
            raise OSError(ctypes.get_errno(), "prctl")
    except (OSError, AttributeError):
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    if os.getppid() != parent:
        os._exit(1)


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


@contextlib.contextmanager
def _stop_on_sigterm():
    """Within: SIGTERM stops prepare like Ctrl-C does (workers terminated, finished shards kept).

    It exits with status 143 after a `stopped:` line; the main thread only (where signals
    are delivered), elsewhere it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        print("stopped: prepare got SIGTERM; run it again with the same options to continue", file=sys.stderr)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def merge(out) -> dict:
    """Write the manifest over every source's chunks (all parts must be done); return it."""
    out = pathlib.Path(out)
    header = store.read_json(out / store.PREPARE_FILE, "prepare record")
    shards, missing, chunks = out / store.SHARDS, [], []
    for index, src in enumerate(header["sources"]):
        done = [store.read_json(p, "shard record") for p in sorted(shards.glob(f"{index:05d}-*.json"))]
        if not done or not done[-1]["last"] or any(_identity(d["source"]) != _identity(src) for d in done):
            missing.append(index)
        chunks.extend(done)
    if missing:
        names = ", ".join(header["sources"][i]["name"] for i in missing[:3])
        raise DataError(
            f"{out}: {len(missing)} of {len(header['sources'])} sources are not prepared yet ({names}"
            f"{', ...' if len(missing) > 3 else ''}); run the missing --part(s), or prepare without --part"
        )
    options = header["options"]
    documents = sum(c["documents"] for c in chunks)
    if documents == 0:
        names = ", ".join(s["name"] for s in header["sources"][:3])
        raise DataError(f"{names}: no text found; the corpus is empty")
    replaced = sum(c["replaced"] for c in chunks)
    if replaced:
        first = next((c["first_replaced"] for c in chunks if c.get("first_replaced")), "an unknown place")
        warnings.warn(f"{replaced} invalid UTF-8 sequences were replaced with U+FFFD (the first at {first})",
                      stacklevel=2)
    manifest = {
        **{k: header[k] for k in ("format", "version", "tokenizer", "vocab_size", "dtype", "sources")},
        "objective": options.get("objective", "text"),
        "document_unit": options["document_unit"],
        "text_field": options["text_field"],
        "split": _split_rule(out, chunks, options, documents),
        "documents": documents,
        "tokens": sum(c["tokens"] for c in chunks),
        "max_id": max(c["max_id"] for c in chunks),
        "replaced_utf8_sequences": replaced,
        "shards": [{k: c[k] for k in ("files", "tokens", "documents", "max_id", "sha256")} for c in chunks],
    }
    if "chat_template" in header:
        template = header["chat_template"] and store.chat_template_record(ChatTemplate(**header["chat_template"]))
        manifest["chat_template"] = template
    _write_file(out / store.MANIFEST, _json_bytes(manifest))
    return manifest


def _split_rule(out: pathlib.Path, chunks: list[dict], options: dict, documents: int) -> dict:
    """The manifest's split: `corpora.split`'s rule over every document's stored hash."""
    hashes = store.read_hashes(out, chunks) if options["split"] == "hash" and options["val_fraction"] else None
    return store.split_rule(hashes, documents, options["split"], options["val_fraction"], options["seed"])


# ------------------------------------------------------------------------------------ cache


def content_key(corpus: sources.Source, options: PrepareOptions, tok: Tokenizer) -> str:
    """Hex digest of the corpus's bytes, the options and the tokenizer: the cache key."""
    digest = hashlib.sha256()
    header = _header([], options, tok)
    digest.update(_json_bytes(header))
    if sources.is_builtin(corpus):
        for doc in sources.builtin_documents():
            digest.update(hashlib.sha256(doc.encode()).digest())
    else:
        for path in sources.files(corpus):
            digest.update(store.file_sha256(path).encode())
    return digest.hexdigest()


def cached(corpus: sources.Source, options: PrepareOptions, *, tokenizer: Optional[Tokenizer] = None,
           progress: bool = True) -> pathlib.Path:
    """The store of `corpus` in the cache, prepared first if it is not there yet.

    Keyed by the corpus's content, the options and the tokenizer, so a second run, a
    resume or another process on the same machine opens it at once, and an edited
    corpus gets a new entry. Entries are never deleted automatically.
    """
    tok = tokenizer or load_tokenizer(options.tokenizer)
    out = cache_root() / "data" / content_key(corpus, options, tok)[:32]
    if not (out / store.MANIFEST).is_file():
        prepare(corpus, out, options, progress=progress, tokenizer=tok)
    return out


def corpus_store(corpus: sources.Source, options: PrepareOptions, *, vocab_size: int, verify: bool = True,
                 tokenizer: Optional[Tokenizer] = None, progress: bool = True) -> store.Store:
    """The store a run reads: `corpus` itself when it is a DATADIR (checked against the
    tokenizer; its split is its own), else the cache's store of it (prepared if needed,
    with the options' split)."""
    tok = tokenizer or load_tokenizer(options.tokenizer)
    if not store.is_store(corpus):
        corpus = cached(corpus, options, tokenizer=tok, progress=progress)
    opened = store.Store.open(corpus, verify=verify)
    opened.check_matches(tokenizer_identity=tok.identity, tokenizer_spec=options.tokenizer, vocab_size=vocab_size)
    return opened
