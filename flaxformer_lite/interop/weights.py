"""Safetensors weight files of an HF folder, read and written one tensor at a time.

A folder holds model.safetensors, or shards listed in model.safetensors.index.json
(`{"weight_map": {tensor: file}}`), as transformers' `save_pretrained(max_shard_size=...)`
writes them. Reading and writing both go tensor by tensor, so a checkpoint never needs
to fit in host memory twice.

Reading: `safe_open` checks each file's header (offsets inside the file, sizes matching
shapes); the bytes are then read in row chunks into a few reused buffers (`_File`): what
the page cache holds is copied from it, the rest read straight from the disk (O_DIRECT)
where the file system allows, so a cold read neither fills the page cache nor pays for
it. safe_open's own tensors are copied out of a memory map that stays mapped until the file
is closed, and every page touched counts in the process's resident memory: reading each
tensor of a 1 GB file through it added 1 GB of RSS until the file was closed.

Writing: each file's header is computed from shapes and dtypes before any tensor
exists; then each tensor is made, written and dropped.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import dataclasses
import functools
import json
import math
import mmap
import os
import pathlib
import queue
import re
from typing import Callable, Iterable, Optional, Sequence

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from flaxformer_lite.interop.layout import HFError

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLED_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")
SHARD_FILE = "model-{index:05d}-of-{count:05d}.safetensors"  # transformers' names
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
DEFAULT_MAX_SHARD_SIZE = "50GB"  # transformers 5's save_pretrained default
CHUNK_BYTES = 16 << 20  # read size: large enough for full-speed reads, small beside any model
# Converting threads by default: each holds a read buffer (two more are read into), so 8
# keep the buffers at 160 MiB on a large host, where memory bandwidth bounds the copies.
MAX_WORKERS = 8

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# huggingface_hub's units (decimal, as in "5GB"), and binary ones.
_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


# ---------------------------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True)
class _Entry:
    file: pathlib.Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # of the tensor's first byte in the file


@functools.cache
def _libc() -> Optional[ctypes.CDLL]:
    """The C library's mmap, mincore and munmap, where there are such (not on Windows)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


class _File:
    """Reads of one file at any offset, into buffers from `buffer()`: a range the page
    cache holds entirely is copied from it; any other is read straight from the disk
    (O_DIRECT), which neither fills the page cache nor pays for it: a cold 4.94 GB read
    took 0.1 to 0.4 CPU seconds so, against 1.4 to 8.7 with plain reads
    (docs/performance-notes.md, "Loading a checkpoint"). Plain reads where the platform or
    the file system has no O_DIRECT."""

    ALIGN = 4096  # O_DIRECT: offsets, sizes and addresses in multiples of the disk's block

    def __init__(self, path: pathlib.Path):
        self.path = path
        self.file = open(path, "rb", buffering=0)
        self.direct_fd: Optional[int] = None
        self.direct = hasattr(os, "O_DIRECT") and hasattr(os, "preadv") and _libc() is not None

    @classmethod
    def buffer(cls, nbytes: int) -> np.ndarray:
        """A buffer for reads of up to nbytes, aligned for O_DIRECT."""
        raw = np.empty(nbytes + 3 * cls.ALIGN, np.uint8)
        start = -raw.ctypes.data % cls.ALIGN
        return raw[start : start + nbytes + 2 * cls.ALIGN]

    def read(self, buffer: np.ndarray, offset: int, nbytes: int, tensor: str) -> np.ndarray:
        """The file's bytes [offset, offset + nbytes), as a view of `buffer`."""
        base = offset - offset % self.ALIGN  # the file offset at buffer[0]
        done, end = offset, offset + nbytes
        if self.direct and not self._cached(base, end):
            done = self._direct(buffer, base, end)
        while done < end:
            self.file.seek(done)
            got = self.file.readinto(buffer[done - base : end - base])
            if not got:
                raise HFError(f"{self.path}: ends inside tensor {tensor}; the file is truncated")
            done += got
        return buffer[offset - base : end - base]

    def _cached(self, base: int, end: int) -> bool:
        """Whether the page cache holds every page of [base, end): mincore on a mapping of
        the range, which reads nothing (a read that fails when it would wait, RWF_NOWAIT,
        starts reading ahead into the cache first)."""
        libc, size = _libc(), end - base
        if not size:
            return True
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, self.file.fileno(), base)
        if address in (None, ctypes.c_void_p(-1).value):
            return True  # cannot tell: plain reads
        try:
            pages = ctypes.create_string_buffer(-(-size // mmap.PAGESIZE))
            if libc.mincore(address, size, pages):
                return True
            return all(byte & 1 for byte in pages.raw)
        finally:
            libc.munmap(address, size)

    def _direct(self, buffer: np.ndarray, base: int, end: int) -> int:
        """Read [base, end) past the page cache, whole disk blocks at a time; returns where
        the read got to (base, where O_DIRECT fails: plain reads take it from there)."""
        start, stop = base, end + -end % self.ALIGN
        try:
            if self.direct_fd is None:
                self.direct_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
            while start < end and not start % self.ALIGN:
                got = os.preadv(self.direct_fd, [buffer[start - base : stop - base]], start)
                if not got:
                    break
                start += got
        except OSError:  # no O_DIRECT here (tmpfs, some network file systems): plain reads
            self.direct = False
            return base
        return min(start, end)

    def close(self) -> None:
        self.file.close()
        if self.direct_fd is not None:
            os.close(self.direct_fd)


def _header(file: pathlib.Path) -> dict[str, _Entry]:
    try:
        with safe_open(str(file), framework="numpy"):  # validates the header against the file
            pass
    except (SafetensorError, OSError) as e:
        raise HFError(f"{file}: not a readable safetensors file ({e})") from None
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return {
        name: _Entry(file, h["dtype"], tuple(h["shape"]), 8 + size + h["data_offsets"][0])
        for name, h in header.items()
    }


class Checkpoint:
    """The tensors of a folder's safetensors files, each read only when asked for."""

    def __init__(self, files: Sequence[pathlib.Path]):
        self._entries: dict[str, _Entry] = {}
        for file in files:
            for name, entry in _header(file).items():
                if name in self._entries:
                    raise HFError(f"tensor {name} appears in both {self._entries[name].file.name} and {file.name}")
                self._entries[name] = entry

    def keys(self) -> set[str]:
        return set(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name].shape

    def dtype(self, name: str) -> str:
        """The safetensors dtype name: F32, BF16, ..."""
        return self._entries[name].dtype

    def where(self, name: str) -> pathlib.Path:
        return self._entries[name].file

    def _numpy_dtype(self, name: str) -> np.dtype:
        entry = self._entries[name]
        if entry.dtype not in DTYPES:
            raise HFError(f"{entry.file}: tensor {name} has dtype {entry.dtype}, which is not read here")
        return DTYPES[entry.dtype]

    def get(self, name: str) -> np.ndarray:
        """The whole tensor, in its file's dtype."""
        out = np.empty(self.shape(name) or (1,), self._numpy_dtype(name))

        def copy(_, start: int, rows: np.ndarray) -> None:
            out[start : start + len(rows)] = rows

        self.read([name], copy)
        return out.reshape(self.shape(name))

    def rows(self, name: str) -> int:
        """Length of the tensor's first axis (1 for a 0-d tensor): what read() goes along."""
        return (self.shape(name) or (1,))[0]

    def file_order(self, names: Iterable[str]) -> list[str]:
        """names in the order their bytes lie on disk: read so, each file goes front to back."""
        return sorted(names, key=lambda n: (self._entries[n].file.name, self._entries[n].offset))

    def read(
        self,
        names: Sequence[str],
        consume: Callable[[str, int, np.ndarray], None],
        *,
        workers: Optional[int] = None,
        chunk_bytes: Optional[int] = None,
    ) -> None:
        """Call consume(name, first row, rows) on each tensor in turn, along its first axis,
        about chunk_bytes (default CHUNK_BYTES) of rows at a time.

        This thread reads the chunks in order while `workers` threads (default: one per
        CPU this process may use, at most MAX_WORKERS) run `consume` on those already read,
        several at once: reading and converting overlap, and conversion uses the cores.
        `consume` must therefore be safe to run for different chunks at the same time.
        Each chunk is a view of a reused buffer, valid only during its call: copy what you
        keep. A 0-d tensor comes as one row of shape (1,). The first error, in reading or
        in `consume`, stops the reading and is raised once the calls under way return.
        """
        chunk_bytes = chunk_bytes or CHUNK_BYTES
        workers = workers or min(_cpu_count(), MAX_WORKERS)
        plan = []  # (name, entry, dtype, shape, first row, rows, byte offset)
        for name in names:
            entry, dtype = self._entries[name], self._numpy_dtype(name)
            shape = entry.shape or (1,)
            row_bytes = dtype.itemsize * math.prod(shape[1:])
            step = max(1, chunk_bytes // row_bytes) if row_bytes else max(shape[0], 1)
            for start in range(0, shape[0], step) or [0]:
                count = min(step, shape[0] - start)
                plan.append((name, entry, dtype, shape, start, count, entry.offset + start * row_bytes))
        size = max((c[2].itemsize * math.prod(c[3][1:]) * c[5] for c in plan), default=0)
        # One buffer per worker, one being read, one read ahead.
        free: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(min(workers + 2, len(plan))):
            free.put(_File.buffer(size))
        files, running = {}, []
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="checkpoint") as pool:
            try:
                for name, entry, dtype, shape, start, count, offset in plan:
                    buffer = free.get()
                    running = [f for f in running if not f.done() or f.exception()]  # the failed stay
                    if any(f.done() and f.exception() for f in running):
                        break
                    if entry.file not in files:
                        files[entry.file] = _File(entry.file)
                    nbytes = dtype.itemsize * math.prod(shape[1:]) * count
                    data = files[entry.file].read(buffer, offset, nbytes, name)
                    rows = data.view(dtype).reshape((count,) + shape[1:])
                    future = pool.submit(consume, name, start, rows)
                    future.add_done_callback(lambda _, buffer=buffer: free.put(buffer))
                    running.append(future)
            finally:
                for f in files.values():
                    f.close()
                concurrent.futures.wait(running)
        for future in running:
            future.result()  # the first error raised in a worker, if any


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def open_checkpoint(folder: pathlib.Path) -> Checkpoint:
    """The folder's safetensors weights (sharded or not); pickle-only folders are refused."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            listed = {str(tensor): str(file) for tensor, file in weight_map.items()}
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise HFError(f"{index}: not a safetensors index with a 'weight_map' ({e})") from None
        names = sorted(set(listed.values()))
        for name in names:
            # The index is data from elsewhere: it may name only files beside it.
            if pathlib.PurePath(name).name != name:
                raise HFError(f"{index} names shard {name!r}, which is not a file name in {folder}")
            if not (folder / name).is_file():
                tensors = [t for t, f in listed.items() if f == name]
                raise HFError(
                    f"{folder / name}: no such file, but {index.name} lists it as the shard holding "
                    f"{len(tensors)} tensors ({tensors[0]}, ...): copy or download every shard the index names"
                )
        ckpt = Checkpoint([folder / name for name in names])
        for tensor, name in listed.items():
            if tensor not in ckpt.keys() or ckpt.where(tensor).name != name:
                raise HFError(f"{index} lists tensor {tensor} in {name}, which does not hold it")
        return ckpt
    if (folder / WEIGHTS_FILE).is_file():
        return Checkpoint([folder / WEIGHTS_FILE])
    pickled = [name for name in PICKLED_FILES if (folder / name).exists()]
    pickled += [p.name for p in sorted(folder.glob("pytorch_model-*.bin"))]
    if pickled:
        raise HFError(
            f"{folder} holds only pickled weights ({', '.join(pickled)}). Loading a pickle can run "
            "arbitrary code, so flaxformer_lite never opens one. Convert it once, in an environment you "
            "trust, to safetensors: `python -c \"from transformers import AutoModel; "
            "AutoModel.from_pretrained('DIR').save_pretrained('NEW_DIR')\"` (transformers writes "
            "model.safetensors; use the model's own class, e.g. AutoModelForCausalLM, to keep its head), "
            "or download the checkpoint's safetensors files from the Hub"
        )
    raise HFError(f"{folder} has no {WEIGHTS_FILE} or {INDEX_FILE}: nothing to load")


# ---------------------------------------------------------------------------------- writing


@dataclasses.dataclass(frozen=True)
class Pending:
    """A tensor to be written: its shape and dtype now, its values when `make()` is called."""

    shape: tuple[int, ...]
    dtype: np.dtype
    make: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def parse_size(size: int | str) -> int:
    """Bytes in a shard size: an int, or a string as transformers takes it ("2GB", "500MB", "1GiB")."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        text = str(size).strip().upper()
        unit = next((u for u in sorted(_UNITS, key=len, reverse=True) if text.endswith(u)), None)
        try:
            value = int(float(text[: -len(unit)]) * _UNITS[unit]) if unit else int(text)
        except ValueError:
            value = None
        if value is None:
            raise HFError(f"max_shard_size={size!r}: write bytes or a size such as 2GB, 500MB or 1GiB")
    if value <= 0:
        raise HFError(f"max_shard_size={size!r}: must be positive")
    return value


def _split(tensors: dict[str, Pending], max_bytes: int) -> list[list[str]]:
    """Names per shard, in order, as huggingface_hub splits a state dict: a tensor that
    would take the shard past max_bytes starts the next one; one larger than max_bytes
    has a shard to itself."""
    shards, current, size = [], [], 0
    for name, tensor in tensors.items():
        if tensor.nbytes > max_bytes:
            shards.append([name])
            continue
        if current and size + tensor.nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += tensor.nbytes
    return shards + [current] if current else shards


def _write_file(file: pathlib.Path, tensors: dict[str, Pending], metadata: dict[str, str]) -> None:
    # As safetensors orders them: by alignment, then name, so every tensor starts aligned.
    names = sorted(tensors, key=lambda n: (-tensors[n].dtype.itemsize, n))
    header, offset = {"__metadata__": metadata}, 0
    for name in names:
        t = tensors[name]
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(file, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for name in names:
            t = tensors[name]
            values = np.ascontiguousarray(t.make(), dtype=t.dtype)
            if values.shape != t.shape:  # a Pending whose make() disagrees with it: a bug
                raise HFError(f"internal: tensor {name} made with shape {values.shape}, announced {t.shape}")
            f.write(values.reshape(-1).view(np.uint8))


def write(
    folder: pathlib.Path,
    tensors: dict[str, Pending],
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    total_parameters: Optional[int] = None,
) -> list[pathlib.Path]:
    """Write tensors as model.safetensors, or as shards with their index when they exceed
    max_shard_size; remove weight files an earlier save left in the folder. Returns the
    files written."""
    for name, tensor in tensors.items():
        if tensor.dtype not in _NAMES:
            raise HFError(f"tensor {name} has dtype {tensor.dtype}, which safetensors files here do not hold")
    shards = _split(tensors, parse_size(max_shard_size))
    if len(shards) == 1:
        files = [WEIGHTS_FILE]
    else:
        files = [SHARD_FILE.format(index=i + 1, count=len(shards)) for i in range(len(shards))]
    for old in folder.iterdir():
        if old.name not in files and (old.name in (WEIGHTS_FILE, INDEX_FILE) or _SHARD_NAME.fullmatch(old.name)):
            old.unlink()
    for file, names in zip(files, shards):
        # transformers checks this metadata key; "pt" is what its own files carry.
        _write_file(folder / file, {n: tensors[n] for n in names}, {"format": "pt"})
    if len(files) > 1:
        metadata = {"total_size": sum(t.nbytes for t in tensors.values())}
        if total_parameters is not None:
            metadata["total_parameters"] = total_parameters
        weight_map = {n: file for file, names in zip(files, shards) for n in names}
        index = {"metadata": metadata, "weight_map": weight_map}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return [folder / file for file in files]
