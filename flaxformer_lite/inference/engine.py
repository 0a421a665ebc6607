"""The serving engine: continuous batching over a fixed pool of KV-cache slots.

    engine = Engine(model, params, tokenizer, max_batch=16, max_len=512)
    engine.start()                                   # compiles its programs, then runs
    handle = engine.submit(prompt_ids, SamplingParams(max_tokens=32), sink)
    ...                                              # sink(event) is called per token
    engine.stop()

The pool is the model's own decode cache (decode.py's layout) for `max_batch` rows, one
row a slot, with one write index per row (`PoolLayout`): a request joins a free slot
between two steps and leaves it when it finishes, whatever the others are doing. The
running slots are kept at the front of the pool (a slot that frees is filled by moving
the last one into it), so a decode step runs the model as one batch over the first
`rows` slots only, for the smallest bucket (1, 4, 16, ..., max_batch) that holds them:
a lone request does not pay for the idle slots. The layers write each row's new K/V at
its own index into the whole pool in place and attend over its first rows.

The compiled programs (all compiled at start-up):
  - `prefill`: one chunk of `chunk` prompt tokens into one slot (the last chunk is
    padded; its padding slots are marked invalid and later overwritten), returning the
    prompt tokens' log-probs (for `echo` + `logprobs`) and leaving the last position's
    logits in the slot;
  - `step`, one per bucket: for each of the first `rows` slots, pick a token from its
    logits (greedy, or seeded sampling with temperature, top-k, top-p, after the
    repetition, presence and frequency penalties, among the tokens its grammar allows
    where it has one), then run the model on them: one new token per slot. A grammar's
    mask (grammar.py) is computed on the host after each token and reaches the step as
    a packed per-slot table;
  - `_move` (one slot into another), the prefix cache's `_save_block` and `_restore`, and
    `_write_adapter` (one entry of the adapter table, below).
Prompts are prefilled a few chunks (`prefill_budget` tokens) per engine iteration,
oldest request first, between decode steps, so the running streams wait at most that
long for their next token, however long the prompts that arrive.

Prefix caching: each full chunk a prompt prefills is also copied into a store of blocks
(`prefix_blocks` of them, one chunk of positions each), keyed by the prompt's tokens up
to the block's end. A later prompt that starts with the same tokens copies those blocks
into its slot instead of computing them (`_restore`) and prefills only the rest; the
least recently used block makes room for a new one. A block holds exactly what the
prefill computed for those tokens at those positions, so greedy output is the same with
the cache on or off. Requests that ask for their prompt's log-probs (`echo`) compute
every position.

Many LoRA adapters (`max_adapters` > 0): the adapters live in one table (layers/lora.py
`row_table`) of max_adapters entries, each padded to `max_lora_rank` with its alpha / r
folded into B, so adapters of different ranks share a batch exactly. A sequence names
its adapter at `submit`; each slot carries its entry (0: the base, none), and `prefill`
and `step` add to each row its own entry's x A B (lora.rows). A batch with no adapted
row runs the base's own programs, which compile no adapter path (nor do any when
max_adapters is 0). `load_adapter` writes an
entry in place between two steps (nothing compiles again); `unload_adapter` refuses the
name to new requests at once and frees its entry when the last sequence using it ends,
so no running sequence changes adapter. Prefix-cache keys of an adapted prompt are seeded
by its load of the adapter: no adapter reads blocks another one (or the base) computed.

All JAX work runs on the engine's own thread; `submit` and `cancel` are thread-safe and
return at once. Each request's events go to its `sink` (called on the engine thread):
  {"type": "token", "text": new text, "tokens": [TokenInfo, ...]}   as text is final
  {"type": "done", "finish_reason": "stop"|"length"|"cancelled"|"error", "text": full
   text, "prompt_logprobs": [...] or None, "prompt_tokens": n, "completion_tokens": n,
   "cached_tokens": n (prompt tokens read from the prefix cache), "error": message or None}

A failure stays with its request: an exception while handling one sequence (its
sampling settings, its text, its sink) ends that sequence with finish_reason "error"
and the loop goes on. Should the loop itself fail (a compiled program raising), the
engine is dead: `failure` says why, every sequence submitted gets its "error" event, and
`submit` and `check` raise EngineDead (HTTP 503) so a server can report it and exit.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import logging
import math
import queue
import threading
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from flaxformer_lite.errors import UserError
from flaxformer_lite.inference import decode
from flaxformer_lite.inference.grammar import Grammar, Grammars, mask_words
from flaxformer_lite.inference.text import Detokenizer, StopMatcher
from flaxformer_lite.layers import lora
from flaxformer_lite.models import build_model

TOP_LOGPROBS = 5  # the most alternatives a request may ask for (OpenAI's limit for completions)
MAX_LOGIT_BIAS = 300  # entries of a request's logit_bias (OpenAI's limit); a fixed shape for prefill
Sink = Callable[[dict], None]
INT32_MAX = 2**31 - 1
FLOAT32_MAX = float(np.finfo(np.float32).max)
log = logging.getLogger(__name__)


class EngineError(UserError):
    """A request the engine cannot take; `http_status` is the HTTP status it maps to."""


class QueueFull(EngineError):
    http_status = 429


class Draining(EngineError):
    http_status = 503


class UnknownAdapter(EngineError):
    http_status = 404


class AdaptersFull(EngineError):
    http_status = 409


class EngineDead(EngineError):
    """The engine's loop has stopped (`Engine.failure` says why): nothing more will run."""

    http_status = 503


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to generate one sequence.

    temperature 0 is greedy; top_k 0 and top_p 1 turn those filters off. Sampling draws
    token i from fold_in(fold_in(key(seed), choice), i): the same seed gives the same
    text whatever else the engine is running. `stop` strings end the text before their
    first occurrence; `stop_token_ids` end it after such a token (EOS included unless
    `ignore_eos`). `logprobs` (0 to 5 alternatives, None: off) returns each new token's
    log-probability under the model; `echo_logprobs` also the prompt's. `grammar`
    (`Engine.grammars`: a JSON schema, tool calls) allows only the tokens that keep the
    text inside it, end-of-text only where it may end, and ends the sequence ("stop")
    once it is complete.

    `logit_bias` ((token id, bias in [-100, 100]) pairs, OpenAI's) is added to the
    logits before the choice; then the penalties act, as vLLM's: `repetition_penalty`
    (`decode.repetition_penalty`; 1 is off) on every token of the prompt and the output,
    and OpenAI's `presence_penalty` and `frequency_penalty` (in [-2, 2]; 0 is off)
    subtracted once per token present in the output and once per occurrence there.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    seed: int = 0
    choice: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: Optional[int] = None
    echo_logprobs: bool = False
    grammar: Optional[Grammar] = None


@dataclasses.dataclass
class TokenInfo:
    """One generated token: id, its text, log p under the model, and the top alternatives."""

    id: int
    text: str
    logprob: float
    top: list  # [(token text, logprob), ...], best first


class Handle:
    """A submitted sequence; `cancel()` frees its slot at the engine's next step."""

    def __init__(self, engine: "Engine", seq: "_Seq"):
        self._engine, self._seq = engine, seq

    def cancel(self) -> None:
        self._seq.cancelled = True
        self._engine._wake.set()


@dataclasses.dataclass(eq=False)
class _Seq:
    prompt: list
    params: SamplingParams
    sink: Sink
    slot: int = -1
    filled: int = 0  # prompt tokens written to the slot's cache
    tokens: list = dataclasses.field(default_factory=list)
    token_infos: list = dataclasses.field(default_factory=list)
    prompt_logprobs: Optional[list] = None
    text: str = ""
    sent: int = 0  # characters of `text` already sent
    cancelled: bool = False
    finished: bool = False
    arrived: float = 0.0
    cached: int = 0  # prompt tokens copied from the prefix cache
    adapter: int = 0  # its entry of the adapter table (0: the base)
    adapter_seed: bytes = b""  # the prefix cache's first key: its load of the adapter
    block_keys: Optional[list] = None  # the prefix cache's keys of the prompt's whole blocks
    stops: Optional[StopMatcher] = None  # made by submit, on the caller's thread
    stop_ids: frozenset = frozenset()
    matcher: object = None  # the grammar's llguidance matcher, advanced after each token
    detokenizer: Detokenizer = dataclasses.field(default_factory=Detokenizer)


# ------------------------------------------------------------------------ the programs


def _pick(logits_BV, temperature_B, top_k_B, top_p_B, seed_B, choice_B, step_B):
    """Each row's token: argmax where temperature is 0, else a seeded sample."""
    greedy_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)

    def sampled():
        scaled_BV = logits_BV / jnp.where(temperature_B > 0, temperature_B, 1.0)[:, None]
        needs_filter = jnp.any((top_k_B > 0) | (top_p_B < 1))
        filtered_BV = jax.lax.cond(
            needs_filter, lambda: jax.vmap(decode.filter_top_k_top_p)(scaled_BV, top_k_B, top_p_B),
            lambda: scaled_BV,
        )

        def one(seed, choice, step, logits_V):
            key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), choice), step)
            return jax.random.categorical(key, logits_V).astype(jnp.int32)

        return jnp.where(temperature_B > 0, jax.vmap(one)(seed_B, choice_B, step_B, filtered_BV), greedy_B)

    return jax.lax.cond(jnp.any(temperature_B > 0), sampled, lambda: greedy_B)


def _logprob_summary(logits_TV, target_T):
    """(log p of target [T], top-5 ids [T,5], their log p [T,5], all finite [T])."""
    logp_TV = jax.nn.log_softmax(logits_TV, axis=-1)
    chosen_T = jnp.take_along_axis(logp_TV, target_T[:, None], axis=-1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(logp_TV, min(TOP_LOGPROBS, logits_TV.shape[-1]))
    return chosen_T, top_ids.astype(jnp.int32), top_lp, jnp.all(jnp.isfinite(logits_TV), axis=-1)


@dataclasses.dataclass(frozen=True)
class PoolLayout:
    """Where each leaf of the KV-cache pool keeps its slots (static, hashable).

    The pool is the model's decode cache for `max_batch` rows, with one write index per
    row: leaf i holds the slots on axis `batch[i]` (each slot `one[i][batch[i]]` rows of
    it: the K/V heads for K/V, one for validity and positions) and a slot's own cache
    leaf has shape `one[i]`, its positions on axis `length[i]` (-1: none, the index).
    """

    batch: tuple
    one: tuple
    length: tuple


def pool_layout(model, max_batch: int, slots: int) -> tuple:
    """(the pool's abstract arrays, its PoolLayout) for `max_batch` slots of `slots` positions."""
    one, batch_axes = decode.cache_shapes(model, 1, slots, 0)
    _, length_axes = decode.cache_shapes(model, 1, slots, 0, axis_names=("kv_length",))
    leaves, treedef = jax.tree.flatten(one)
    batch = tuple(max(a, 0) for a in jax.tree.leaves(batch_axes))  # the scalar index: a vector of slots
    pool = [jax.ShapeDtypeStruct(x.shape[:a] + (max_batch * (x.shape[a] if x.ndim else 1),) + x.shape[a + 1:],
                                 x.dtype) for x, a in zip(leaves, batch)]
    layout = PoolLayout(batch, tuple(x.shape for x in leaves), tuple(jax.tree.leaves(length_axes)))
    return jax.tree.unflatten(treedef, pool), layout


def _take_slot(pool, layout: PoolLayout, slot):
    """Slot `slot`'s own cache (batch 1, a scalar write index) out of the pool."""
    leaves, treedef = jax.tree.flatten(pool)
    return jax.tree.unflatten(treedef, [
        jax.lax.dynamic_index_in_dim(_split_slots(x, a, one), slot, axis=a, keepdims=False).reshape(one)
        for x, a, one in zip(leaves, layout.batch, layout.one)])


def _put_slot(pool, layout: PoolLayout, slot, cache):
    """The pool with slot `slot` set to `cache` (as _take_slot gives it)."""
    leaves, treedef = jax.tree.flatten(pool)
    out = []
    for x, a, one, y in zip(leaves, layout.batch, layout.one, jax.tree.leaves(cache)):
        view = _split_slots(x, a, one)
        y = y.reshape(view.shape[:a] + (1,) + view.shape[a + 1:])
        out.append(jax.lax.dynamic_update_slice_in_dim(view, y, slot, axis=a).reshape(x.shape))
    return jax.tree.unflatten(treedef, out)


def _split_slots(x, a: int, one: tuple):
    """Pool leaf `x` with its slot axis `a` split into (slots, a slot's rows)."""
    rows = one[a] if one else 1
    return x.reshape(x.shape[:a] + (x.shape[a] // rows, rows) + x.shape[a + 1:])


def _with_length(cache, length):
    """A cache set to hold `length` tokens (a slot's, or the first rows' of the pool, one
    length each): the write index, and validity cut there."""

    def fix(path, x):
        name = path[-1].key
        if name == "index":
            return jnp.asarray(length, x.dtype) if x.ndim == 0 else x.at[:length.shape[0]].set(length)
        if name == "key_valid":
            if x.ndim == 2 and jnp.ndim(length) == 1:
                rows = length.shape[0]
                return x.at[:rows].set(x[:rows] & (jnp.arange(x.shape[-1]) < length[:, None]))
            return x & (jnp.arange(x.shape[-1]) < length)
        return x

    return jax.tree_util.tree_map_with_path(fix, cache)


def _apply(model, params, cache, ids_BT, valid_BT, positions_BT, adapters=None, adapter_B=None):
    """The model on tokens [B,T] (the cache's first B rows): (float32 logits [B,T,V], updated
    cache); with an adapter table, row b adapted by its entry adapter_B[b] (0: none)."""
    variables = {**params, "cache": cache}
    if adapters is not None:
        variables[lora.ROWS] = lora.rows(adapters, adapter_B)
    out, mutated = model.apply(
        variables, ids_BT, attention_mask=valid_BT, positions=positions_BT, decode=True, mutable=["cache"],
    )
    return out.logits.astype(jnp.float32), mutated["cache"]


def _allow(logits_BV, allowed_BW, constrained_B):
    """Constrained rows' logits with the tokens their packed masks [B, W] (bit t of word
    t // 32) leave out at -inf; the others unchanged, and no work when none is constrained."""

    def masked():
        bits_BWU = (allowed_BW[:, :, None] >> jnp.arange(32, dtype=allowed_BW.dtype)) & 1
        allowed_BV = bits_BWU.reshape(allowed_BW.shape[0], -1)[:, :logits_BV.shape[1]] > 0
        return jnp.where(allowed_BV | ~constrained_B[:, None], logits_BV, -jnp.inf)

    return jax.lax.cond(jnp.any(constrained_B), masked, lambda: logits_BV)


def _penalize(logits_BV, tables, biased_B, repetition_B, presence_B, frequency_B):
    """The logits each slot chooses from: its logit bias and penalties applied (see
    SamplingParams); `tables` are the slots' prompt tokens, output counts and biases [B,V]."""
    prompt_BV, output_BV, bias_BV = tables

    def penalized():
        out_BV = logits_BV + bias_BV
        out_BV = decode.repetition_penalty(out_BV, prompt_BV | (output_BV > 0), repetition_B)
        return out_BV - frequency_B[:, None] * output_BV - presence_B[:, None] * (output_BV > 0)

    used = jnp.any(biased_B | (repetition_B != 1) | (presence_B != 0) | (frequency_B != 0))
    return jax.lax.cond(used, penalized, lambda: logits_BV)


@functools.partial(jax.jit, static_argnames=("model", "layout"), donate_argnames=("pool", "logits_BV", "tables"))
def _prefill(model, layout, params, pool, logits_BV, tables, slot, start, ids_C, targets_C, n_valid, bias_ids_K,
             bias_K, adapters=None, adapter=None):
    """One prompt chunk into slot `slot` at cache position `start` (adapted by entry
    `adapter` of the `adapters` table, if given). The slot's `tables` (its prompt's tokens
    [B,V] bool, its output's counts [B,V], its logit bias [B,V], set from `bias_ids_K`,
    `bias_K`; ids past the vocabulary pad) start afresh with a prompt's first chunk."""
    C = ids_C.shape[0]
    cache = _with_length(_take_slot(pool, layout, slot), start)
    valid_C = jnp.arange(C) < n_valid
    logits_1CV, cache = _apply(model, params, cache, ids_C[None], valid_C[None],
                               start + jnp.arange(C, dtype=jnp.int32)[None], adapters,
                               None if adapter is None else adapter[None])
    logits_CV = logits_1CV[0]
    pool = _put_slot(pool, layout, slot, cache)
    logits_BV = logits_BV.at[slot].set(logits_CV[n_valid - 1])
    prompt_BV, output_BV, bias_BV = tables
    fresh = start == 0
    V = prompt_BV.shape[1]
    chunk_V = jnp.zeros(V, bool).at[jnp.where(valid_C, ids_C, V)].set(True, mode="drop")
    prompt_BV = prompt_BV.at[slot].set(chunk_V | (prompt_BV[slot] & ~fresh))
    output_BV = output_BV.at[slot].set(jnp.where(fresh, 0, output_BV[slot]))
    bias_V = jnp.zeros(V, bias_BV.dtype).at[bias_ids_K].set(bias_K, mode="drop")
    bias_BV = bias_BV.at[slot].set(jnp.where(fresh, bias_V, bias_BV[slot]))
    return pool, logits_BV, (prompt_BV, output_BV, bias_BV), _logprob_summary(logits_CV, targets_C)


@functools.partial(jax.jit, static_argnames=("model",), donate_argnames=("pool", "logits_BV", "tables"))
def _step(model, params, pool, logits_BV, tables, decoding_B, length_B, temperature_B, top_k_B, top_p_B,
          biased_B, repetition_B, presence_B, frequency_B, seed_B, choice_B, step_B, allowed_BW, constrained_B,
          adapters=None, adapter_B=None):
    """Pick the next token of the pool's first B slots (B: the length of the per-slot
    arguments, a bucket) from their penalised logits (only among those a grammar's packed
    mask `allowed_BW` allows where `constrained_B`), then run the model on them as one batch
    (each row adapted by its entry `adapter_B` of the `adapters` table, if given).

    Returns (pool, logits, tables, tokens [B], (log p [B], top ids [B,5], top log p [B,5],
    finite [B])), the log-probs under the model's own logits (before bias and penalties);
    slots past the bucket are left as they are. Slots in the bucket but not in use compute
    too (fixed shapes); the host ignores them, and only `decoding_B` slots count their token.
    """
    B = length_B.shape[0]
    whole = (logits_BV, tables)
    logits_BV, tables = jax.tree.map(lambda x: x[:B], whole)
    chosen_BV = _penalize(logits_BV, tables, biased_B, repetition_B, presence_B, frequency_B)
    chosen_BV = _allow(chosen_BV, allowed_BW, constrained_B)
    token_B = _pick(chosen_BV, temperature_B, top_k_B, top_p_B, seed_B, choice_B, step_B)
    summary = _logprob_summary(logits_BV, token_B)
    prompt_BV, output_BV, bias_BV = tables
    output_BV = output_BV.at[jnp.arange(B), token_B].add(decoding_B.astype(output_BV.dtype))
    logits_B1V, pool = _apply(model, params, _with_length(pool, length_B), token_B[:, None], jnp.ones((B, 1), bool),
                              length_B[:, None], adapters, adapter_B)
    logits_BV, tables = jax.tree.map(lambda x, part: x.at[:B].set(part), whole,
                                     (logits_B1V[:, 0], (prompt_BV, output_BV, bias_BV)))
    return pool, logits_BV, tables, token_B, summary


@functools.partial(jax.jit, donate_argnames=("adapters",))
def _write_adapter(adapters, index, entry):
    """The adapter table with index `index` (an entry less one) set to `entry` (the
    table's tree, one entry's shapes)."""
    return jax.tree.map(lambda t, x: t.at[index].set(x.astype(t.dtype)), adapters, entry)


@functools.partial(jax.jit, static_argnames=("layout",), donate_argnames=("pool", "logits_BV", "tables"))
def _move(layout, pool, logits_BV, tables, src, dst):
    """Slot `src`'s cache, logits and tables copied into slot `dst` (the engine keeps its
    running slots at the front of the pool, so a step runs on the fewest slots it can)."""
    pool = _put_slot(pool, layout, dst, _take_slot(pool, layout, src))
    logits_BV, tables = jax.tree.map(lambda x: x.at[dst].set(x[src]), (logits_BV, tables))
    return pool, logits_BV, tables


def _slot_leaves(pool, layout: PoolLayout, slot):
    """The position-holding leaves of slot `slot` of the pool, with their position axis."""
    return [(x, a) for x, a in zip(jax.tree.leaves(_take_slot(pool, layout, slot)), layout.length) if a >= 0]


@functools.partial(jax.jit, static_argnames=("layout",), donate_argnames=("store",))
def _save_block(layout, store, pool, slot, start, block):
    """Positions [start, start + P) of slot `slot` (every leaf with a position axis) into
    block `block` of the store: a list of [blocks, ...P...] arrays."""
    return [s.at[block].set(jax.lax.dynamic_slice_in_dim(x, start, s.shape[a + 1], axis=a))
            for s, (x, a) in zip(store, _slot_leaves(pool, layout, slot))]


@functools.partial(jax.jit, static_argnames=("layout",), donate_argnames=("pool", "tables"))
def _restore(layout, pool, tables, store, slot, blocks_M, n_blocks, ids_S, bias_ids_K, bias_K):
    """Slot `slot` starts a prompt whose first `n_blocks` blocks are in the store: those
    (`blocks_M`, padded to the slot's M blocks) are copied to its first positions, and its
    tables start afresh with the prompt tokens `ids_S` (ids past the vocabulary pad) and
    the logit bias, as a prompt's first prefill chunk starts them."""
    cache = _take_slot(pool, layout, slot)
    leaves, treedef = jax.tree.flatten(cache)
    stored = iter(store)
    out = []
    for x, a in zip(leaves, layout.length):
        if a >= 0:
            g = jnp.moveaxis(next(stored)[blocks_M], 0, a)  # [..., M, P, ...]
            g = g.reshape(x.shape)
            P, S = g.shape[a] // blocks_M.shape[0], g.shape[a]
            keep = (jnp.arange(S) < n_blocks * P).reshape([S if i == a else 1 for i in range(g.ndim)])
            x = jnp.where(keep, g, x)
        out.append(x)
    pool = _put_slot(pool, layout, slot, jax.tree.unflatten(treedef, out))
    prompt_BV, output_BV, bias_BV = tables
    V = prompt_BV.shape[1]
    prompt_BV = prompt_BV.at[slot].set(jnp.zeros(V, bool).at[ids_S].set(True, mode="drop"))
    output_BV = output_BV.at[slot].set(0)
    bias_BV = bias_BV.at[slot].set(jnp.zeros(V, bias_BV.dtype).at[bias_ids_K].set(bias_K, mode="drop"))
    return pool, (prompt_BV, output_BV, bias_BV)


# ------------------------------------------------------------------------ the engine


class Engine:
    """Continuous batching for a decoder-only model: see the module docstring.

    Args:
      model, params: a decoder-only model (`build_model`) and its {'params': ...}.
      tokenizer: a flaxformer_lite.data Tokenizer (decode for text, eos ids for stops).
      max_batch: slots, i.e. sequences decoded together.
      max_len: cache positions per slot: prompt + max_tokens must fit (<= model.max_len).
      chunk: prompt tokens prefilled per engine iteration.
      max_queue: requests allowed to wait for a slot; more are refused (QueueFull).
      prefix_blocks: blocks of `chunk` positions the prefix cache holds (None: as many as
        the slots hold, so the cache doubles the KV memory; 0: no prefix caching).
      prefill_budget: prompt tokens prefilled (whole chunks, oldest request first) before
        each decode step (None: 4 chunks): more shortens the wait for a first token when
        many requests arrive together, and lengthens the running streams' gap between two.
      max_adapters: LoRA adapters the engine can hold at once (`load_adapter`); 0: none,
        and no adapter path is compiled.
      max_lora_rank: the largest adapter rank the table holds (smaller ones are padded).
      lora_targets: the projections (layers/lora.py AXES) the table adapts (None: every
        projection the model has); an adapter of others is refused.
    """

    def __init__(self, model, params, tokenizer, *, max_batch: int = 8, max_len: Optional[int] = None,
                 chunk: int = 64, max_queue: int = 64, prefix_blocks: Optional[int] = None,
                 prefill_budget: Optional[int] = None, max_adapters: int = 0, max_lora_rank: int = 16,
                 lora_targets: Optional[Sequence[str]] = None):
        cfg = model.cfg
        if cfg.family != "decoder":
            raise ValueError(
                f"serving completions needs a decoder-only model; this one has model.family={cfg.family!r}"
            )
        max_len = cfg.max_len if max_len is None else max_len
        if not 1 <= max_len <= cfg.max_len:
            raise ValueError(f"--max-len {max_len} must be in [1, model.max_len={cfg.max_len}]")
        prefill_budget = 4 * chunk if prefill_budget is None else prefill_budget
        if min(max_batch, chunk, prefill_budget) < 1 or max_queue < 0 or (prefix_blocks or 0) < 0:
            raise ValueError(f"max_batch={max_batch}, chunk={chunk} and prefill_budget={prefill_budget} must be >= 1, "
                             f"max_queue={max_queue} and prefix_blocks={prefix_blocks} >= 0")
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.max_batch, self.max_len, self.chunk, self.max_queue = max_batch, max_len, chunk, max_queue
        self.prefill_budget = prefill_budget
        self.vocab_size = cfg.vocab_size
        self.eos_ids = tuple(i for i in _eos_ids(tokenizer, cfg) if 0 <= i < cfg.vocab_size)
        # Chunks start at multiples of `chunk` and are written whole: round the slots up so
        # the last one fits (a cache shaped past model.max_len is only a cache: no position
        # reaches past max_len, which the requests' checks keep below).
        self.slots = -(-max_len // chunk) * chunk
        shape_model = build_model(dataclasses.replace(cfg, max_len=max(cfg.max_len, self.slots)))
        pool, self.layout = pool_layout(shape_model, max_batch, self.slots)
        self._pool = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), pool)
        # The prefix cache: blocks of `chunk` positions of every leaf with a position axis.
        self.prefix_blocks = max_batch * (self.slots // chunk) if prefix_blocks is None else prefix_blocks
        self._store = [jnp.zeros((self.prefix_blocks, *one[:a], chunk, *one[a + 1:]), x.dtype)
                       for x, one, a in zip(jax.tree.leaves(pool), self.layout.one, self.layout.length) if a >= 0]
        self._blocks: collections.OrderedDict = collections.OrderedDict()  # prompt prefix -> block, LRU first
        self._logits = jnp.zeros((max_batch, cfg.vocab_size), jnp.float32)
        # Each slot's prompt tokens, output token counts and logit bias, for the penalties.
        shape = (max_batch, cfg.vocab_size)
        self._tables = (jnp.zeros(shape, bool), jnp.zeros(shape, jnp.int32), jnp.zeros(shape, jnp.float32))
        self.grammars = Grammars(tokenizer, vocab_size=cfg.vocab_size, eos_ids=self.eos_ids)
        # Each slot's next-token mask, packed, filled for the constrained slots before a step;
        # a step without any sends the same device array of zeros instead.
        self._allowed = np.zeros((max_batch, mask_words(cfg.vocab_size)), np.int32)
        # A step runs on the pool's first `rows` slots, for the smallest bucket that holds
        # every running one (they are kept at the front): 1, 4, 16, ... and max_batch (each
        # bucket is one more program to compile at start-up).
        self.buckets = sorted({min(4**i, max_batch) for i in range(max_batch.bit_length())})
        self._unconstrained = {r: (jnp.asarray(self._allowed[:r]), jnp.zeros(r, bool)) for r in self.buckets}
        self._free = list(range(max_batch))
        self._running: dict[int, _Seq] = {}  # slot -> sequence
        self._waiting: collections.deque = collections.deque()
        self._incoming: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = False
        self.draining = False
        self.failure: Optional[str] = None  # why the engine loop died; None while it runs
        self._lock = threading.Lock()  # orders `submit` against the loop's death
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self.stats = collections.Counter()
        self._token_text: dict[int, str] = {}
        self._init_adapters(params, max_adapters, max_lora_rank, lora_targets)

    def _init_adapters(self, params, max_adapters: int, max_lora_rank: int, lora_targets) -> None:
        """The adapter table (None when max_adapters is 0) and its bookkeeping."""
        self.max_adapters, self.max_lora_rank = max_adapters, max_lora_rank
        self.lora_targets = tuple(t for t in lora.AXES if lora_targets is None or t in lora_targets)
        self._adapters = None
        if max_adapters:
            cfg = self.model.cfg
            if cfg.lora.rank or cfg.scan_layers:
                raise ValueError("serving many adapters needs a base model without its own LoRA (model.lora.rank=0) "
                                 "and with unrolled layers (model.scan_layers=false), as hf.load gives")
            if max_lora_rank < 1:
                raise ValueError(f"--max-lora-rank {max_lora_rank} must be >= 1")
            self._adapters = lora.row_table(cfg, params, self.lora_targets, max_adapters, max_lora_rank)
            if not self._adapters:
                raise ValueError(f"the model has no projection of {', '.join(self.lora_targets)} to adapt")
        self._named: dict[str, tuple[int, bytes]] = {}  # adapter name -> (table entry, prefix-cache seed)
        self._loading: dict[str, int] = {}  # adapter name -> the table entry it is being written into
        self._users = collections.Counter()  # table entry -> sequences using it, not finished
        self._loads = 0  # adapters loaded so far: each load's prefix-cache seed
        self._writes: queue.SimpleQueue = queue.SimpleQueue()  # (entry, weights, name, seed, Future)
        self._warming_adapters = False  # compiling the adapter path at start-up

    # -- public, any thread

    def start(self) -> None:
        """Compile the programs (warm-up), then run the engine loop on its own thread."""
        ready = threading.Event()
        self._thread = threading.Thread(target=self._main, args=(ready,), name="ffl-engine", daemon=True)
        self._thread.start()
        ready.wait()
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        """End the loop; sequences still running finish as 'cancelled'."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    def submit(self, prompt: Sequence[int], params: SamplingParams, sink: Sink, adapter: Optional[str] = None) -> Handle:
        """Queue one sequence, adapted by the loaded adapter named `adapter` (None: the
        base); raises EngineError (400), UnknownAdapter (404), QueueFull (429), Draining or
        EngineDead (503)."""
        if self.draining or self._stopping:
            raise Draining("the server is shutting down and takes no new requests")
        self.check(prompt, params)
        seq = _Seq(list(map(int, prompt)), params, sink, arrived=time.perf_counter(),
                   stops=StopMatcher(params.stop) if params.stop else None,
                   stop_ids=frozenset(map(int, params.stop_token_ids)),
                   matcher=None if params.grammar is None else params.grammar.start())
        with self._lock:
            self._raise_if_dead()
            if self.queued() >= self.max_queue + len(self._free):
                raise QueueFull(f"{self.queued()} requests are waiting for a slot; retry shortly")
            if adapter is not None:
                if adapter not in self._named:
                    raise UnknownAdapter(f"no adapter named {adapter!r} is loaded (loaded: "
                                         f"{', '.join(self._named) or 'none'})")
                seq.adapter, seq.adapter_seed = self._named[adapter]
                self._users[seq.adapter] += 1
            self._incoming.put(seq)
        self._wake.set()
        return Handle(self, seq)

    def set_params(self, params) -> None:
        """Decode with `params` from now on (the same shapes: nothing compiles again) and
        empty the prefix cache, whose blocks the old ones computed. Call it while no
        request is running (GRPO swaps in the policy's weights between its rollouts)."""
        self.params = params
        self._blocks.clear()

    def adapters(self) -> list[str]:
        """The names of the adapters requests may use now."""
        with self._lock:
            return list(self._named)

    def load_adapter(self, name: str, lora_cfg, adapters) -> concurrent.futures.Future:
        """Write adapter `name` (its model.lora and {'params': adapters} tree, as
        interop.peft.adapter_params gives them) into a free entry of the table, between two
        steps; the Future is done once requests may name it. EngineError (400) for an
        adapter the table cannot hold, AdaptersFull (409) when every entry is in use."""
        self._raise_if_dead()
        if self._adapters is None:
            raise EngineError("this server holds no adapters: start it with --max-adapters N (N >= 1)")
        if lora_cfg.rank > self.max_lora_rank:
            raise EngineError(f"adapter {name!r} has rank {lora_cfg.rank}, above the --max-lora-rank of "
                              f"{self.max_lora_rank} the adapter table holds: restart with --max-lora-rank "
                              f"{lora_cfg.rank} or more")
        others = [t for t in lora_cfg.targets if t not in self.lora_targets]
        if others:
            raise EngineError(f"adapter {name!r} adapts {', '.join(others)}, which the adapter table does not hold "
                              f"(it holds {', '.join(self.lora_targets)}: the projections of the adapters the server "
                              "started with): start the server with an adapter of those projections among its --peft")
        entry = self._table_entry(name, lora.row_weights(adapters, lora_cfg.scale, self.max_lora_rank))
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._raise_if_dead()
            if name in self._named or name in self._loading:
                raise EngineError(f"an adapter named {name!r} is already loaded: unload it first, or pick another "
                                  "name")
            busy = {i for i, _ in self._named.values()} | set(self._loading.values()) | {
                i for i, n in self._users.items() if n}
            free = [i for i in range(1, self.max_adapters + 1) if i not in busy]
            if not free:
                raise AdaptersFull(f"the server holds --max-adapters {self.max_adapters} adapters (or requests still "
                                   "run on unloaded ones): unload one first, or restart with a larger --max-adapters")
            self._loads += 1
            seed = hashlib.sha256(f"adapter load {self._loads}".encode()).digest()
            self._loading[name] = free[0]
            self._writes.put((free[0], entry, name, seed, future))
        self._wake.set()
        return future

    def unload_adapter(self, name: str) -> None:
        """Refuse adapter `name` to new requests from now on; its entry is freed once the
        sequences running on it end. UnknownAdapter (404) if none is loaded by that name."""
        with self._lock:
            if name not in self._named:
                raise UnknownAdapter(f"no adapter named {name!r} is loaded (loaded: {', '.join(self._named) or 'none'})")
            del self._named[name]

    def _table_entry(self, name: str, weights: dict) -> dict:
        """One entry of the adapter table (its tree; zeros where the adapter adapts nothing)
        from an adapter's row weights, EngineError naming a tensor made for another base
        or not finite."""
        table = traverse_util.flatten_dict(self._adapters)
        for key, x in weights.items():
            if key not in table or tuple(table[key].shape[1:]) != x.shape:
                raise EngineError(f"adapter {name!r}: {'/'.join(map(str, key))} {list(x.shape)} does not fit this "
                                  "base: the adapter was made for another model; load one trained on this base")
            if not np.all(np.isfinite(x)):  # one row's NaN would reach every row of its batch (lora.rows)
                raise EngineError(f"adapter {name!r}: {'/'.join(map(str, key))} holds weights that are not finite "
                                  "(NaN or inf): the adapter is damaged; load a sound copy")
        return traverse_util.unflatten_dict(
            {key: weights.get(key, np.zeros(t.shape[1:], np.float32)) for key, t in table.items()})

    def _raise_if_dead(self) -> None:
        if self.failure is not None:
            raise EngineDead(f"the engine has stopped ({self.failure}); the server must be restarted")

    def check(self, prompt: Sequence[int], params: SamplingParams) -> None:
        """Raise EngineError naming the problem if the request cannot run (EngineDead if nothing can).

        Every value is checked for its type and for the range the compiled programs hold
        (int32 ids, float32 settings), so no request can fail inside the engine's loop.
        """
        self._raise_if_dead()
        if not _is_sequence(prompt) or len(prompt) == 0:
            raise EngineError("the prompt must be a non-empty list of token ids: give at least one token of text")
        if not all(_is_int(i) for i in prompt):
            raise EngineError("the prompt must be a list of integer token ids")
        bad = [i for i in prompt if not 0 <= int(i) < self.vocab_size]
        if bad:
            raise EngineError(f"prompt token id {bad[0]} is outside [0, {self.vocab_size}) = the model's vocabulary")
        p = params
        if not all(_is_int(v) for v in (p.max_tokens, p.top_k, p.seed, p.choice)):
            raise EngineError(f"max_tokens={p.max_tokens!r}, top_k={p.top_k!r}, seed={p.seed!r} and "
                              f"choice={p.choice!r} must be integers")
        if p.max_tokens < 0:
            raise EngineError(f"max_tokens={p.max_tokens} must be >= 0")
        if len(prompt) + p.max_tokens > self.max_len:
            raise EngineError(
                f"the prompt ({len(prompt)} tokens) + max_tokens ({p.max_tokens}) = "
                f"{len(prompt) + p.max_tokens} exceeds the context of {self.max_len} tokens: "
                "shorten the prompt or lower max_tokens"
            )
        if p.max_tokens == 0 and not p.echo_logprobs:
            raise EngineError("max_tokens=0 generates nothing: use it with echo and logprobs to score a prompt")
        if not (_is_float32(p.temperature) and _is_float32(p.top_p) and p.temperature >= 0 and 0 < p.top_p <= 1
                and p.top_k >= 0):
            raise EngineError(
                f"temperature={p.temperature!r} must be a finite number >= 0, top_p={p.top_p!r} in (0, 1], "
                f"top_k={p.top_k} >= 0 (0: off; values past the vocabulary are the same as off)"
            )
        if not (_is_float32(p.repetition_penalty) and np.float32(p.repetition_penalty) > 0
                and all(_is_float32(v) and -2 <= v <= 2 for v in (p.presence_penalty, p.frequency_penalty))):
            raise EngineError(
                f"repetition_penalty={p.repetition_penalty!r} must be a finite number > 0 (1: off), presence_penalty="
                f"{p.presence_penalty!r} and frequency_penalty={p.frequency_penalty!r} in [-2, 2] (0: off)"
            )
        if not (_is_sequence(p.logit_bias) and len(p.logit_bias) <= MAX_LOGIT_BIAS and all(
                _is_sequence(pair) and len(pair) == 2 and _is_int(pair[0]) and 0 <= pair[0] < self.vocab_size
                and _is_float32(pair[1]) and -100 <= pair[1] <= 100 for pair in p.logit_bias)):
            raise EngineError(
                f"logit_bias holds at most {MAX_LOGIT_BIAS} (token id, bias) pairs, ids in [0, {self.vocab_size}), "
                "each bias in [-100, 100]"
            )
        if not 0 <= p.choice <= INT32_MAX:
            raise EngineError(f"choice={p.choice} must be in [0, {INT32_MAX}]")
        if isinstance(p.stop, str) or not _is_sequence(p.stop) or not all(isinstance(t, str) and t for t in p.stop):
            raise EngineError("stop must be a list of non-empty strings")
        if isinstance(p.stop_token_ids, str) or not _is_sequence(p.stop_token_ids) or not all(
                _is_int(t) for t in p.stop_token_ids):
            raise EngineError("stop_token_ids must be a list of integer token ids")
        if not (isinstance(p.ignore_eos, bool) and isinstance(p.echo_logprobs, bool)):
            raise EngineError(f"ignore_eos={p.ignore_eos!r} and echo_logprobs={p.echo_logprobs!r} must be true or false")
        if p.logprobs is not None and not (_is_int(p.logprobs) and 0 <= p.logprobs <= TOP_LOGPROBS):
            raise EngineError(f"logprobs={p.logprobs!r} must be in [0, {TOP_LOGPROBS}]")
        if p.grammar is not None and not isinstance(p.grammar, Grammar):
            raise EngineError(f"grammar={p.grammar!r} must be a Grammar from Engine.grammars")

    def queued(self) -> int:
        """Sequences submitted and not yet in a slot."""
        return len(self._waiting) + self._incoming.qsize()

    def busy(self) -> int:
        """Sequences submitted and not finished."""
        return self.queued() + len(self._running)

    # -- the engine thread

    def _main(self, ready: threading.Event) -> None:
        try:
            self._warm_up()
        except BaseException as e:  # reported by start()
            self._error = e
            ready.set()
            return
        ready.set()
        try:
            while not self._stopping:
                self._iteration()
        except BaseException as e:  # the loop itself failed: no request can run any more
            self._die(e)
            return
        for seq in list(self._running.values()) + list(self._waiting):
            self._finish(seq, "cancelled")

    def _die(self, error: BaseException) -> None:
        """Mark the engine dead and end every sequence submitted with an "error" event."""
        log.error("the engine loop stopped", exc_info=error)
        with self._lock:  # after this, submit() refuses: nothing is left in the queue
            self.failure = f"{type(error).__name__}: {error}"
        while not self._incoming.empty():
            self._waiting.append(self._incoming.get())
        for seq in list(self._running.values()) + list(self._waiting):
            self._finish(seq, "error", f"the engine stopped: {self.failure}")
        self._waiting.clear()
        while not self._writes.empty():
            self._writes.get()[-1].set_exception(EngineDead(f"the engine stopped: {self.failure}"))

    def _guarded(self, seq: _Seq, work: Callable, *args):
        """work(*args) for one sequence; an exception fails that sequence, not the loop."""
        try:
            return work(*args)
        except Exception as e:
            log.exception("request failed in the engine")
            self._finish(seq, "error", f"the server failed on this request: {type(e).__name__}: {e}")
            return None

    def _warm_up(self) -> None:
        """Compile prefill, each bucket's step, the slot move and the prefix cache's copies
        once: no request compiles anything afterwards."""
        slot, none = np.int32(self._free[0]), np.int32(0)
        if self._adapters is not None:  # zeros over the first entry's zeros: this only compiles
            self._adapters = _write_adapter(self._adapters, none, jax.tree.map(lambda t: np.zeros(t.shape[1:], t.dtype),
                                                                               self._adapters))
            self._write_adapters()
        for self._warming_adapters in (False, True) if self._adapters is not None else (False,):
            seq = _Seq([0], SamplingParams(max_tokens=1, ignore_eos=True), lambda event: None, slot=self._free.pop(0))
            self._running[seq.slot] = seq
            if self.prefix_blocks:  # no block is kept or restored: these calls only compile
                self._store = _save_block(self.layout, self._store, self._pool, slot, none, none)
                self._pool, self._tables = _restore(
                    self.layout, self._pool, self._tables, self._store, slot,
                    np.zeros(self.slots // self.chunk, np.int32), none, np.full(self.slots, self.vocab_size, np.int32),
                    *self._prefill_inputs(seq)[3:])
            self._prefill_chunk(seq)
            self._decode_step()
            for rows in self.buckets[1:]:  # no sequence decodes in these steps: they only compile
                self._decode_step(rows)
        self._warming_adapters = False
        self._pool, self._logits, self._tables = _move(self.layout, self._pool, self._logits, self._tables, slot,
                                                       slot)
        jax.block_until_ready((self._pool, self._logits, self._tables, self._adapters))
        self.stats.clear()

    def _compact(self) -> None:
        """Move the last running slots into the free ones below them, so the running
        slots are 0 .. n-1 and a step over the first bucket of slots covers them all."""
        while self._running and self._free and self._free[0] < max(self._running):
            src, dst = max(self._running), self._free.pop(0)
            self._pool, self._logits, self._tables = _move(self.layout, self._pool, self._logits, self._tables,
                                                           np.int32(src), np.int32(dst))
            seq = self._running.pop(src)
            seq.slot = dst
            self._running[dst] = seq
            self._free.append(src)
            self._free.sort()
            self.stats["slot_moves"] += 1

    def _write_adapters(self) -> None:
        """Write the queued adapters into the table, then let requests name them."""
        while not self._writes.empty():
            entry, weights, name, seed, future = self._writes.get()
            self._adapters = _write_adapter(self._adapters, np.int32(entry - 1), weights)
            with self._lock:
                del self._loading[name]
                self._named[name] = (entry, seed)
            future.set_result(None)

    def _iteration(self) -> None:
        self._write_adapters()
        while not self._incoming.empty():
            self._waiting.append(self._incoming.get())
        for seq in [s for s in self._waiting if s.cancelled]:
            self._waiting.remove(seq)
            self._finish(seq, "cancelled")
        for seq in [s for s in self._running.values() if s.cancelled]:
            self._finish(seq, "cancelled")
        self._compact()
        while self._waiting and self._free:
            seq = self._waiting.popleft()
            seq.slot = self._free.pop(0)
            self._running[seq.slot] = seq
        chunks = 0
        while chunks * self.chunk < self.prefill_budget:
            prefilling = [s for s in self._running.values() if s.filled < len(s.prompt)]
            if not prefilling:
                break
            self._prefill_chunk(min(prefilling, key=lambda s: s.arrived))
            chunks += 1
        if any(s.filled == len(s.prompt) for s in self._running.values()):
            self._decode_step()
        elif not chunks:
            self._wake.wait(0.05)
            self._wake.clear()

    def _reuse_prefix(self, seq: _Seq) -> None:
        """Copy the stored blocks `seq`'s prompt starts with into its slot (at least its last
        token is left to prefill, for the logits it leaves)."""
        C, found = self.chunk, []
        for key in self._block_keys(seq)[:(len(seq.prompt) - 1) // C]:
            block = self._blocks.get(key)
            if block is None:
                break
            found.append(block)
            self._blocks.move_to_end(key)
        if not found:
            return
        blocks_M = np.zeros(self.slots // C, np.int32)
        blocks_M[:len(found)] = found
        ids_S = np.full(self.slots, self.vocab_size, np.int32)
        ids_S[:len(found) * C] = seq.prompt[:len(found) * C]
        _, _, _, bias_ids_K, bias_K = self._prefill_inputs(seq)
        self._pool, self._tables = _restore(self.layout, self._pool, self._tables, self._store, np.int32(seq.slot),
                                            blocks_M, np.int32(len(found)), ids_S, bias_ids_K, bias_K)
        seq.filled = seq.cached = len(found) * C
        self.stats["prefix_cached_tokens"] += seq.cached

    def _block_keys(self, seq: _Seq) -> list:
        """The keys of the prompt's whole blocks: block j's is the SHA-256 of block j-1's key
        and its own tokens, so it names the whole prefix up to its end (computed once, in
        one pass over the prompt, as vLLM chains its block hashes); block 0's chains from
        the sequence's adapter seed (empty for the base)."""
        if seq.block_keys is None:
            keys, key, C = [], seq.adapter_seed, self.chunk
            for end in range(C, len(seq.prompt) + 1, C):
                key = hashlib.sha256(key + np.asarray(seq.prompt[end - C:end], np.int64).tobytes()).digest()
                keys.append(key)
            seq.block_keys = keys
        return seq.block_keys

    def _keep_block(self, seq: _Seq, start: int) -> None:
        """Store the block of `seq`'s slot at [start, start + chunk), just prefilled whole."""
        key = self._block_keys(seq)[start // self.chunk]
        if key in self._blocks:
            self._blocks.move_to_end(key)
            return
        if len(self._blocks) < self.prefix_blocks:
            block = len(self._blocks)
        else:
            _, block = self._blocks.popitem(last=False)
            self.stats["prefix_evicted_blocks"] += 1
        self._store = _save_block(self.layout, self._store, self._pool, np.int32(seq.slot), np.int32(start),
                                  np.int32(block))
        self._blocks[key] = block

    def _prefill_inputs(self, seq: _Seq) -> tuple:
        """The host arrays of `seq`'s next prompt chunk: (ids, targets, count, logit-bias ids, biases)."""
        start, C = seq.filled, self.chunk
        ids = seq.prompt[start:start + C]
        targets = seq.prompt[start + 1:start + C + 1]
        ids_C = np.zeros(C, np.int32)
        targets_C = np.zeros(C, np.int32)
        ids_C[:len(ids)], targets_C[:len(targets)] = ids, targets
        bias_ids_K = np.full(MAX_LOGIT_BIAS, self.vocab_size, np.int32)
        bias_K = np.zeros(MAX_LOGIT_BIAS, np.float32)
        for k, (token, bias) in enumerate(seq.params.logit_bias):
            bias_ids_K[k], bias_K[k] = token, bias
        return ids_C, targets_C, len(ids), bias_ids_K, bias_K

    def _prefill_chunk(self, seq: _Seq) -> None:
        if seq.filled == 0 and self.prefix_blocks and not seq.params.echo_logprobs:
            self._guarded(seq, self._reuse_prefix, seq)
            if seq.finished:
                return
        inputs = self._guarded(seq, self._prefill_inputs, seq)
        if inputs is None:
            return
        ids_C, targets_C, n, bias_ids_K, bias_K = inputs
        self._pool, self._logits, self._tables, summary = _prefill(
            self.model, self.layout, self.params, self._pool, self._logits, self._tables, np.int32(seq.slot),
            np.int32(seq.filled), ids_C, targets_C, np.int32(n), bias_ids_K, bias_K,
            *self._adapter_rows(np.int32(seq.adapter)),
        )
        self.stats["prefill_chunks"] += 1
        if n == self.chunk and self.prefix_blocks:
            self._keep_block(seq, seq.filled)
        seq.filled += n
        if seq.params.echo_logprobs or not np.all(np.asarray(summary[3])[:n]):
            self._guarded(seq, self._record_prompt_logprobs, seq, summary, n)
        if seq.slot >= 0 and seq.filled == len(seq.prompt) and seq.params.max_tokens == 0:
            self._finish(seq, "length")

    def _record_prompt_logprobs(self, seq: _Seq, summary, n: int) -> None:
        chosen, top_ids, top_lp, finite = (np.asarray(a)[:n] for a in summary)
        if not finite.all():
            self._finish(seq, "error", "the model's logits are not finite (NaN or inf) for this prompt")
            return
        if seq.prompt_logprobs is None:
            seq.prompt_logprobs = [None]  # the first token has no prefix to be predicted from
        k = seq.params.logprobs or 0
        last = seq.filled == len(seq.prompt)
        for t in range(n - 1 if last else n):
            target = seq.prompt[seq.filled - n + t + 1]
            seq.prompt_logprobs.append(TokenInfo(
                target, self._text_of(target), float(chosen[t]),
                [(self._text_of(int(i)), float(lp)) for i, lp in zip(top_ids[t][:k], top_lp[t][:k])],
            ))

    def _decode_step(self, rows: Optional[int] = None) -> None:
        """One step over the smallest bucket of slots that holds every running one (or `rows`)."""
        B = rows or next(r for r in self.buckets if r > max(self._running, default=0))
        length = np.zeros(B, np.int32)
        temperature, top_p, repetition = np.zeros(B, np.float32), np.ones(B, np.float32), np.ones(B, np.float32)
        presence, frequency = np.zeros(B, np.float32), np.zeros(B, np.float32)
        top_k, seed, choice, step = (np.zeros(B, np.int32) for _ in range(4))
        seed = seed.astype(np.uint32)
        decoding = [s for s in self._running.values() if s.filled == len(s.prompt)]
        decoding_B, biased_B = np.zeros(B, bool), np.zeros(B, bool)
        for s in self._running.values():
            # Every slot runs; one still being prefilled keeps its length, so the token
            # written past it is overwritten by its next chunk.
            length[s.slot] = s.filled
        def settings(s: _Seq) -> bool:
            p, b = s.params, s.slot
            length[b] = len(s.prompt) + len(s.tokens)
            # top_k past the vocabulary keeps every token, as top_k = V does.
            temperature[b], top_p[b], top_k[b] = p.temperature, p.top_p, min(p.top_k, self.vocab_size)
            repetition[b], presence[b], frequency[b] = p.repetition_penalty, p.presence_penalty, p.frequency_penalty
            seed[b], choice[b], step[b] = p.seed % 2**32, p.choice, len(s.tokens)
            decoding_B[b], biased_B[b] = True, bool(p.logit_bias)
            return True

        decoding = [s for s in decoding if self._guarded(s, settings, s)]
        constrained = [(s.matcher, s.slot) for s in decoding if s.matcher is not None]
        masks = self._unconstrained[B]
        if constrained:
            self.grammars.fill(constrained, self._allowed)
            # Device arrays, as the unconstrained masks are: a numpy argument would be another
            # entry of the step's cache. device_put, not jnp.asarray, which compiles a copy
            # program for each new shape and dtype (one per bucket, after warm-up).
            masks = jax.device_put((self._allowed[:B], np.isin(np.arange(B), [b for _, b in constrained])))
        adapter_B = np.zeros(B, np.int32)
        for s in self._running.values():
            adapter_B[s.slot] = s.adapter
        self._pool, self._logits, self._tables, token_B, summary = _step(
            self.model, self.params, self._pool, self._logits, self._tables, decoding_B, length, temperature, top_k,
            top_p, biased_B, repetition, presence, frequency, seed, choice, step, *masks,
            *self._adapter_rows(adapter_B),
        )
        self.stats["steps"] += 1
        token_B, (lp_B, top_ids, top_lp, finite_B) = np.asarray(token_B), (np.asarray(a) for a in summary)
        for s in decoding:
            b = s.slot
            if not finite_B[b]:
                self._finish(s, "error", "the model's logits are not finite (NaN or inf) for this request")
                continue
            self._guarded(s, self._take_token, s, int(token_B[b]), float(lp_B[b]), top_ids[b], top_lp[b])
            if s.matcher is not None and not s.finished:
                self._guarded(s, self._advance_grammar, s, int(token_B[b]))

    def _adapter_rows(self, adapter) -> tuple:
        """The adapter arguments of prefill or step for these rows' table entries: none
        (the base's program) unless one row is adapted, or while warming that path up."""
        if self._adapters is None or not (np.any(adapter) or self._warming_adapters):
            return ()
        return self._adapters, adapter

    def _advance_grammar(self, seq: _Seq, token: int) -> None:
        """Feed the token to the sequence's grammar; a complete grammar ends the sequence."""
        if not seq.matcher.consume_token(token):
            self._finish(seq, "error", f"the grammar refused token {token}: {seq.matcher.get_error()}")
        elif seq.matcher.is_stopped():
            self._finish(seq, "stop")

    def _text_of(self, token: int) -> str:
        text = self._token_text.get(token)
        if text is None:
            text = self._token_text[token] = self.tokenizer.decode([token])
        return text

    def _take_token(self, seq: _Seq, token: int, logprob: float, top_ids, top_lp) -> None:
        p = seq.params
        seq.tokens.append(token)
        stops_on_id = token in seq.stop_ids or (token in self.eos_ids and not p.ignore_eos)
        if p.logprobs is not None:
            k = p.logprobs
            seq.token_infos.append(TokenInfo(
                token, "" if stops_on_id else self._text_of(token), logprob,
                [(self._text_of(int(i)), float(lp)) for i, lp in zip(top_ids[:k], top_lp[:k])],
            ))
        if stops_on_id:
            self._finish(seq, "stop")
            return
        # A trailing U+FFFD is a character split between tokens: the next tokens may change
        # it, so it is neither final for stop strings nor sent.
        text, final = seq.detokenizer.add(seq.tokens, self.tokenizer.decode)
        cut, held = seq.stops.find(text, final) if seq.stops is not None else (-1, 0)
        if cut >= 0:
            seq.text = text[:cut]
            self._finish(seq, "stop")
            return
        seq.text = text
        if len(seq.tokens) >= p.max_tokens:
            self._finish(seq, "length")
            return
        # Text that may start a stop string waits until the next tokens decide it.
        ready = min(len(text) - held, final)
        if ready > seq.sent or p.logprobs is not None:
            self._send(seq, ready)

    def _send(self, seq: _Seq, ready: int) -> None:
        delta, seq.sent = seq.text[seq.sent:ready], max(seq.sent, ready)
        infos, seq.token_infos = seq.token_infos, []
        seq.sink({"type": "token", "text": delta, "tokens": infos})

    def _finish(self, seq: _Seq, reason: str, error: Optional[str] = None) -> None:
        if seq.finished:
            return
        seq.finished = True
        if seq.adapter:
            with self._lock:
                self._users[seq.adapter] -= 1
        if seq.slot >= 0:
            self._running.pop(seq.slot, None)
            self._free.append(seq.slot)
            self._free.sort()
            seq.slot = -1
        self.stats[f"finished_{reason}"] += 1
        try:  # a sink that raises loses its own events, nothing else
            if reason in ("stop", "length") and (len(seq.text) > seq.sent or seq.token_infos):
                self._send(seq, len(seq.text))
            seq.sink({
                "type": "done", "finish_reason": reason, "text": seq.text, "error": error,
                "prompt_logprobs": seq.prompt_logprobs if seq.params.echo_logprobs else None,
                "prompt_tokens": len(seq.prompt), "completion_tokens": len(seq.tokens), "cached_tokens": seq.cached,
            })
        except Exception:
            log.exception("a request's sink failed")


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_float32(v) -> bool:
    """A real number (not a bool) that float32 holds without becoming inf or NaN."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)) and \
        abs(v) <= FLOAT32_MAX and math.isfinite(v)


def _is_sequence(v) -> bool:
    return isinstance(v, (list, tuple, np.ndarray))


def _eos_ids(tokenizer, cfg) -> list:
    """Every id that ends a sequence: the tokenizer's (`eos_ids`, else `eos_id`) and the model's."""
    ids = list(getattr(tokenizer, "eos_ids", ()) or ())
    try:
        ids.append(tokenizer.eos_id)
    except (AttributeError, ValueError):  # a tokenizer without an EOS token
        pass
    ids.append(cfg.eos_token_id)
    return list(dict.fromkeys(int(i) for i in ids if i is not None))
