"""Tiny models, fixed prompt shapes and uncached references for the decoding tests.

Every generate call here uses B=3 prompts of lengths 3, 9, 14 (padded to 16) and 8 new
tokens, so the tests of one model share one compiled program per method.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

import flaxformer_lite as ffl
from flaxformer_lite.models import build_model, init_params

TINY = (
    "model.d_model=32", "model.num_heads=4", "model.head_dim=8", "model.d_ff=64",
    "model.num_layers=2", "model.num_decoder_layers=2", "model.max_len=64", "data.seq_len=64",
    "model.vocab_size=384",
)
PROMPT_LENGTHS = (3, 9, 14)
NEW_TOKENS = 8
WIDTH = 16 + NEW_TOKENS  # padded prompt + new tokens: one shape for every reference pass


@functools.lru_cache(maxsize=None)
def tiny(preset: str, *overrides: str):
    """(model, params) of a preset shrunk to CPU test size, with random parameters.

    Drawn with numpy from the traced shapes: the model's own initialisers would cost a
    compile per config, and any random weights serve these tests. Norm scales are near 1.
    """
    cfg = ffl.load_config(preset, overrides=[*TINY, *overrides]).model
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    rng = np.random.default_rng(7)

    def draw(path, s):
        centre = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0
        return jnp.asarray(rng.normal(centre, 0.1, s.shape), s.dtype)

    return build_model(cfg), jax.tree_util.tree_map_with_path(draw, shapes)


def prompts_for(model, seed: int = 0) -> list[list[int]]:
    """Random prompts of PROMPT_LENGTHS ids, none of them special (ids 0-3)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(4, model.cfg.vocab_size, n).tolist() for n in PROMPT_LENGTHS]


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, params, ids, mask, decoder_ids):
    if model.cfg.family == "decoder":
        return model.apply(params, ids, attention_mask=mask).logits
    return model.apply(params, ids, decoder_ids, attention_mask=mask).logits


def full_logits(model, params, prompts, new_BT) -> np.ndarray:
    """[B,T,V] uncached logits predicting each new token, every row run without left padding.

    Decoder-only: prompt + new tokens right-padded (causal attention never looks right).
    Encoder-decoder: the prompt, right-padded and masked, encoded; the decoder reads
    decoder_start + new tokens shifted right.
    """
    new_BT = np.asarray(new_BT)
    B, T = new_BT.shape
    if model.cfg.family == "decoder":
        rows = [list(p) + new_BT[b].tolist() for b, p in enumerate(prompts)]
        ids, mask = _right_pad(rows, WIDTH)
        logits = np.asarray(_apply(model, params, ids, mask, None))
        return np.stack([logits[b, len(p) - 1: len(p) - 1 + T] for b, p in enumerate(prompts)])
    ids, mask = _right_pad(prompts, 16)
    start = np.full((B, 1), model.cfg.decoder_start_token_id)
    decoder_ids = jnp.asarray(np.concatenate([start, new_BT[:, :-1]], 1), jnp.int32)
    return np.asarray(_apply(model, params, ids, mask, decoder_ids))


def _right_pad(rows, width):
    ids = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for b, r in enumerate(rows):
        ids[b, : len(r)], mask[b, : len(r)] = r, 1
    return jnp.asarray(ids), jnp.asarray(mask)


def uncached_greedy(model, params, prompts, stop_ids) -> np.ndarray:
    """[B,T] greedy tokens from full forward passes (no cache, no left padding)."""
    B, pad = len(prompts), model.cfg.pad_token_id
    tokens = np.full((B, NEW_TOKENS), pad, np.int64)
    done = np.zeros(B, bool)
    for t in range(NEW_TOKENS):
        step = full_logits(model, params, prompts, tokens)[:, t]
        choice = np.where(done, pad, step.argmax(-1))
        tokens[:, t] = choice
        done |= np.isin(choice, stop_ids)
    return tokens
