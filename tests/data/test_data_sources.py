"""Streaming readers: the fast block reader cuts documents exactly as line by line would."""

import random

import pytest

from flaxformer_lite.data import sources


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
