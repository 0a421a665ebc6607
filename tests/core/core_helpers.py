"""Small shared pieces of the core acceptance tests: tiny configs and random inputs."""

import dataclasses
import typing

import jax
import numpy as np

from flaxformer_lite import ops
from flaxformer_lite.config import ModelConfig, Position
from flaxformer_lite.models import init_params

# One batch shape everywhere: eager JAX compiles each primitive once per shape, so shared
# shapes keep the folder fast.
B, T = 2, 8
TINY = ModelConfig(vocab_size=64, d_model=32, num_heads=4, d_ff=64, num_layers=1, max_len=32)
POSITIONS = typing.get_args(Position)
ENC_DEC_POSITIONS = tuple(p for p in POSITIONS if p != "alibi")  # the config rejects ALiBi there


def tiny(**overrides) -> ModelConfig:
    """A CPU-sized ModelConfig (d_model 32, 1 layer) with the given fields replaced."""
    return dataclasses.replace(TINY, **overrides)


def key(seed: int = 0) -> jax.Array:
    """A PRNG key of the 'rbg' implementation.

    Eager threefry compiles a fresh kernel (seconds on CPU) for every new shape it draws;
    rbg keys are cheap. The tests never depend on the stream.
    """
    return jax.random.key(seed, impl="rbg")


def random_like(shapes, seed: int = 0):
    """A tree of NumPy draws shaped like `shapes`: norm scales near 1, everything else N(0, 0.1^2).

    Cheaper than the initialisers (no RNG kernel to compile per shape), and random biases
    and norm parameters exercise paths that zero/one initial values would hide.
    """
    g = np.random.default_rng(seed)

    def draw(path, leaf):
        x = 0.1 * g.normal(size=leaf.shape)
        return (x + (jax.tree_util.keystr(path).endswith("['scale']"))).astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def init(cfg: ModelConfig, seed: int = 0) -> dict:
    """Random parameters with exactly init_params' tree (names, shapes, dtypes)."""
    return random_like(jax.eval_shape(lambda: init_params(cfg, jax.random.key(0))), seed)


def random_ids(seed: int, batch: int, length: int, vocab: int) -> np.ndarray:
    """[B,T] int32 token ids, avoiding the special ids 0..2."""
    return np.random.default_rng(seed).integers(3, vocab, (batch, length)).astype(np.int32)


def normal(seed: int, *shape) -> np.ndarray:
    """float32 standard normal samples from NumPy."""
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def model_args(cfg: ModelConfig, ids_BT, decoder_ids_BT=None) -> tuple:
    """Positional inputs of build_model(cfg): (ids,) or (ids, decoder_ids)."""
    if cfg.family == "encoder_decoder":
        return (ids_BT, ids_BT if decoder_ids_BT is None else decoder_ids_BT)
    return (ids_BT,)


def lm_loss(out, labels_BT) -> jax.Array:
    """Cross-entropy on the logits, or a squared norm of the hidden states when there are none."""
    if out.logits is None:
        return (out.hidden_states**2).mean()
    return ops.cross_entropy(out.logits, labels_BT)[0]


def assert_tree_close(actual, expected, rtol=1e-5, atol=1e-6):
    """Leaf-wise assert_allclose over two pytrees of the same structure."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)

    def close(path, a, e):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol,
                                   err_msg=jax.tree_util.keystr(path))

    jax.tree_util.tree_map_with_path(close, actual, expected)
