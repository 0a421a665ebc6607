"""Streaming text sources: documents one at a time, in memory that does not grow with the corpus.

    for text in iter_texts("corpus/", unit="paragraph"):   # *.txt, *.jsonl[.gz|.zst], *.parquet
        ...
    stats = ReadStats()
    docs = iter_texts("web.jsonl.zst", text_field="text", errors="replace", stats=stats)

A source is "builtin" (or None): CPython's documentation text; a file; a folder (searched
recursively for the formats below); a glob pattern; or a list of those. Files are read in
sorted order. Formats, by file name:
  .jsonl .ndjson, also compressed .jsonl.gz .jsonl.zst: one JSON object a line, the
    document is its `text_field`;
  .parquet: the `text_field` column (the format HF datasets are stored in);
  .arrow: the same, from Arrow files (what `datasets` writes); a folder written by
    `Dataset.save_to_disk` is read in its own file order (its state.json);
  anything else: plain UTF-8 text, cut into documents by `unit`: at blank lines
    ("paragraph"), at every line ("line"), or kept whole ("file"; the built-in corpus:
    one topic).
Blank documents are skipped. Text is read a line at a time (Parquet: a row group at a
time), so only the "file" unit holds a whole file in memory.

Bytes that are not UTF-8 raise `DataError` naming the file and line (`errors="strict"`),
or are replaced with U+FFFD and counted in `ReadStats` (`errors="replace"`, what
`prepare` does).
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import hashlib
import importlib
import io
import json
import os
import pathlib
import re
from typing import IO, Iterator, Literal, Optional, Sequence, Union

from flaxformer_lite.data.errors import DataError

BUILTIN = "builtin"
Source = Union[None, str, "os.PathLike[str]", Sequence[Union[str, "os.PathLike[str]"]]]
Unit = Literal["paragraph", "line", "file"]
UNITS = ("paragraph", "line", "file")

JSONL_SUFFIXES = (".jsonl", ".ndjson")
# What a folder is searched for when it is a source of documents.
TEXT_PATTERNS = ("*.txt", "*.jsonl", "*.ndjson", "*.jsonl.gz", "*.jsonl.zst", "*.parquet", "*.arrow")
NEWLINE = b"\n"
_BLANK = " \t"  # a line of only these separates paragraphs
_PARAGRAPH_BREAK = re.compile(r"\n(?:[ \t]*\n)+")  # one or more such lines
BLOCK_BYTES = 1 << 22  # plain text is read this much at a time
_REPLACEMENT = "\ufffd".encode()


@dataclasses.dataclass
class ReadStats:
    """What reading saw: input bytes, and invalid UTF-8 sequences replaced (and where first)."""

    bytes_read: int = 0
    replaced: int = 0
    first_replaced: Optional[str] = None


def is_builtin(source: Source) -> bool:
    """True for the built-in corpus ("builtin" or None)."""
    return source is None or (isinstance(source, str) and source == BUILTIN)


def files(source: Source, folder_patterns: tuple[str, ...] = TEXT_PATTERNS) -> list[pathlib.Path]:
    """The files `source` names, in sorted order; DataError if it names none."""
    if isinstance(source, (list, tuple)):
        if not source:
            raise DataError("empty list of corpus paths; pass at least one file, folder or glob")
        return [f for s in source for f in files(s, folder_patterns)]
    path = pathlib.Path(source)
    if path.is_file():
        return [path]
    if path.is_dir() and folder_patterns == TEXT_PATTERNS and (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())
        raise DataError(f"{path}: a datasets DatasetDict folder; pass one of its splits ({', '.join(splits)}), "
                        f"e.g. {path / (splits[0] if splits else 'train')}")
    if path.is_dir() and folder_patterns == TEXT_PATTERNS and (path / "state.json").is_file():
        return _saved_dataset_files(path)
    if path.is_dir():
        found = sorted({f for pattern in folder_patterns for f in path.rglob(pattern) if f.is_file()})
        if not found:
            raise DataError(f"{path}: folder holds no {', '.join(folder_patterns)} files")
        return found
    if glob.has_magic(str(source)):
        found = sorted(pathlib.Path(f) for f in glob.glob(str(source), recursive=True))
        found = [f for f in found if f.is_file()]
        if not found:
            raise DataError(f"{source}: pattern matches no files")
        return found
    raise DataError(f"{path}: no such file or folder (corpus paths are files, folders or globs)")


def _saved_dataset_files(path: pathlib.Path) -> list[pathlib.Path]:
    """The Arrow files of a `datasets.Dataset.save_to_disk` folder, in the dataset's order."""
    try:
        state = json.loads((path / "state.json").read_text())
        found = [path / f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path / 'state.json'}: cannot read the dataset's file list ({e}); save it again") from e
    missing = [f for f in found if not f.is_file()]
    if missing or not found:
        raise DataError(f"{path}: the dataset's file {missing[0].name if missing else '(none)'} is missing; "
                        "save it again with save_to_disk")
    return found


def builtin_documents() -> list[str]:
    """CPython's documentation topics (`pydoc_data.topics`), one a document, sorted by name."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:
        raise DataError(
            "the built-in corpus needs the standard library's pydoc_data module, which this Python "
            "lacks; pass a corpus path instead"
        ) from e
    return [topics[name] for name in sorted(topics)]


def builtin_size() -> int:
    """UTF-8 bytes of the built-in corpus."""
    return sum(len(d.encode()) for d in builtin_documents())


IDENTITY_BYTES = 1 << 16  # hashed at each end of a file


def identity(path: pathlib.Path) -> dict:
    """What tells one version of a file from another without reading it all: its size,
    mtime and the SHA-256 of its first and last 64 KiB. Only an edit that keeps the size,
    falls between those ends and puts the old mtime back goes unseen."""
    try:
        stat = path.stat()
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            digest.update(f.read(IDENTITY_BYTES))
            if stat.st_size > IDENTITY_BYTES:
                f.seek(max(stat.st_size - IDENTITY_BYTES, IDENTITY_BYTES))
                digest.update(f.read(IDENTITY_BYTES))
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror}); check the path and permissions") from e
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ends_sha256": digest.hexdigest()}


def builtin_identity() -> dict:
    """`identity` of the built-in corpus: its size and the SHA-256 of all of it."""
    text = "\n".join(builtin_documents()).encode()
    return {"size": builtin_size(), "mtime_ns": None, "ends_sha256": hashlib.sha256(text).hexdigest()}


def kind(path: pathlib.Path) -> str:
    """'jsonl', 'parquet' or 'text', from the file name."""
    name = path.name
    if name.endswith((".gz", ".zst")):
        name = name.rsplit(".", 1)[0]
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".arrow"):
        return "arrow"
    return "text"


def _open(path: pathlib.Path) -> IO[bytes]:
    """The file's bytes, decompressed for .gz and .zst."""
    try:
        if path.name.endswith(".gz"):
            return gzip.open(path, "rb")
        if path.name.endswith(".zst"):
            zstandard = _optional("zstandard", path)
            return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
        return open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror}); check the path and permissions") from e


def _decode(data: bytes, path: pathlib.Path, line: int, errors: str, stats: ReadStats) -> str:
    """UTF-8 text of `data`, the bytes of `path` from line `line` on."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        where = f"{path}:{line + data.count(NEWLINE, 0, e.start)}"
        if errors == "strict":
            raise DataError(
                f"{where}: not valid UTF-8 (byte 0x{data[e.start]:02x}); re-encode the file as UTF-8, or "
                "`flaxformer-lite prepare` it (which replaces such bytes and counts them)"
            ) from e
        text = data.decode("utf-8", errors="replace")
        stats.replaced += text.count("\ufffd") - data.count(_REPLACEMENT)
        stats.first_replaced = stats.first_replaced or where
        return text


def _lines(path: pathlib.Path, errors: str, stats: ReadStats) -> Iterator[tuple[int, str]]:
    """(line number, line) of a text file, split at "\\n" only, without the line ending."""
    with _open(path) as f:
        try:
            for number, raw in enumerate(f, start=1):
                stats.bytes_read += len(raw)
                raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1] if raw.endswith(NEWLINE) else raw
                line = _decode(raw, path, number, errors, stats)
                yield number, line.removeprefix("\ufeff") if number == 1 else line
        except (OSError, EOFError) as e:  # a truncated .gz or .zst, an I/O error mid-file
            raise DataError(f"{path}: cannot read ({e}); the file is damaged or truncated") from e


def _paragraphs(lines: Iterator[tuple[int, str]]) -> Iterator[str]:
    """Runs of non-blank lines, joined: what `_PARAGRAPH_BREAK` splits a text into."""
    lines_of_paragraph: list[str] = []
    for _, line in lines:
        if line.strip(_BLANK):
            lines_of_paragraph.append(line)
        elif lines_of_paragraph:
            yield "\n".join(lines_of_paragraph)
            lines_of_paragraph = []
    if lines_of_paragraph:
        yield "\n".join(lines_of_paragraph)


def units(text: str, unit: Unit) -> Iterator[str]:
    """The documents of one text held in memory (a built-in topic, a whole file)."""
    numbered = enumerate(text.split("\n"), start=1)
    if unit == "paragraph":
        pieces: Iterator[str] = _paragraphs(numbered)
    elif unit == "line":
        pieces = (piece for _, line in numbered for piece in line.splitlines())
    else:
        pieces = iter([text.strip("\n")])
    return (p for p in pieces if p.strip())


def _blocks(path: pathlib.Path, errors: str, stats: ReadStats) -> Iterator[str]:
    """The file's text in blocks of whole lines ("\r\n" read as "\n", no BOM)."""
    line, rest = 1, b""
    with _open(path) as f:
        try:
            while True:
                data = f.read(BLOCK_BYTES)
                if data:
                    data = rest + data
                    cut = data.rfind(NEWLINE) + 1
                    if not cut:  # no whole line yet
                        rest = data
                        continue
                    data, rest = data[:cut], data[cut:]
                elif rest:  # the last line, without a newline
                    data, rest = rest, b""
                else:
                    return
                stats.bytes_read += len(data)
                text = _decode(data, path, line, errors, stats).replace("\r\n", "\n")
                yield text.removeprefix("\ufeff") if line == 1 else text
                line += data.count(NEWLINE)
        except (OSError, EOFError) as e:  # a truncated .gz or .zst, an I/O error mid-file
            raise DataError(f"{path}: cannot read ({e}); the file is damaged or truncated") from e


def _plain_texts(path: pathlib.Path, unit: Unit, errors: str, stats: ReadStats) -> Iterator[str]:
    """A text file's documents, read a block of lines at a time.

    Paragraphs are split with a regular expression over each block rather than line by
    line (several times faster); the piece after a block's last break is carried into the
    next block behind a "\n" that restores its line start, so the result is the same as
    `_paragraphs` over the file's lines.
    """
    if unit == "file":
        text = "".join(_blocks(path, errors, stats))
        yield from units(text, "file")
        return
    if unit == "line":
        for block in _blocks(path, errors, stats):
            yield from (p for p in block.splitlines() if p.strip())
        return
    carry = "\n"
    for block in _blocks(path, errors, stats):
        pieces = _PARAGRAPH_BREAK.split(carry + block)
        carry = "\n" + pieces.pop()
        yield from (p for p in (p.strip("\n") for p in pieces) if p.strip())
    yield from (p for p in (p.strip("\n") for p in _PARAGRAPH_BREAK.split(carry + "\n")) if p.strip())


def jsonl_objects(
    path: pathlib.Path, errors: str = "strict", stats: Optional[ReadStats] = None
) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank JSON line of the file."""
    for number, line in _lines(path, errors, stats or ReadStats()):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not valid JSON ({e.msg}); expected one object a line") from e
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: JSON line is a {type(record).__name__}, expected an object")
        yield number, record


def jsonl_records(
    path: pathlib.Path, fields: Sequence[str], errors: str = "strict", stats: Optional[ReadStats] = None
) -> Iterator[tuple[int, list]]:
    """(line number, [record[f] for f in fields]) for each JSON line of the file."""
    for number, record in jsonl_objects(path, errors, stats):
        missing = [f for f in fields if f not in record]
        if missing:
            raise DataError(
                f"{path}:{number}: no field {missing[0]!r} (fields: {', '.join(sorted(record)) or 'none'}); "
                "name the right one with text_field/label_field/source_field/target_field"
            )
        yield number, [record[f] for f in fields]


def _string(value, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} is a {type(value).__name__}, expected a string")
    return value


def _optional(module: str, path: pathlib.Path):
    """An optional reader's module; DataError saying how to install it if it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise DataError(
            f"{path}: reading it needs the {module.split('.')[0]} package: pip install 'flaxformer_lite[data]'"
        ) from e


def _record_batches(path: pathlib.Path, what: str):
    """(column names, record batches) of a Parquet or Arrow file, streamed."""
    pa = _optional("pyarrow", path)
    try:
        if what == "parquet":
            table = _optional("pyarrow.parquet", path).ParquetFile(path)
            names = table.schema_arrow.names
            return names, lambda columns: table.iter_batches(columns=columns, batch_size=1024)
        try:  # datasets writes the Arrow stream format; the file format is the other one
            reader = pa.ipc.open_stream(pa.memory_map(str(path)))
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(pa.memory_map(str(path)))
            return reader.schema.names, lambda columns: (
                reader.get_batch(i).select(columns) for i in range(reader.num_record_batches))
        return reader.schema.names, lambda columns: (batch.select(columns) for batch in reader)
    except Exception as e:  # pyarrow raises its own ArrowInvalid / OSError kinds
        raise DataError(f"{path}: cannot read as {what.capitalize()} ({e})") from e


def _column_texts(path: pathlib.Path, what: str, text_field: str, stats: ReadStats) -> Iterator[str]:
    names, batches = _record_batches(path, what)
    if text_field not in names:
        raise DataError(
            f"{path}: no column {text_field!r} (columns: {', '.join(names)}); name the right one with text_field"
        )
    row = 0
    for batch in batches([text_field]):
        for value in batch.column(0).to_pylist():
            row += 1
            if value is None:
                continue
            text = _string(value, f"{path}: row {row}", text_field)
            stats.bytes_read += len(text)
            yield text


def file_texts(
    path: pathlib.Path,
    *,
    text_field: str = "text",
    unit: Unit = "paragraph",
    errors: str = "strict",
    stats: Optional[ReadStats] = None,
) -> Iterator[str]:
    """The non-blank documents of one file (see the module docstring for formats)."""
    stats = stats if stats is not None else ReadStats()
    what = kind(path)
    if what == "jsonl":
        for number, (text,) in jsonl_records(path, (text_field,), errors, stats):
            if _string(text, f"{path}:{number}", text_field).strip():
                yield text
    elif what in ("parquet", "arrow"):
        yield from (t for t in _column_texts(path, what, text_field, stats) if t.strip())
    else:
        yield from _plain_texts(path, unit, errors, stats)


def builtin_texts(unit: Unit = "paragraph", stats: Optional[ReadStats] = None) -> Iterator[str]:
    """The built-in corpus's documents; each topic counts as one file."""
    for doc in builtin_documents():
        if stats is not None:
            stats.bytes_read += len(doc.encode())
        yield from units(doc, unit)


def check_unit(unit: str) -> None:
    """DataError unless `unit` is a document unit."""
    if unit not in UNITS:
        raise DataError(f"unit {unit!r} is not one of 'paragraph', 'line', 'file'")


def iter_texts(
    source: Source = None,
    *,
    text_field: str = "text",
    unit: Unit = "paragraph",
    errors: str = "strict",
    stats: Optional[ReadStats] = None,
) -> Iterator[str]:
    """Every non-blank document of `source`, streamed, in sorted file order."""
    check_unit(unit)
    if is_builtin(source):
        yield from builtin_texts(unit, stats)
        return
    for path in files(source):
        yield from file_texts(path, text_field=text_field, unit=unit, errors=errors, stats=stats)
