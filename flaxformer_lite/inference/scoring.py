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
of an octave: at most an eighth of a row is padding), and every row of a call reads the
same number of positions (its longest continuation, to a power of two, at most the
row's length). On a short task
compiling dominates: each program costs as much as the forward pass of about
COMPILE_ROW_TOKENS row-tokens, so the call merges neighbouring buckets upward wherever
the padding that adds costs less than the program it saves (`plan_lengths`).

Pairs whose model inputs are the same tokens (context + continuation minus its last
token: the choices of a multiple-choice question that are one token each) share one
row, as lm-eval's HF backend shares their logits: each pair reads its own targets off
the one forward pass, so a four-choice task runs a quarter of the rows.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flaxformer_lite.models import lm_head_inputs

MIN_BUCKET = 16
# A program's compile time in row-tokens of forward pass: 30 unrolled layers of
# SmolLM2-135M's shape in float32 on a 2-core CPU compiled a program (T about 120) in the
# time of about 1,100 row-tokens (BENCHMARKS.md, "Evaluation").
COMPILE_ROW_TOKENS = 1024


def _bucket(n: int, max_len: int) -> int:
    """n rounded up to an eighth of an octave (16, 18, ..., 32, 36, ..., 128, 144, ...), at most max_len."""
    step = max(MIN_BUCKET // 8, 1 << max((n - 1).bit_length() - 4, 0))
    return min(max_len, max(MIN_BUCKET, -(-n // step) * step))


def plan_lengths(buckets: Sequence[int], rows: int, compile_cost: int = COMPILE_ROW_TOKENS) -> list[int]:
    """The padded length of each batch: its bucket, or a longer one of the call where
    compiling one more program would cost more (in row-tokens) than the padding saved.

    buckets: each batch's own length bucket; rows: rows per batch (padded ones count).
    """
    lengths = sorted(set(buckets), reverse=True)
    count = [sum(b == n for b in buckets) for n in lengths]
    # best[i]: cost of the batches in lengths[i:] when lengths[i] is compiled; nxt[i] the next compiled.
    best, nxt = [0] * (len(lengths) + 1), [len(lengths)] * len(lengths)
    for i in reversed(range(len(lengths))):
        best[i] = None
        for j in range(i + 1, len(lengths) + 1):
            cost = compile_cost + rows * lengths[i] * sum(count[i:j]) + best[j]
            if best[i] is None or cost < best[i]:
                best[i], nxt[i] = cost, j
    padded, i = {}, 0
    while i < len(lengths):
        for n in lengths[i:nxt[i]]:
            padded[n] = lengths[i]
        i = nxt[i]
    return [padded[b] for b in buckets]


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

        def target_logprobs(params, ids_BT, targets_BGK, at_BK):
            out = model.apply(params, ids_BT)
            if project_all:
                logits_BKV = jnp.take_along_axis(out.logits, at_BK[..., None], axis=1)
            else:
                h_BKD = jnp.take_along_axis(out.hidden_states, at_BK[..., None], axis=1)
                h_BKD, table_VD = lm_head_inputs(cfg, params, h_BKD)
                logits_BKV = jnp.einsum("BKD,VD->BKV", h_BKD, table_VD)
            logits_B1KV = logits_BKV.astype(jnp.float32)[:, None]
            logp_B1KV = jax.nn.log_softmax(logits_B1KV, axis=-1)
            picked_BGK = jnp.take_along_axis(logp_B1KV, targets_BGK[..., None], axis=-1)[..., 0]
            return picked_BGK, jnp.argmax(logits_B1KV, axis=-1) == targets_BGK

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
        # Pairs with the same inputs share a row; each keeps its own targets.
        groups: dict[tuple, list[int]] = {}
        for i, (inputs, _, _) in enumerate(rows):
            groups.setdefault(tuple(inputs), []).append(i)
        members = sorted(groups.values(), key=lambda g: -len(rows[g[0]][0]))
        out: list = [None] * len(rows)
        chunks = [members[start:start + self.batch_size] for start in range(0, len(members), self.batch_size)]
        lengths = plan_lengths([_bucket(len(rows[c[0][0]][0]), self.max_len) for c in chunks], self.batch_size)
        # One read width and one group width for the call: neither multiplies the programs.
        longest = 1 << (max(r[2] for r in rows) - 1).bit_length()
        G = 1 << (max(len(group) for group in members) - 1).bit_length()
        for chunk, T in zip(chunks, lengths):
            K = min(longest, T)
            ids = np.zeros((self.batch_size, T), np.int32)
            targets = np.zeros((self.batch_size, G, K), np.int32)
            at = np.zeros((self.batch_size, K), np.int32)
            for r, group in enumerate(chunk):
                inputs = rows[group[0]][0]
                n, k = len(inputs), max(rows[i][2] for i in group)
                ids[r, :n] = inputs
                at[r, :k] = np.arange(n - k, n)
                for g, i in enumerate(group):
                    targets[r, g, :k] = rows[i][1][n - k:]
            logp_BGK, greedy_BGK = jax.device_get(self._run(self._params, ids, targets, at))
            for r, group in enumerate(chunk):
                k = max(rows[i][2] for i in group)
                for g, i in enumerate(group):
                    # This pair's continuation is the last rows[i][2] of the k positions read.
                    own = slice(k - rows[i][2], k)
                    out[i] = (float(np.sum(logp_BGK[r, g, own], dtype=np.float64)), bool(greedy_BGK[r, g, own].all()))
        return out
