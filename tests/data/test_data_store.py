"""The token store: prepare, its on-disk guarantees, and streaming batches from it."""

import errno
import gzip
import json
import pathlib

import numpy as np
import pytest

from flaxformer_lite.data import (
    ByteTokenizer,
    DataError,
    PrepareOptions,
    Store,
    load_texts,
    make_dataset,
    merge,
    prepare,
    split,
)
from flaxformer_lite.data import preparation as prepare_lib
from flaxformer_lite.data import store as store_lib


def _words(rng, n):
    vocab = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyzé"), rng.integers(1, 9))) for _ in range(300)]
    return " ".join(rng.choice(vocab, n))


def _corpus(folder: pathlib.Path, files: int = 3, paragraphs: int = 40, seed: int = 0) -> pathlib.Path:
    """A few KB of random paragraphs (some longer than a row) in `files` text files."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        paras = [_words(rng, int(rng.integers(1, 60))) for _ in range(paragraphs)]
        (folder / f"part{f}.txt").write_text("\n\n".join(paras) + "\n")
    return folder


def _tree(root: pathlib.Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def datadir(corpus, tmp_path_factory):
    """The corpus prepared with small shards, so every source spans several."""
    return prepare(corpus, tmp_path_factory.mktemp("store") / "d", PrepareOptions(shard_tokens=700), progress=False)


def _batches(ds, n):
    it = iter(ds)
    out = [next(it) for _ in range(n)]
    it.close()
    return out


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# --------------------------------------------------------------------------- equality


@pytest.mark.parametrize("objective", ["causal_lm", "masked_lm", "span_corruption"])
def test_store_batches_equal_the_in_memory_path(objective, corpus, datadir):
    tok = ByteTokenizer()
    store = Store.open(datadir)
    assert len(store.manifest["shards"]) > 3
    texts_train, texts_val = split(load_texts(corpus), 0.05, seed=0)
    docs_train, docs_val = store.documents("train"), store.documents("val")
    assert [tok.decode(docs_train.tokens(i)) for i in range(len(docs_train))] == texts_train
    assert [tok.decode(docs_val.tokens(i)) for i in range(len(docs_val))] == texts_val
    kwargs = dict(tokenizer=tok, batch_size=4, seq_len=32, seed=3)
    for train, items, n in ((True, (texts_train, docs_train), 12), (False, (texts_val, docs_val), 3)):
        memory = _batches(make_dataset(objective, items[0], train=train, **kwargs), n)
        stored = _batches(make_dataset(objective, items[1], train=train, **kwargs), n)
        _assert_same(memory, stored)


def test_tail_split_is_the_last_documents(corpus, tmp_path):
    out = prepare(corpus, tmp_path / "d", PrepareOptions(split="tail", val_fraction=0.1), progress=False)
    tok, store = ByteTokenizer(), Store.open(out)
    train, val = split(load_texts(corpus), 0.1, method="tail")
    docs = store.documents("val")
    assert [tok.decode(docs.tokens(i)) for i in range(len(docs))] == val
    assert len(store.documents("train")) == len(train)


def test_processes_read_disjoint_blocks_that_cover_everything(datadir):
    docs = Store.open(datadir).documents("train")
    tok = ByteTokenizer()
    parts = [docs.shard(i, 2) for i in range(2)]
    texts = [[tok.decode(p.tokens(i)) for i in range(len(p))] for p in parts]
    assert texts[0] + texts[1] == [tok.decode(docs.tokens(i)) for i in range(len(docs))]
    assert abs(len(parts[0]) - len(parts[1])) <= 1
    # Through the pipeline: one evaluation pass of each process sees its own documents.
    seen = []
    for i in range(2):
        ds = make_dataset("causal_lm", docs, tokenizer=tok, batch_size=4, seq_len=512, train=False,
                          shard_index=i, shard_count=2, pack=False)
        rows = [r for b in ds for r, s in zip(b["input_ids"], b["segment_ids"]) if s.any()]
        seen.append({tok.decode(r) for r in rows})
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {tok.decode(docs.tokens(i)) for i in range(len(docs))}


def test_resume_is_exact_across_shard_boundaries(datadir):
    store = Store.open(datadir)
    docs = store.documents("train")
    ds = make_dataset("causal_lm", docs, tokenizer=ByteTokenizer(), batch_size=4, seq_len=32, seed=1)
    it = iter(ds)
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    expected = [next(it) for _ in range(8)]
    it.close()
    resumed = iter(ds)
    resumed.set_state(state)
    _assert_same([next(resumed) for _ in range(8)], expected)
    resumed.close()
    # Those batches hold text from more than one shard file.
    shard_ends = np.cumsum([s["tokens"] for s in store.manifest["shards"]])
    starts = np.concatenate([[0], shard_ends[:-1]])
    shard_text = [ByteTokenizer().decode(np.fromfile(datadir / s["files"]["tokens"], "<u2"))
                  for s in store.manifest["shards"]]
    rows = [ByteTokenizer().decode(r[r > 3][:12]) for b in expected for r in b["input_ids"]]
    touched = {i for row in rows for i, text in enumerate(shard_text) if len(row) == 12 and row in text}
    assert len(touched) > 1 and len(starts) > 1


# ------------------------------------------------------------------------------ prepare


def test_prepare_is_deterministic_and_records_what_it_made(corpus, datadir, tmp_path):
    again = prepare(corpus, tmp_path / "again", PrepareOptions(shard_tokens=700), workers=2, progress=False)
    assert _tree(again) == _tree(datadir)
    m = Store.open(datadir).manifest
    assert m["version"] == store_lib.VERSION and m["dtype"] == "<u2" and m["vocab_size"] == 360
    assert m["tokenizer"] == {"kind": "byte", "num_sentinels": 100}
    assert [s["name"] for s in m["sources"]] == [str(corpus / f"part{i}.txt") for i in range(3)]
    assert [s["size"] for s in m["sources"]] == [(corpus / f"part{i}.txt").stat().st_size for i in range(3)]
    assert m["documents"] == len(load_texts(corpus)) == sum(s["documents"] for s in m["shards"])
    assert m["tokens"] == sum(len(t.encode()) for t in load_texts(corpus))
    for s in m["shards"]:
        assert store_lib.file_sha256(datadir / s["files"]["tokens"]) == s["sha256"]["tokens"]
        assert s["tokens"] <= 700 or s["documents"] == 1
    assert not list(datadir.rglob("*.tmp"))


def test_interrupted_prepare_leaves_no_store_and_continues(corpus, datadir, tmp_path, monkeypatch):
    real_finish = prepare_lib._Chunk.finish
    finished = []

    def finish_then_stop(self, meta):
        if len(finished) == 4:
            raise KeyboardInterrupt
        finished.append(self.stem)
        return real_finish(self, meta)

    monkeypatch.setattr(prepare_lib._Chunk, "finish", finish_then_stop)
    out = tmp_path / "d"
    with pytest.raises(KeyboardInterrupt):
        prepare(corpus, out, PrepareOptions(shard_tokens=700), progress=False)
    assert not (out / "manifest.json").exists() and not list(out.rglob("*.tmp"))
    with pytest.raises(DataError, match=r"no manifest\.json; .*\(run `flaxformer-lite prepare` again"):
        Store.open(out)
    monkeypatch.setattr(prepare_lib._Chunk, "finish", real_finish)
    redone = []
    monkeypatch.setattr(prepare_lib._Chunk, "__init__", _spy(prepare_lib._Chunk.__init__, redone))
    prepare(corpus, out, PrepareOptions(shard_tokens=700), progress=False)
    assert _tree(out) == _tree(datadir)
    assert not {f"{s:05d}-{c:04d}" for s, c in redone} & set(finished)  # finished chunks kept


def _spy(init, calls):
    def wrapped(self, shards, source, chunk, *rest):
        calls.append((source, chunk))
        init(self, shards, source, chunk, *rest)

    return wrapped


def test_parts_merged_equal_one_prepare(corpus, datadir, tmp_path):
    out = tmp_path / "parts"
    options = PrepareOptions(shard_tokens=700)
    prepare(corpus, out, options, part=(1, 2), progress=False)
    with pytest.raises(DataError, match=r"2 of 3 sources are not prepared yet .*part0\.txt, .*part2\.txt"):
        merge(out)
    prepare(corpus, out, options, part=(0, 2), progress=False)
    assert not (out / "manifest.json").exists()
    merge(out)
    assert _tree(out) == _tree(datadir)


def test_compressed_jsonl_and_parquet_read_like_plain_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    rng = np.random.default_rng(1)
    rows = [{"body": _words(rng, int(rng.integers(1, 30))), "id": i} for i in range(50)] + [{"body": "  "}]
    text = "".join(json.dumps(r) + "\n" for r in rows).encode()
    (tmp_path / "a.jsonl").write_bytes(text)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(text))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(text))
    pq.write_table(pa.table({"body": [r["body"] for r in rows]}), tmp_path / "d.parquet", row_group_size=16)
    expected = [r["body"] for r in rows[:-1]]
    for name in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "d.parquet"):
        assert load_texts(tmp_path / name, text_field="body") == expected, name
    out = prepare(tmp_path, tmp_path / "d", PrepareOptions(text_field="body", val_fraction=0.0), progress=False)
    docs, tok = Store.open(out).documents("all"), ByteTokenizer()
    assert [tok.decode(docs.tokens(i)) for i in range(len(docs))] == expected * 4
    with pytest.raises(DataError, match=r"d\.parquet: no column 'text' \(columns: body\); name the right one"):
        load_texts(tmp_path / "d.parquet")


def test_uint32_when_the_vocabulary_needs_it(tmp_path):
    class Wide(ByteTokenizer):
        vocab_size = 70_000

        def encode_batch(self, texts):
            return [ids + 65_000 for ids in super().encode_batch(texts)]

    (tmp_path / "c.txt").write_text("one\n\ntwo three\n")
    options = PrepareOptions(val_fraction=0.0)
    out = prepare(tmp_path / "c.txt", tmp_path / "d", options, progress=False, tokenizer=Wide())
    store = Store.open(out)
    assert store.manifest["dtype"] == "<u4"
    assert store.documents("all").tokens(1).tolist() == [65_004 + b for b in b"two three"]


# ---------------------------------------------------------------------------- bad input


def test_truncated_or_corrupted_shard_is_named(datadir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(datadir, copy)
    shard = copy / Store.open(copy).manifest["shards"][2]["files"]["tokens"]
    data = shard.read_bytes()
    shard.write_bytes(data[:-2])
    with pytest.raises(DataError, match=rf"{shard}: shard is truncated or damaged \(\d+ bytes, the manifest says"):
        Store.open(copy)
    shard.write_bytes(data[:10] + bytes([data[10] ^ 1]) + data[11:])
    with pytest.raises(DataError, match=rf"{shard}: shard checksum does not match the manifest \(corrupted\)"):
        Store.open(copy)
    Store.open(copy, verify=False)  # sizes only: opens


def test_manifest_from_a_newer_format(datadir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(datadir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "version": store_lib.VERSION + 1}))
    newer, ours = store_lib.VERSION + 1, store_lib.VERSION
    with pytest.raises(DataError, match=rf"format version {newer} is newer than this flaxformer_lite reads \({ours}\); "):
        Store.open(copy)


def test_config_that_disagrees_with_the_manifest_names_both(datadir, tmp_path):
    from flaxformer_lite.data import corpus_store, train_tokenizer

    bpe = train_tokenizer(["some text to learn from " * 20], vocab_size=300, out_path=tmp_path, num_sentinels=2)
    with pytest.raises(DataError, match=r"data\.tokenizer=.*tokenizer\.json.* but .*manifest\.json was prepared "
                                        r"with \{'kind': 'byte'.*set data\.tokenizer=byte"):
        corpus_store(datadir, PrepareOptions(tokenizer=bpe.name), vocab_size=400)
    with pytest.raises(DataError, match=r"manifest\.json: token id 1\d\d is outside \[0, vocab_size=150\) of the "
                                        r"model .*set model\.vocab_size >= \d+"):
        corpus_store(datadir, PrepareOptions(), vocab_size=150)
    # The split is the store's own, whatever the options say.
    split_docs = corpus_store(datadir, PrepareOptions(split="tail", val_fraction=0.1, seed=7), vocab_size=400)
    assert len(split_docs.documents("val")) == len(Store.open(datadir).documents("val"))


def test_other_options_into_the_same_folder_are_refused(corpus, datadir):
    with pytest.raises(DataError, match=r"holds a prepare of another corpus or other options"):
        prepare(corpus, datadir, PrepareOptions(shard_tokens=701), progress=False)


def test_a_prepare_started_by_the_format_1_code_is_not_continued(corpus, datadir, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    record = json.loads((datadir / "prepare.json").read_text())
    (old / "prepare.json").write_text(json.dumps({**record, "version": 1}))
    with pytest.raises(DataError, match=rf"{old} holds a prepare of store format 1 by another flaxformer_lite .*new --out"):
        prepare(corpus, old, PrepareOptions(shard_tokens=700), progress=False)


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n\n")
    with pytest.raises(DataError, match=r"empty\.txt: no text found; the corpus is empty"):
        prepare(tmp_path / "empty.txt", tmp_path / "d", progress=False)
    assert not (tmp_path / "d" / "manifest.json").exists()


def test_bytes_that_are_not_utf8_are_replaced_counted_and_reported(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n\nna\xefve \xe9t\xe9\n".encode("latin-1"))
    with pytest.warns(UserWarning, match=r"4 invalid UTF-8 sequences were replaced .* at .*latin1\.txt:1\)"):
        out = prepare(tmp_path / "latin1.txt", tmp_path / "d", PrepareOptions(val_fraction=0.0), progress=False)
    store = Store.open(out)
    assert store.manifest["replaced_utf8_sequences"] == 4
    docs = store.documents("all")
    assert [ByteTokenizer().decode(docs.tokens(i)) for i in range(2)] == ["caf\ufffd au lait", "na\ufffdve \ufffdt\ufffd"]


def test_disk_full_leaves_nothing_half_written_and_a_rerun_finishes(corpus, datadir, tmp_path, monkeypatch):
    written = []

    def fill_up(f, data):
        if sum(written) > 3000:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(len(data))
        f.write(data)

    monkeypatch.setattr(prepare_lib, "_write", fill_up)
    out = tmp_path / "d"
    with pytest.raises(DataError, match=r"shards/00000-000\d\.(tokens|docs): disk full while preparing; free space .* "
                                        r"run prepare again"):
        prepare(corpus, out, PrepareOptions(shard_tokens=700), progress=False)
    assert not (out / "manifest.json").exists() and not list(out.rglob("*.tmp"))
    monkeypatch.undo()
    prepare(corpus, out, PrepareOptions(shard_tokens=700), progress=False)
    assert _tree(out) == _tree(datadir)


# ------------------------------------------------------------------ versions, identity


TESTDATA = pathlib.Path(__file__).parents[1] / "testdata"


def test_a_format_1_store_still_loads_with_its_own_split():
    """store_v1 was written by the format-1 prepare (BLAKE2b of each document's JSON)."""
    import hashlib

    store = Store.open(TESTDATA / "store_v1")
    assert store.manifest["version"] == 1
    texts = load_texts(TESTDATA / "store_v1_corpus")
    rank = {t: hashlib.blake2b(json.dumps(t).encode(), digest_size=8, key=b"0").digest() for t in texts}
    n_val = round(0.2 * len(texts))
    threshold = sorted(rank.values())[n_val - 1]
    tok = ByteTokenizer()
    for name, keep in (("train", lambda h: h > threshold), ("val", lambda h: h <= threshold)):
        docs = store.documents(name)
        assert [tok.decode(docs.tokens(i)) for i in range(len(docs))] == [t for t in texts if keep(rank[t])]


def test_an_edited_split_in_the_manifest_is_refused(datadir, tmp_path):
    import shutil

    for key, value in (("threshold", lambda v: v + (1 << 60)), ("val_documents", lambda v: v + 1)):
        copy = tmp_path / key
        shutil.copytree(datadir, copy)
        manifest = json.loads((copy / "manifest.json").read_text())
        manifest["split"][key] = value(manifest["split"][key])
        (copy / "manifest.json").write_text(json.dumps(manifest))
        store = Store.open(copy)
        with pytest.raises(DataError, match=rf"{copy}/manifest\.json: its split .* does not match its shards' "
                                            r"documents .*edited or damaged"):
            store.documents("val")


def test_a_source_edited_between_runs_is_not_mixed_into_the_store(corpus, tmp_path, monkeypatch):
    import os
    import shutil

    src = tmp_path / "corpus"
    shutil.copytree(corpus, src)
    out = tmp_path / "d"
    real_finish = prepare_lib._Chunk.finish

    def stop_after_first(self, meta):
        real_finish(self, meta)
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_lib._Chunk, "finish", stop_after_first)
    with pytest.raises(KeyboardInterrupt):
        prepare(src, out, PrepareOptions(shard_tokens=700), progress=False)
    monkeypatch.undo()
    edited = src / "part0.txt"
    data, stat = edited.read_bytes(), edited.stat()
    for where, what in ((0, "ends_sha256"), (len(data) // 2, "mtime_ns, ends_sha256")):  # same size
        changed = bytearray(data)
        changed[where : where + 2] = b"zz" if changed[where : where + 2] != b"zz" else b"yy"
        edited.write_bytes(bytes(changed))
        if where == 0:  # the old mtime put back
            os.utime(edited, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        with pytest.raises(DataError, match=rf"{edited}: changed \({what}\) since {out} started "
                                            r"preparing it: .* delete"):
            prepare(src, out, PrepareOptions(shard_tokens=700), progress=False)
    assert not (out / "manifest.json").exists()


def test_a_moved_corpus_continues(corpus, tmp_path, monkeypatch):
    import shutil

    src = tmp_path / "corpus"
    shutil.copytree(corpus, src)  # copytree keeps mtimes, as mv does
    out = tmp_path / "d"
    monkeypatch.setattr(prepare_lib, "prepare_source", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        prepare(src, out, PrepareOptions(shard_tokens=700), progress=False)
    monkeypatch.undo()
    src.rename(tmp_path / "moved")
    prepare(tmp_path / "moved", out, PrepareOptions(shard_tokens=700), progress=False)
    assert [s["name"] for s in Store.open(out).manifest["sources"]][0].startswith(str(tmp_path / "moved"))
