"""Log-likelihoods of continuations under a decoder: the scoring half of an evaluation
harness (lm-eval's `loglikelihood` and `loglikelihood_rolling`).

    scorer = Scorer(model, params, max_len=cfg.max_len)
    scorer([(context_ids, continuation_ids), ...])   # [(sum log p(continuation), greedy?)]

Each pair is scored as lm-eval's HF backend scores it: the model reads
(context + continuation), keeping the last max_len + 1 tokens and dropping the last one,
and the continuation's tokens are read off the last len(continuation) positions. Only
those positions are projected onto the vocabulary (`models.lm_head_inputs`): a
multiple-choice continuation is a few tokens of a context of hundreds, and the
projection onto a 49k vocabulary is a fifth of a small model's forward pass. Rows are
run `batch_size` at a time, longest first, right-padded to a length bucket (an eighth
of an octave: at most an eighth of a row is padding) and the continuations to a power of two,
so a whole task compiles a handful of programs.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flaxformer_lite.models import lm_head_inputs

MIN_BUCKET = 16


def _bucket(n: int, max_len: int) -> int:
    """n rounded up to an eighth of an octave (16, 18, ..., 32, 36, ..., 128, 144, ...), at most max_len."""
    step = max(MIN_BUCKET // 8, 1 << max((n - 1).bit_length() - 4, 0))
    return min(max_len, max(MIN_BUCKET, -(-n // step) * step))


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

        cfg = model.cfg
        # Softcapped logits are not h @ table.T: those models project every position.
        project_all = cfg.logits_softcap is not None

        def target_logprobs(params, ids_BT, targets_BK, at_BK):
            out = model.apply(params, ids_BT)
            if project_all:
                logits_BKV = jnp.take_along_axis(out.logits, at_BK[..., None], axis=1)
            else:
                h_BKD = jnp.take_along_axis(out.hidden_states, at_BK[..., None], axis=1)
                h_BKD, table_VD = lm_head_inputs(cfg, params, h_BKD)
                logits_BKV = jnp.einsum("BKD,VD->BKV", h_BKD, table_VD)
            logits_BKV = logits_BKV.astype(jnp.float32)
            logp_BKV = jax.nn.log_softmax(logits_BKV, axis=-1)
            picked_BK = jnp.take_along_axis(logp_BKV, targets_BK[..., None], axis=-1)[..., 0]
            return picked_BK, jnp.argmax(logits_BKV, axis=-1) == targets_BK

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
            K = 1 << (max(rows[i][2] for i in chunk) - 1).bit_length()
            ids = np.zeros((self.batch_size, T), np.int32)
            targets = np.zeros((self.batch_size, K), np.int32)
            at = np.zeros((self.batch_size, K), np.int32)
            for r, i in enumerate(chunk):
                inputs, row_targets, k = rows[i]
                n = len(inputs)
                ids[r, :n] = inputs
                targets[r, :k], at[r, :k] = row_targets[n - k:], np.arange(n - k, n)
            logp_BK, greedy_BK = jax.device_get(self._run(self._params, ids, targets, at))
            for r, i in enumerate(chunk):
                k = rows[i][2]
                out[i] = (float(np.sum(logp_BK[r, :k], dtype=np.float64)), bool(greedy_BK[r, :k].all()))
        return out
