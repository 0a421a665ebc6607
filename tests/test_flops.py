"""The model-FLOPs formula: a hand count, and its weights against the parameter tree."""

import jax
import pytest

import flaxformer_lite as ffl
from flaxformer_lite.config import ModelConfig
from flaxformer_lite.models import flops

TINY = dict(vocab_size=10, d_model=8, num_heads=2, d_ff=16, num_layers=2, max_len=16, use_bias=False, position="rope")


def test_decoder_hand_count():
    cfg = ModelConfig(family="decoder", **TINY)
    # Per layer: Q,O 2*8*8 + K,V 2*8*8 + FFN 2*8*16 = 512; two layers and the 10x8 head: 1104.
    # Causal attention per layer at T=4: 4*4*4*(2 heads*4 dims)/2 = 256.
    forward = 2 * 1104 * 4 + 2 * 256
    assert flops.forward_flops_per_sequence(cfg, 4) == forward
    assert flops.training_flops_per_token(cfg, 4) == 3 * forward / 4


def test_local_layers_count_only_their_window():
    cfg = ModelConfig(family="decoder", sliding_window=2, attention_types=("local", "global"), **TINY)
    # The local layer at T=4, W=2: 2*2/2 + (4-2)*2 = 6 query-key pairs, 4*6*8 = 192; the global one 256.
    assert flops.forward_flops_per_sequence(cfg, 4) == 2 * 1104 * 4 + 192 + 256
    wide = ModelConfig(family="decoder", sliding_window=4, attention_types=("local", "global"), **TINY)
    assert flops.forward_flops_per_sequence(wide, 4) == 2 * 1104 * 4 + 2 * 256  # a window as long as T


def test_encoder_decoder_hand_count():
    cfg = ModelConfig(family="encoder_decoder", num_decoder_layers=1, **TINY)
    S, T = 6, 3
    encoder = 2 * 2 * 512 * S + 2 * (4 * S * S * 8)
    # The decoder layer adds cross-attention: Q,O on T tokens, K,V on the S encoder outputs.
    decoder = 2 * ((512 + 128) * T + 128 * S) + (4 * T * T * 8 / 2 + 4 * T * S * 8)
    head = 2 * 10 * 8 * T
    assert flops.forward_flops_per_sequence(cfg, S, T) == encoder + decoder + head
    assert flops.tokens_per_sequence(cfg, S, T) == S + T


def _matmul_weights(cfg: ModelConfig) -> int:
    """Elements of the parameter tree's matrices, without input embedding tables."""
    shapes = jax.eval_shape(lambda: ffl.init_params(cfg, jax.random.key(0)))
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        if leaf.ndim >= 2 and "embed" not in jax.tree_util.keystr(path):
            total += leaf.size
    return total


@pytest.mark.parametrize(
    "overrides",
    [
        dict(family="decoder", tie_embeddings=False, activation="swiglu", num_kv_heads=1),
        dict(family="encoder", mlm_head=True),
    ],
)
def test_linear_term_counts_every_matrix_once(overrides):
    # f(T) = a*T + b*T^2 per sequence: a/2 must be the weights a token is multiplied by.
    cfg = ModelConfig(**{**TINY, **overrides})
    f1, f2 = (flops.forward_flops_per_sequence(cfg, t) for t in (1, 2))
    b = (f2 - 2 * f1) / 2
    head = 0 if not cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
    assert (f1 - b) / 2 == _matmul_weights(cfg) + head


def test_mfu_arithmetic():
    assert flops.mfu(tokens_per_s=1000.0, flops_per_token=3e6, peak_flops=1e10) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="peak_flops"):
        flops.mfu(1.0, 1.0, 0.0)


def test_matmul_peak_is_positive_and_cached():
    peak = flops.matmul_peak_flops("float32", size=128, repeats=2)
    assert peak > 0
    assert flops.matmul_peak_flops("float32", size=128, repeats=2) == peak


def test_lora_skips_the_base_weight_gradients_and_counts_its_adapters():
    import dataclasses

    from flaxformer_lite.config import LoraConfig

    base = ModelConfig(family="decoder", tie_embeddings=False, activation="swiglu", num_kv_heads=1, **TINY)
    cfg = dataclasses.replace(base, lora=LoraConfig(rank=2, targets=("query", "key", "value", "out", "wi", "wg", "wo")))
    shapes = jax.eval_shape(lambda: ffl.init_params(cfg, jax.random.key(0)))
    adapters = sum(leaf.size for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]
                   if "lora" in jax.tree_util.keystr(path))
    T = 4
    # Full: 3 forwards. LoRA: less the base's weight gradients (one pass over its matrices),
    # plus forward and both gradients of every adapter.
    full = flops.training_flops_per_token(base, T) * T
    expected = full - 2 * _matmul_weights(base) * T + 6 * adapters * T
    assert flops.training_flops_per_token(cfg, T) * T == pytest.approx(expected, rel=1e-12)
