"""Streaming readers: the fast block reader cuts documents exactly as line by line would."""

import random

import numpy as np
import pytest

from flaxformer_lite.data import DataError, load_texts, sources


@pytest.mark.parametrize("block_bytes", [1, 2, 7, 1 << 22])
def test_block_reader_equals_line_by_line(tmp_path, monkeypatch, block_bytes):
    monkeypatch.setattr(sources, "BLOCK_BYTES", block_bytes)
    rng = random.Random(block_bytes)
    atoms = ["a", "bb", " ", "\t", "\n", "\n", "\r\n", "  \n", "\ufeff", "é", "\x0c", "\n\n", " \t \n", "\r"]
    f = tmp_path / "t.txt"
    for _ in range(150):
        f.write_bytes("".join(rng.choice(atoms) for _ in range(rng.randint(0, 50))).encode())
        lines = list(sources._lines(f, "strict", sources.ReadStats()))
        paragraphs = [p for p in sources._paragraphs(iter(lines)) if p.strip()]
        pieces = [p for _, line in lines for p in line.splitlines() if p.strip()]
        stats = sources.ReadStats()
        assert list(sources.file_texts(f, unit="paragraph", stats=stats)) == paragraphs
        assert stats.bytes_read == f.stat().st_size
        assert list(sources.file_texts(f, unit="line")) == pieces


def test_replaced_bytes_are_counted_with_their_line(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "BLOCK_BYTES", 5)
    f = tmp_path / "bad.txt"
    f.write_bytes(b"good line\n\nx\xff\xfey\nmore \xc3\n")
    stats = sources.ReadStats()
    docs = list(sources.file_texts(f, errors="replace", stats=stats))
    assert docs == ["good line", "x\ufffd\ufffdy\nmore \ufffd"]
    assert stats.replaced == 3 and stats.first_replaced == f"{f}:3"


def test_datasets_save_to_disk_folders_and_arrow_files(tmp_path):
    import datasets
    import pyarrow as pa

    from flaxformer_lite.data import PrepareOptions, Store, prepare
    from flaxformer_lite.data.tokenizers import ByteTokenizer

    rng = np.random.default_rng(3)
    texts = ["".join(rng.choice(list("abc dé東😀\n"), int(rng.integers(0, 40)))) for _ in range(300)]
    expected = [t for t in texts if t.strip()]
    ds = datasets.Dataset.from_dict({"id": list(range(len(texts))), "content": texts})
    ds.save_to_disk(str(tmp_path / "saved"), num_shards=3)  # written locally; nothing is downloaded
    assert len(list((tmp_path / "saved").glob("*.arrow"))) == 3
    assert load_texts(tmp_path / "saved", text_field="content") == expected
    one = sorted((tmp_path / "saved").glob("*.arrow"))[0]
    assert load_texts(one, text_field="content") == expected[: len(load_texts(one, text_field="content"))]
    with pa.ipc.new_file(str(tmp_path / "file_format.arrow"), ds.data.table.schema) as writer:  # the other format
        writer.write_table(ds.data.table)
    assert load_texts(tmp_path / "file_format.arrow", text_field="content") == expected
    out = prepare(tmp_path / "saved", tmp_path / "d", PrepareOptions(text_field="content", val_fraction=0.0),
                  progress=False)
    docs = Store.open(out).documents("all")
    assert [ByteTokenizer().decode(docs.tokens(i)) for i in range(len(docs))] == expected
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DataError, match=r"dict: a datasets DatasetDict folder; pass one of its splits \(test, train\)"):
        load_texts(tmp_path / "dict")
    with pytest.raises(DataError, match=r"saved/data-00000-of-00003\.arrow: no column 'text' \(columns: id, content\)"):
        load_texts(tmp_path / "saved")
