"""Embeddings for /v1/embeddings: `ffl.embed` on an encoder, on one thread, in fixed shapes.

Inputs are batched `max_batch` rows at a time and padded to a power-of-two length (16 up
to the context), so the compiled programs are those lengths' and no more; all of them
are compiled at start-up.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import pathlib

import jax
import numpy as np

from flaxformer_lite.inference.embeddings import embed
from flaxformer_lite.inference.engine import EngineError

MIN_BUCKET = 16


class Embedder:
    """Sentence embeddings of an HF encoder folder, JAX on its own single thread.

    Args:
      model, params: an encoder (or encoder-decoder) and its {'params': ...}.
      folder: the HF folder, for its tokenizer.json ([CLS] ... [SEP] added as it says).
      pooling, normalize: as ffl.embed; max_len: the longest input in tokens.
    """

    def __init__(self, model, params, folder, *, pooling: str, normalize: bool, max_len: int, max_batch: int = 8):
        import tokenizers

        self.model, self.params, self.pooling, self.normalize = model, params, pooling, normalize
        self.max_len, self.max_batch = max_len, max_batch
        self._tok = tokenizers.Tokenizer.from_file(str(pathlib.Path(folder) / "tokenizer.json"))
        self._tok.no_padding()
        self._tok.no_truncation()
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ffl-embed")
        self.draining = False
        self._in_flight = 0
        self.buckets = []
        length = MIN_BUCKET
        while length < max_len:
            self.buckets.append(length)
            length *= 2
        self.buckets.append(max_len)

    def start(self) -> None:
        """Compile every length bucket (on the embedding thread)."""
        self._thread.submit(self._warm_up).result()

    def stop(self) -> None:
        self._thread.shutdown(wait=True)

    def _warm_up(self) -> None:
        for length in self.buckets:
            self._run(np.ones((self.max_batch, length), np.int32), np.ones((self.max_batch, length), bool))

    def _run(self, ids, valid):
        return np.asarray(jax.block_until_ready(
            embed(self.model, self.params, ids, valid, pooling=self.pooling, normalize=self.normalize)
        ))

    def tokenize(self, inputs: list) -> list[list[int]]:
        """Token ids of each input (text with the tokenizer's specials, or ids as given)."""
        rows = []
        for i, x in enumerate(inputs):
            if isinstance(x, str):
                rows.append(self._tok.encode(x).ids)
            elif isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x):
                rows.append(list(x))
            else:
                raise EngineError(f"input {i} must be a string or a list of token ids")
            if len(rows[-1]) > self.max_len:
                raise EngineError(f"input {i} is {len(rows[-1])} tokens, more than the context of {self.max_len}")
        return rows

    def _embed_rows(self, rows: list[list[int]]) -> list[list[float]]:
        out = []
        for first in range(0, len(rows), self.max_batch):
            batch = rows[first:first + self.max_batch]
            length = next(b for b in self.buckets if b >= max(map(len, batch)))
            ids = np.zeros((self.max_batch, length), np.int32)
            valid = np.zeros((self.max_batch, length), bool)
            valid[:, 0] = True  # padding rows hold one token, so none is empty
            for b, r in enumerate(batch):
                ids[b, :len(r)], valid[b, :len(r)] = r, True
            out.extend(v.tolist() for v in self._run(ids, valid)[:len(batch)])
        return out

    async def embed(self, inputs: list) -> tuple[list[list[float]], int]:
        """(vectors, tokens used) for the inputs, computed on the embedding thread."""
        rows = self.tokenize(inputs)
        self._in_flight += 1
        try:
            vectors = await asyncio.get_running_loop().run_in_executor(self._thread, self._embed_rows, rows)
        finally:
            self._in_flight -= 1
        return vectors, sum(map(len, rows))

    def busy(self) -> int:
        """Requests being embedded or waiting to be."""
        return self._in_flight
