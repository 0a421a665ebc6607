"""Log-likelihoods of continuations under a decoder: the scoring half of an evaluation
harness (lm-eval's `loglikelihood` and `loglikelihood_rolling`).

    scorer = Scorer(model, params, max_len=cfg.max_len)
    scorer([(context_ids, continuation_ids), ...])   # [(sum log p(continuation), greedy?)]

Each pair is scored as lm-eval's HF backend scores it: the model reads
(context + continuation), keeping the last max_len + 1 tokens and dropping the last one,
and the continuation's tokens are read off the last len(continuation) positions. Rows are
run `batch_size` at a time, longest first, right-padded to a power-of-two length (at
least 16, at most max_len), so a whole task compiles a handful of programs.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

MIN_BUCKET = 16


def _bucket(n: int, max_len: int) -> int:
    return min(max_len, max(MIN_BUCKET, 1 << (n - 1).bit_length()))


class Scorer:
    """Sums of log-probabilities of continuations given contexts, for a decoder-only model.

    Args:
      model, params: a decoder (model.cfg.family == "decoder") and its {'params': ...}.
      max_len: the longest input in tokens (default model.cfg.max_len); longer inputs keep
        their last max_len tokens, as lm-eval truncates them.
      batch_size: rows per forward pass.
    """

    def __init__(self, model, params, *, max_len: int | None = None, batch_size: int = 8):
        if model.cfg.family != "decoder":
            raise ValueError(f"scoring continuations needs a decoder-only model; this one is {model.cfg.family!r}")
        self.max_len = model.cfg.max_len if max_len is None else max_len
        self.batch_size = batch_size
        self._params = params

        def target_logprobs(params, ids_BT, targets_BT):
            logits_BTV = model.apply(params, ids_BT).logits.astype(jnp.float32)
            logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
            picked_BT = jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
            return picked_BT, jnp.argmax(logits_BTV, axis=-1) == targets_BT

        self._run = jax.jit(target_logprobs)

    def __call__(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[float, bool]]:
        rows = []  # (input ids, target ids, continuation length)
        for i, (context, continuation) in enumerate(pairs):
            if not continuation:
                raise ValueError(f"pair {i} has an empty continuation: there is nothing to score")
            whole = list(context) + list(continuation)
            whole = whole[-(self.max_len + 1):]
            if len(whole) < 2:
                raise ValueError(f"pair {i} has no context token to condition on: give a context or a prefix token")
            rows.append((whole[:-1], whole[1:], min(len(continuation), len(whole) - 1)))
        out: list = [None] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            T = _bucket(len(rows[chunk[0]][0]), self.max_len)
            ids = np.zeros((self.batch_size, T), np.int32)
            targets = np.zeros((self.batch_size, T), np.int32)
            for r, i in enumerate(chunk):
                n = len(rows[i][0])
                ids[r, :n], targets[r, :n] = rows[i][0], rows[i][1]
            logp_BT, greedy_BT = jax.device_get(self._run(self._params, ids, targets))
            for r, i in enumerate(chunk):
                n, k = len(rows[i][0]), rows[i][2]
                out[i] = (float(np.sum(logp_BT[r, n - k:n], dtype=np.float64)), bool(greedy_BT[r, n - k:n].all()))
        return out
