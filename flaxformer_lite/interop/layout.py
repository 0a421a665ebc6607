"""How one HF tensor becomes our parameters and back: reshape, transpose, fuse, offset.

A `Map` names one HF tensor and the parameter(s) it holds. Both directions come from the
same record, so import and export cannot disagree. HF tensors are 1-D or 2-D; ours group
the same numbers on more axes (`query` [D,N,H] is a torch Linear [N*H, D] transposed).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Sequence

import numpy as np

from flaxformer_lite.errors import UserError

# Side of the square blocks a transposing copy goes by: a block's rows, read and written,
# stay in cache. numpy's plain `dst[...] = src.T` strides through all of one side: an
# 8192 x 2048 float32 -> bfloat16 copy took 72 ms of CPU that way, 45 ms in blocks of 128
# (21 ms untransposed), on the 2-core VM of BENCHMARKS.md.
_BLOCK = 128


def _copy_transposed(dst: np.ndarray, src: np.ndarray) -> None:
    """dst[...] = src.T, block by block (cast to dst's dtype)."""
    for i in range(0, src.shape[0], _BLOCK):
        for j in range(0, src.shape[1], _BLOCK):
            dst[j : j + _BLOCK, i : i + _BLOCK] = src[i : i + _BLOCK, j : j + _BLOCK].T


class HFError(UserError):
    """An HF folder, config key or tensor we cannot read or write; the message says why and the fix."""


@dataclasses.dataclass(frozen=True)
class Map:
    """One HF tensor <-> one or more of our parameters (flat '/'-joined paths).

    kind: 'reshape' (same numbers in the same order: embeddings, norms, biases, GPT-2
      Conv1D [in, out]) or 'linear' (a torch nn.Linear weight [out, in]: transposed).
    in_axes: how many leading axes of our parameter form the HF input axis; 0 gives a
      1-D HF tensor (biases, norm scales).
    ours: several paths for a fused HF tensor (GPT-2 c_attn holds query, key, value),
      concatenated along the HF output axis.
    row_offset: HF rows before ours (RoBERTa's position table starts at padding_idx+1);
      export writes them as zeros.
    """

    hf: str
    ours: tuple[str, ...]
    kind: Literal["reshape", "linear"] = "reshape"
    in_axes: int = 1
    row_offset: int = 0

    def _hf_2d(self, shape: Sequence[int]) -> tuple[int, ...]:
        """HF shape of one of our parameters, before transposing or fusing."""
        if self.in_axes == 0:
            return (math.prod(shape),)
        return (math.prod(shape[: self.in_axes]), math.prod(shape[self.in_axes :]))

    @property
    def _transposed(self) -> bool:
        # nn.Linear stores [out, in]; everything else [in, out] or [n].
        return self.kind == "linear" and self.in_axes > 0

    @property
    def _out_axis(self) -> int:
        return 0 if self._transposed else -1

    def hf_shape(self, our_shapes: Sequence[Sequence[int]]) -> tuple[int, ...]:
        """The shape the HF tensor must have, given our parameters' shapes."""
        parts = [self._hf_2d(s) for s in our_shapes]
        if self._transposed:
            parts = [p[::-1] for p in parts]
        shape = list(parts[0])
        shape[self._out_axis] = sum(p[self._out_axis] for p in parts)
        shape[0] += self.row_offset
        return tuple(shape)

    def to_ours(self, w: np.ndarray, our_shapes: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Split/transpose/reshape an HF tensor into our parameters."""
        outs = [np.empty(s, w.dtype) for s in our_shapes]
        self.rows_into(w, 0, outs)
        return outs

    def rows_into(self, rows: np.ndarray, start: int, outs: Sequence[np.ndarray]) -> None:
        """Write rows `start, start + len(rows)` of the HF tensor into our parameters.

        `outs` are our parameters, C-contiguous and allocated by the caller, in any dtype:
        the values are cast as they are copied. Feeding a tensor's rows in chunks fills
        them with no full-size temporary (hf.load reads large tensors this way).
        """
        skip = max(self.row_offset - start, 0)
        rows, start = rows[skip:], start + skip - self.row_offset
        stop = start + len(rows)
        offset = 0  # of this part along the axis the fused parts are concatenated on
        for out in outs:
            out_2d = out.view()
            out_2d.shape = self._hf_2d(out.shape)  # a view, or an error: never a copy written to
            size = out_2d.shape[-1]
            if out_2d.ndim == 1 or self._transposed:
                # Parts follow each other along the HF rows: copy where this chunk overlaps.
                lo, hi = max(start, offset), min(stop, offset + size)
                if lo < hi:
                    piece = rows[lo - start : hi - start]
                    if out_2d.ndim == 1:
                        out_2d[lo - offset : hi - offset] = piece
                    else:
                        _copy_transposed(out_2d[:, lo - offset : hi - offset], piece)
            else:  # HF rows are our input axis; parts sit side by side in the columns
                out_2d[start:stop] = rows[:, offset : offset + size]
            offset += size

    def to_hf(self, xs: Sequence[np.ndarray]) -> np.ndarray:
        """Our parameter(s) as the HF tensor."""
        w = np.concatenate([x.reshape(self._hf_2d(x.shape)) for x in xs], axis=-1)
        if self._transposed:
            w = w.T
        if self.row_offset:
            w = np.concatenate([np.zeros((self.row_offset,) + w.shape[1:], w.dtype), w])
        return np.ascontiguousarray(w)
