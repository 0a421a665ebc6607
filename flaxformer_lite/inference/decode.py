"""Text generation with the KV cache: greedy, sampling (temperature, top-k, top-p), beam search.

    out = ffl.generate(model, params, [[1, 72, 105], [1, 87]], max_new_tokens=32,
                       method="sample", temperature=0.8, top_p=0.95, seed=0)
    out.tokens, out.lengths, out.scores        # [B,T] new tokens, [B], [B]

The prompt is prefilled in one call; each new token is then one cached step. The prefill
and the whole token loop (a lax.while_loop that exits once every row has stopped) run in
one jitted function, compiled once per model, batch shape and static setting.

Prompts of different lengths: decoder-only prompts are left-padded and each row gets its
own positions (0 at its first real token), so every row's next token goes to the same
cache slot; encoder-decoder prompts are the encoder input and are right-padded. The
`flaxformer-lite generate` command is in inference/commands.py; docs/decoding.md has more.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional, Sequence, Union

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

Array = jax.Array
METHODS = ("greedy", "sample", "beam")


@flax.struct.dataclass
class GenerateOutput:
    """What `generate` returns; only new tokens, never the prompt.

    tokens: [B,T] int32, T = max_new_tokens; pad_token_id after a row's stop token.
    lengths: [B] new tokens per row, the stop token included.
    scores: [B] greedy/sample: sum of log p(token | prefix) under the model (temperature,
      filters and repetition penalty not applied); beam: the best hypothesis' length-penalised score.
    logits: [B,T,V] float32 model logits at each step (return_logits=True only).
    beam_tokens / beam_lengths / beam_scores: [B,W,T] / [B,W] / [B,W], every kept
      hypothesis, best first (beam only).
    """

    tokens: Array
    lengths: Array
    scores: Array
    logits: Optional[Array] = None
    beam_tokens: Optional[Array] = None
    beam_lengths: Optional[Array] = None
    beam_scores: Optional[Array] = None


@dataclasses.dataclass(frozen=True)
class _Static:
    """Settings that fix the compiled program (shapes and control flow)."""

    method: str
    max_new_tokens: int
    num_beams: int
    return_logits: bool
    stream: Optional[Callable] = None
    repetition: bool = False  # a repetition penalty is applied (it keeps a seen-token table)


# ------------------------------------------------------------------------ logits filters


def filter_top_k_top_p(logits_BV: Array, k: Array, p: Array) -> Array:
    """Keep the k largest logits (k=0: all), then the fewest of those whose probability
    mass reaches p (nucleus sampling, Holtzman et al. 2020; p >= 1: all); -inf elsewhere.

    One sort serves both, and k and p may be traced, so one compiled program serves every
    setting. The most likely token is always kept; ties with the last kept logit are kept.
    """
    V = logits_BV.shape[-1]
    rank_V = jnp.arange(V)
    in_top_k_V = rank_V < jnp.where(k > 0, k, V)
    sorted_BV = jnp.where(in_top_k_V, -jnp.sort(-logits_BV, axis=-1), -jnp.inf)
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    keep_BV = in_top_k_V & ((mass_before_BV < p) | (p >= 1.0))
    cutoff_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)


def repetition_penalty(logits_BV: Array, seen_BV: Array, penalty) -> Array:
    """The repetition penalty of CTRL (Keskar et al. 2019) as transformers applies it: the
    logit of a token already seen is divided by `penalty` where positive and multiplied
    by it where negative, so penalty > 1 discourages repeats and 1 changes nothing.

    seen_BV: bool, the tokens of each row so far; penalty: a scalar or [B].
    """
    penalty_B1 = jnp.broadcast_to(jnp.asarray(penalty, logits_BV.dtype), logits_BV.shape[:1])[:, None]
    penalized_BV = jnp.where(logits_BV < 0, logits_BV * penalty_B1, logits_BV / penalty_B1)
    return jnp.where(seen_BV, penalized_BV, logits_BV)


def _block_stops(logits_BV: Array, stop_ids: Array, step: Array, min_new_tokens: Array) -> Array:
    """-inf on the stop tokens while fewer than min_new_tokens have been generated."""
    is_stop_V = jnp.zeros(logits_BV.shape[-1], bool).at[stop_ids].set(True, mode="drop")
    return jnp.where(is_stop_V & (step < min_new_tokens), -jnp.inf, logits_BV)


# ------------------------------------------------------------------------ cache plumbing


def _init_decoder_cache(module, src_BS, dec_BT):
    return module.decode(dec_BT, module.encode(src_BS).hidden_states, decode=True)


def _empty_cache(model: nn.Module, batch: int, slots: int, encoder_len: int):
    """(zero cache for `slots` decoder positions, per-leaf index of its batch axis or -1).

    A fresh cache is all zeros (the cross-attention K/V are written by the prefill), so
    only its shapes are traced (`cache_shapes`).
    """
    shapes, batch_axes = cache_shapes(model, batch, slots, encoder_len)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), batch_axes


def cache_shapes(model: nn.Module, batch: int, slots: int, encoder_len: int,
                 axis_names: tuple = ("batch", "cache_rows")):
    """(the cache's abstract arrays, per-leaf index of the axis `axis_names` name, or -1).

    The logical axis names say which axis is the batch one (`batch`, or `cache_rows` for
    K/V rows; `("kv_length",)` finds the positions' axis instead), whether or not the
    layers are scanned (a leading 'layers' axis).
    """
    def init():  # traced only: no array is made
        key, dec_BT = jax.random.key(0), jnp.ones((batch, slots), jnp.int32)
        if model.cfg.family == "decoder":
            return model.init(key, dec_BT, decode=True)
        return model.init(key, jnp.ones((batch, encoder_len), jnp.int32), dec_BT, method=_init_decoder_cache)

    boxed = jax.eval_shape(init)["cache"]
    axes = jax.tree.map(
        lambda spec: next((spec.index(a) for a in axis_names if a in spec), -1),
        nn.get_partition_spec(boxed),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )
    # The boxes' values, without nn.unbox's sharding constraint (no mesh is needed here).
    boxed_leaf = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    return jax.tree.map(lambda x: x.value if boxed_leaf(x) else x, boxed, is_leaf=boxed_leaf), axes


def _take_rows(cache, batch_axes, rows_B: Array, batch: int):
    """Gather cache rows (beam reordering and expansion) on each leaf's batch axis.

    `batch` is the number of rows the cache holds now. K/V leaves hold K rows per batch
    row (ops.cache_rows), which move together.
    """

    def take(x, axis):
        if axis < 0:
            return x
        per_row = x.shape[axis] // batch
        rows = (rows_B[:, None] * per_row + jnp.arange(per_row)).reshape(-1)
        return jnp.take(x, rows, axis=axis)

    return jax.tree.map(take, cache, batch_axes)


def _forward(model, params, cache, ids_BT, valid_BT, positions_BT, encoder):
    """One cached call: (float32 logits at each row's last slot [B,V], updated cache).

    `encoder` is None (decoder-only) or (encoder output or None after the prefill,
    encoder validity [B,S]).
    """
    variables = {**params, "cache": cache}
    if encoder is None:
        out, mutated = model.apply(
            variables, ids_BT, attention_mask=valid_BT, positions=positions_BT,
            decode=True, mutable=["cache"],
        )
    else:
        hidden_BSD, encoder_valid_BS = encoder
        out, mutated = model.apply(
            variables, ids_BT, hidden_BSD, method="decode",
            encoder_attention_mask=encoder_valid_BS, decoder_attention_mask=valid_BT,
            decoder_positions=positions_BT, decode=True, mutable=["cache"],
        )
    return out.logits[:, -1].astype(jnp.float32), mutated["cache"]


# ------------------------------------------------------------------------ the jitted program


@functools.partial(jax.jit, static_argnames=("model", "static"))
def _generate(model, static: _Static, params, prompt_BP, valid_BP, rng, dyn):
    """Prefill, then the token loop; all arrays, no Python per token."""
    B, P = prompt_BP.shape
    T, W = static.max_new_tokens, static.num_beams
    positions_BP = jnp.maximum(jnp.cumsum(valid_BP, axis=1) - 1, 0).astype(jnp.int32)
    if model.cfg.family == "decoder":
        cache, batch_axes = _empty_cache(model, B, P + T, 0)
        first_BT, first_valid_BT, first_positions_BT = prompt_BP, valid_BP, positions_BP
        # Left-padded: the last slot holds every row's last real token.
        next_position_B = positions_BP[:, -1] + 1
        encoder, step_encoder = None, None
    else:
        cache, batch_axes = _empty_cache(model, B, T, P)
        hidden_BPD = model.apply(
            params, prompt_BP, attention_mask=valid_BP, positions=positions_BP, method="encode"
        ).hidden_states
        first_BT = jnp.full((B, 1), model.cfg.decoder_start_token_id, jnp.int32)
        first_valid_BT, first_positions_BT = jnp.ones((B, 1), bool), jnp.zeros((B, 1), jnp.int32)
        next_position_B = jnp.ones((B,), jnp.int32)
        encoder, step_encoder = (hidden_BPD, valid_BP), (None, valid_BP)
    logits_BV, cache = _forward(model, params, cache, first_BT, first_valid_BT, first_positions_BT, encoder)

    if static.method == "beam":
        # Beams share their row's prefill: expand the cache, the logits and the rest B -> B*W.
        rows = jnp.repeat(jnp.arange(B), W)
        cache = _take_rows(cache, batch_axes, rows, B)
        logits_BV, next_position_B = logits_BV[rows], next_position_B[rows]
        if step_encoder is not None:
            step_encoder = (None, valid_BP[rows])
        state = _beam_init(B, W, T)
        choose = functools.partial(_beam_choose, dyn=dyn)
    else:
        state = _token_init(B, T, logits_BV.shape[-1] if static.return_logits else 0)
        if static.repetition:  # what each row has seen: its prompt (decoder) or start token
            counts_BV = jnp.zeros(logits_BV.shape, jnp.int32).at[jnp.arange(B)[:, None], first_BT].add(
                first_valid_BT.astype(jnp.int32))
            state["seen"] = counts_BV > 0
        choose = functools.partial(_token_choose, static=static, dyn=dyn, rng=rng)

    def cond(carry):
        state, _, _, _, i = carry
        return (i < T - 1) & ~jnp.all(state["done"])

    def body(carry):
        state, cache, logits_BV, next_position_B, i = carry
        state, parent_rows, token_B = choose(state, logits_BV, i)
        if parent_rows is not None:
            cache = _take_rows(cache, batch_axes, parent_rows, parent_rows.shape[0])
        logits_BV, cache = _forward(
            model, params, cache, token_B[:, None], jnp.ones((token_B.shape[0], 1), bool),
            next_position_B[:, None], step_encoder,
        )
        return state, cache, logits_BV, next_position_B + 1, i + 1

    carry = (state, cache, logits_BV, next_position_B, jnp.int32(0))
    state, cache, logits_BV, _, i = jax.lax.while_loop(cond, body, carry)
    # The last token needs no forward pass; for rows already stopped this is a no-op.
    state, _, _ = choose(state, logits_BV, i)
    if static.method == "beam":
        return _beam_finish(state, T, dyn["length_penalty"])
    return GenerateOutput(
        tokens=state["tokens"], lengths=state["lengths"], scores=state["scores"],
        logits=state.get("logits"),
    )


def _token_init(B, T, V_logits):
    state = {
        "tokens": jnp.zeros((B, T), jnp.int32),
        "lengths": jnp.zeros((B,), jnp.int32),
        "scores": jnp.zeros((B,), jnp.float32),
        "done": jnp.zeros((B,), bool),
    }
    if V_logits:
        state["logits"] = jnp.zeros((B, T, V_logits), jnp.float32)
    return state


def _token_choose(state, logits_BV, i, *, static, dyn, rng):
    """Greedy or sampled token i for every row; stopped rows get pad_id.

    Returns the new state, None (rows keep their cache) and the tokens [B].
    """
    allowed_BV = logits_BV
    if "seen" in state:
        allowed_BV = repetition_penalty(allowed_BV, state["seen"], dyn["repetition_penalty"])
    allowed_BV = _block_stops(allowed_BV, dyn["stop_ids"], i, dyn["min_new_tokens"])
    if static.method == "greedy":
        token_B = jnp.argmax(allowed_BV, axis=-1).astype(jnp.int32)
    else:
        scaled_BV = filter_top_k_top_p(allowed_BV / dyn["temperature"], dyn["top_k"], dyn["top_p"])
        token_B = jax.random.categorical(jax.random.fold_in(rng, i), scaled_BV).astype(jnp.int32)
    done_B = state["done"]
    token_B = jnp.where(done_B, dyn["pad_id"], token_B)
    log_prob_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BV), token_B[:, None], axis=-1)[:, 0]
    new = {
        "tokens": state["tokens"].at[:, i].set(token_B),
        "lengths": state["lengths"] + ~done_B,
        "scores": state["scores"] + jnp.where(done_B, 0.0, log_prob_B),
        "done": done_B | jnp.isin(token_B, dyn["stop_ids"]),
    }
    if "logits" in state:
        new["logits"] = state["logits"].at[:, i].set(logits_BV)
    if "seen" in state:
        new["seen"] = state["seen"].at[jnp.arange(token_B.shape[0]), token_B].set(True)
    if static.stream is not None:
        jax.debug.callback(static.stream, i, token_B, ordered=True)
    return new, None, token_B


def _beam_init(B, W, T):
    """Alive beams (only beam 0 live at first, so the W copies do not repeat) and the
    finished pool, W best first, per row."""
    return {
        "alive_tokens": jnp.zeros((B, W, T), jnp.int32),
        "alive_log_probs": jnp.where(jnp.arange(W) == 0, 0.0, -jnp.inf) * jnp.ones((B, 1)),
        "finished_tokens": jnp.zeros((B, W, T), jnp.int32),
        "finished_lengths": jnp.zeros((B, W), jnp.int32),
        "finished_scores": jnp.full((B, W), -jnp.inf),
        "done": jnp.zeros((B,), bool),
    }


def _length_penalty(length, alpha):
    """Score divisor length**alpha (Wu et al. 2016 use ((5+len)/6)**alpha; HF uses this)."""
    return jnp.asarray(length, jnp.float32) ** alpha


def _beam_choose(state, logits_BV, i, *, dyn):
    """One beam step: extend every alive beam, move stopped candidates to the finished pool.

    The 2W best extensions leave W that did not stop (unless stop tokens fill them), as in
    flax's and HF's beam search. Returns the new state, the cache row of each new beam's
    parent and the token each new beam ends with (both [B*W]).
    """
    B, W, T = state["alive_tokens"].shape
    alpha = dyn["length_penalty"]
    log_probs_BWV = _block_stops(
        jax.nn.log_softmax(logits_BV), dyn["stop_ids"], i, dyn["min_new_tokens"]
    ).reshape(B, W, -1)
    V = log_probs_BWV.shape[-1]
    totals_BK, flat_BK = jax.lax.top_k(
        (state["alive_log_probs"][:, :, None] + log_probs_BWV).reshape(B, W * V), min(2 * W, W * V)
    )
    parent_BK, token_BK = flat_BK // V, (flat_BK % V).astype(jnp.int32)
    seqs_BKT = jnp.take_along_axis(state["alive_tokens"], parent_BK[:, :, None], axis=1)
    seqs_BKT = seqs_BKT.at[:, :, i].set(token_BK)
    stopped_BK = jnp.isin(token_BK, dyn["stop_ids"])

    done_B = state["done"]
    # A stopped candidate finishes only if it ranks among the W best (as in HF): one
    # ranked lower would not have been kept as a beam either; so W=1 is greedy search.
    finishes_BK = stopped_BK & (jnp.arange(stopped_BK.shape[1]) < W) & ~done_B[:, None]
    new_scores_BK = jnp.where(finishes_BK, totals_BK / _length_penalty(i + 1, alpha), -jnp.inf)
    pool_scores = jnp.concatenate([state["finished_scores"], new_scores_BK], axis=1)
    pool_tokens = jnp.concatenate([state["finished_tokens"], seqs_BKT], axis=1)
    pool_lengths = jnp.concatenate(
        [state["finished_lengths"], jnp.full(new_scores_BK.shape, i + 1, jnp.int32)], axis=1
    )
    finished_scores_BW, keep_BW = jax.lax.top_k(pool_scores, W)

    alive_log_probs_BW, pick_BW = jax.lax.top_k(jnp.where(stopped_BK, -jnp.inf, totals_BK), W)
    parent_BW = jnp.take_along_axis(parent_BK, pick_BW, axis=1)
    token_BW = jnp.take_along_axis(token_BK, pick_BW, axis=1)

    full_B = jnp.all(finished_scores_BW > -jnp.inf, axis=1)
    # Without early stopping, a full row stops only when no alive beam can still beat its
    # worst finished one. Log-probs only fall as a beam grows, and dividing by
    # length**alpha favours the longest length when alpha > 0: the bound uses that length.
    best_length = jnp.where(alpha > 0, T, i + 1)
    best_alive_B = alive_log_probs_BW[:, 0] / _length_penalty(best_length, alpha)
    hopeless_B = best_alive_B <= finished_scores_BW[:, -1]
    done_B = done_B | (full_B & (dyn["early_stopping"] | hopeless_B))
    done_B = done_B | (alive_log_probs_BW[:, 0] == -jnp.inf)

    new = {
        "alive_tokens": jnp.take_along_axis(seqs_BKT, pick_BW[:, :, None], axis=1),
        "alive_log_probs": alive_log_probs_BW,
        "finished_tokens": jnp.take_along_axis(pool_tokens, keep_BW[:, :, None], axis=1),
        "finished_lengths": jnp.take_along_axis(pool_lengths, keep_BW, axis=1),
        "finished_scores": finished_scores_BW,
        "done": done_B,
    }
    parent_rows = (jnp.arange(B)[:, None] * W + parent_BW).reshape(-1)
    return new, parent_rows, token_BW.reshape(-1)


def _beam_finish(state, T, alpha):
    """Rows that ran out of tokens also rank their alive beams (as HF does); best first."""
    B, W, _ = state["alive_tokens"].shape
    alive_scores = jnp.where(
        state["done"][:, None], -jnp.inf, state["alive_log_probs"] / _length_penalty(T, alpha)
    )
    scores = jnp.concatenate([state["finished_scores"], alive_scores], axis=1)
    tokens = jnp.concatenate([state["finished_tokens"], state["alive_tokens"]], axis=1)
    lengths = jnp.concatenate([state["finished_lengths"], jnp.full((B, W), T, jnp.int32)], axis=1)
    scores_BW, keep_BW = jax.lax.top_k(scores, W)
    tokens_BWT = jnp.take_along_axis(tokens, keep_BW[:, :, None], axis=1)
    lengths_BW = jnp.take_along_axis(lengths, keep_BW, axis=1)
    return GenerateOutput(
        tokens=tokens_BWT[:, 0], lengths=lengths_BW[:, 0], scores=scores_BW[:, 0],
        beam_tokens=tokens_BWT, beam_lengths=lengths_BW, beam_scores=scores_BW,
    )


# ------------------------------------------------------------------------ the public function


def _as_rows(prompt_ids, attention_mask):
    """(ids [B,P] int64, valid [B,P] bool) from token lists or arrays (+ optional mask)."""
    if isinstance(prompt_ids, (list, tuple)) and any(np.ndim(r) == 1 for r in prompt_ids):
        if attention_mask is not None:
            raise ValueError(
                "generate: attention_mask is only for a [B,P] prompt_ids array; "
                "prompts given as a list of token lists need none"
            )
        rows = [np.asarray(r, np.int64).reshape(-1) for r in prompt_ids]
        P = max((len(r) for r in rows), default=0)
        ids = np.zeros((len(rows), P), np.int64)
        valid = np.zeros((len(rows), P), bool)
        for b, r in enumerate(rows):
            ids[b, : len(r)], valid[b, : len(r)] = r, True
        return ids, valid
    ids = np.asarray(prompt_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
        raise ValueError(
            f"generate: prompt_ids must be token ids: a list of int lists, or an int array "
            f"[B,P] or [P]; got shape {ids.shape} dtype {ids.dtype}"
        )
    if attention_mask is None:
        return ids.astype(np.int64), np.ones(ids.shape, bool)
    valid = np.asarray(attention_mask).astype(bool).reshape(ids.shape[0], -1)
    if valid.shape != ids.shape:
        raise ValueError(f"generate: attention_mask shape {valid.shape} differs from prompt_ids {ids.shape}")
    return ids.astype(np.int64), valid


def _check_ids(what: str, ids, vocab_size: int) -> None:
    ids = np.asarray(ids)
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.size:
        raise ValueError(
            f"generate: {what} holds id {int(bad[0])} outside [0, {vocab_size}) = the model's "
            "vocab_size: tokenize with the tokenizer the model was trained with"
        )


def _align(ids, valid, *, left: bool, multiple: int, limit: int, pad_id: int):
    """Move each row's real tokens to the right end (left=True) or the left end, drop
    all-pad columns, then pad the length up to a multiple (at most `limit`)."""
    # A stable sort on validity moves the pads to one side and keeps the tokens in order.
    order = np.argsort(valid if left else ~valid, axis=1, kind="stable")
    ids, valid = np.take_along_axis(ids, order, 1), np.take_along_axis(valid, order, 1)
    P = int(valid.sum(1).max())
    ids, valid = (ids[:, -P:], valid[:, -P:]) if left else (ids[:, :P], valid[:, :P])
    extra = max(0, min(-(-P // multiple) * multiple, limit) - P)
    widths = ((0, 0), (extra, 0) if left else (0, extra))
    ids, valid = np.pad(ids, widths), np.pad(valid, widths)
    return np.where(valid, ids, pad_id).astype(np.int32), valid


def generate(
    model: nn.Module,
    params: dict,
    prompt_ids: Union[Sequence[Sequence[int]], np.ndarray, Array],
    *,
    max_new_tokens: int,
    method: str = "greedy",
    attention_mask: Optional[Union[np.ndarray, Array]] = None,
    min_new_tokens: int = 0,
    eos_token_id: Optional[int] = None,
    ignore_eos: bool = False,
    stop_tokens: Sequence[int] = (),
    pad_token_id: Optional[int] = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    seed: Union[int, Array] = 0,
    num_beams: int = 4,
    length_penalty: float = 1.0,
    early_stopping: bool = True,
    return_logits: bool = False,
    stream: Optional[Callable[[np.ndarray, np.ndarray], None]] = None,
    pad_to_multiple: int = 16,
) -> GenerateOutput:
    """Generate up to max_new_tokens per prompt with the KV cache, in one jitted loop.

    Args:
      model, params: a Decoder or EncoderDecoder (`build_model`) and its {'params': ...}.
      prompt_ids: a list of token-id lists (any lengths), or an int array [B,P] or [P]
        with an optional `attention_mask` (1 on real tokens, padding on either side).
        Decoder-only: the text to continue (start it with BOS if the model was trained so).
        Encoder-decoder: the encoder input; the decoder starts from decoder_start_token_id.
      method: 'greedy', 'sample' (temperature, then top_k, then top_p, seeded by `seed`)
        or 'beam' (num_beams, length_penalty, early_stopping).
      repetition_penalty: greedy/sample: tokens already in the row (prompt or generated;
        encoder-decoder: generated) have their logits penalised (`repetition_penalty`
        below; 1 is off; 1.1 to 1.3 is usual), as transformers' argument of that name.
      min_new_tokens: stop tokens are blocked until this many tokens exist.
      eos_token_id: default the model's (none if that lies outside the vocabulary);
        `ignore_eos=True` never stops on it.
      stop_tokens: more ids that end a row (kept in its output, like EOS).
      pad_token_id: fills a row after it stopped; default the model's (0 if that lies
        outside the vocabulary).
      length_penalty: beam scores are log p / length**length_penalty.
      early_stopping: beam rows stop once num_beams hypotheses have finished; False: once
        no alive beam can still beat the worst finished one.
      return_logits: also return the model's logits at every step (greedy/sample).
      stream: called as stream(step, tokens_B) with numpy values after each token
        (greedy/sample), for printing as tokens arrive.
      pad_to_multiple: prompts are padded to a multiple of this length (within max_len)
        so that prompts of nearby lengths share one compiled program.

    Returns:
      GenerateOutput (tokens, lengths, scores, ...). Call it outside jit: it validates
      its inputs on the host and jits itself.
    """
    cfg = model.cfg
    if cfg.family not in ("decoder", "encoder_decoder"):
        raise ValueError(
            f"generate needs a decoder or encoder_decoder model; this one has model.family={cfg.family!r}"
        )
    if method not in METHODS:
        raise ValueError(f"generate: unknown method={method!r}; use one of {', '.join(METHODS)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens!r} must be an int >= 1")
    max_new_tokens = int(max_new_tokens)
    if not 0 <= min_new_tokens <= max_new_tokens:
        raise ValueError(f"generate: min_new_tokens={min_new_tokens} must be in [0, max_new_tokens={max_new_tokens}]")
    if method == "sample" and not temperature > 0:
        raise ValueError(f"generate: temperature={temperature} must be > 0 (method='greedy' takes the argmax)")
    if method == "sample" and not 0 < top_p <= 1:
        raise ValueError(f"generate: top_p={top_p} must be in (0, 1]")
    if top_k < 0:
        raise ValueError(f"generate: top_k={top_k} must be >= 0 (0 turns it off)")
    if method == "beam" and num_beams < 1:
        raise ValueError(f"generate: num_beams={num_beams} must be >= 1")
    if method == "beam" and (return_logits or stream is not None):
        raise ValueError("generate: return_logits and stream are for method='greedy' or 'sample', not 'beam'")
    if not repetition_penalty > 0:
        raise ValueError(f"generate: repetition_penalty={repetition_penalty} must be > 0 (1 turns it off)")
    if method == "beam" and repetition_penalty != 1:
        raise ValueError("generate: repetition_penalty is for method='greedy' or 'sample', not 'beam'")
    if pad_to_multiple < 1:
        raise ValueError(f"generate: pad_to_multiple={pad_to_multiple} must be >= 1")

    V = cfg.vocab_size
    # A model config's id outside the vocabulary (HF's GPT2Config defaults with a small
    # vocab; hf.load warns) can never be generated: no stop on it, and padding uses 0.
    usable = lambda i: 0 <= i < V  # noqa: E731
    if pad_token_id is None:
        pad_token_id = cfg.pad_token_id if usable(cfg.pad_token_id) else 0
    if eos_token_id is None and usable(cfg.eos_token_id):
        eos_token_id = cfg.eos_token_id
    pad_id = pad_token_id
    eos = [] if ignore_eos or eos_token_id is None else [eos_token_id]
    stops = tuple(dict.fromkeys(eos + [int(t) for t in stop_tokens]))
    _check_ids("stop_tokens/eos_token_id", stops, V)
    _check_ids("pad_token_id", [pad_id], V)
    if cfg.family == "encoder_decoder" and not usable(cfg.decoder_start_token_id):
        raise ValueError(
            f"generate: model.decoder_start_token_id={cfg.decoder_start_token_id} is outside [0, {V}) = "
            "the model's vocab_size: set decoder_start_token_id in the model's config"
        )

    ids, valid = _as_rows(prompt_ids, attention_mask)
    lengths = valid.sum(1)
    if ids.shape[0] == 0 or (lengths == 0).any():
        row = int(np.argmin(lengths)) if ids.shape[0] else 0
        start = "start it with the BOS id" if cfg.family == "decoder" else "pass the text to encode"
        raise ValueError(f"generate: prompt row {row} is empty: {start} (model.bos_token_id={cfg.bos_token_id})")
    _check_ids("prompt_ids", ids[valid], V)
    longest = int(lengths.max())
    decoder_only = cfg.family == "decoder"
    if longest > cfg.max_len:
        raise ValueError(
            f"generate: prompt of {longest} tokens is longer than model.max_len={cfg.max_len}: "
            "shorten the prompt (keep its end) or use a model with a larger max_len"
        )
    needed = longest + max_new_tokens if decoder_only else max_new_tokens
    if needed > cfg.max_len:
        what = f"prompt ({longest}) + max_new_tokens ({max_new_tokens})" if decoder_only else f"max_new_tokens ({max_new_tokens})"
        raise ValueError(
            f"generate: {what} = {needed} tokens overflows model.max_len={cfg.max_len}: "
            f"lower max_new_tokens to at most {cfg.max_len - (longest if decoder_only else 0)}"
        )
    limit = cfg.max_len - max_new_tokens if decoder_only else cfg.max_len
    ids, valid = _align(ids, valid, left=decoder_only, multiple=pad_to_multiple, limit=limit, pad_id=pad_id)

    static = _Static(
        method=method, max_new_tokens=max_new_tokens,
        num_beams=num_beams if method == "beam" else 1, return_logits=return_logits, stream=stream,
        repetition=repetition_penalty != 1,
    )
    dyn = {
        "temperature": jnp.float32(temperature),
        "top_p": jnp.float32(top_p),
        "repetition_penalty": jnp.float32(repetition_penalty),
        "min_new_tokens": jnp.int32(min_new_tokens),
        # Padded with the id V, which no token has, so 0 to 8 stop ids share one program.
        "stop_ids": jnp.asarray(stops + (V,) * (8 * -(-max(len(stops), 1) // 8) - len(stops)), jnp.int32),
        "top_k": jnp.int32(top_k),
        "pad_id": jnp.int32(pad_id),
        "length_penalty": jnp.float32(length_penalty),
        "early_stopping": jnp.bool_(early_stopping),
    }
    rng = seed if isinstance(seed, jax.Array) else jax.random.key(int(seed))
    return _generate(model, static, params, jnp.asarray(ids), jnp.asarray(valid), rng, dyn)
