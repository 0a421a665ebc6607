"""Model FLOPs per token and model-FLOPs utilisation (MFU), one formula for every caller.

The count follows the convention of the PaLM paper (Chowdhery et al. 2022, appendix B):
a training step costs three forward passes (forward, and backward at twice the forward),
and only matrix multiplications count. Per token of a sequence of T tokens,

    training FLOPs = 6 * N_matmul + 12 * L * T * N * H * (1/2 if causal)

where N_matmul counts the weights a token is multiplied with: every attention and
feed-forward projection of every layer, the pooler, MLM transform and classifier, and the
V x D output projection (tied or not). Embedding lookups, norms and biases do no matrix
multiplication and are left out. The attention term is QK^T and the weighted sum over V:
2 * T * N * H multiply-adds each per query token and layer. Causal self-attention is
counted at half (the average query sees half the keys), which is what a flash kernel
computes; XLA's dense attention computes the masked half too, so on the `xla` path the
MFU is an under-estimate by that much. Local (sliding-window) layers count only the keys
in their window W: W^2/2 + (T - W) W query-key pairs when causal, T (2W - 1) at most when
not (the same T^2/2 or T^2 once W >= T).

Encoder-decoder models count encoder tokens (S = seq_len) and decoder tokens
(T = target_len) separately; "per token" divides by S + T. Cross-attention key/value
projections run over the S encoder outputs.

With LoRA (model.lora.rank > 0) the base is frozen: its weight gradients are never
computed, so a step costs the forward, the input gradients (one more pass over the
weights) and the attention backward, plus three passes over the adapters:

    LoRA training FLOPs = 4 * N_matmul + 3 * attention + 6 * N_adapter

where N_adapter counts R * (in + out) for each adapted projection a token goes through.

MFU = achieved model FLOP/s / peak FLOP/s. The peak is `train.peak_flops` from the config,
or a square matmul timed once per process on the default device (`matmul_peak_flops`).
"""

from __future__ import annotations

import functools
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from flaxformer_lite.config import ModelConfig
from flaxformer_lite.ops.ffn import is_gated


def _ffn_weights(cfg: ModelConfig) -> int:
    return (3 if is_gated(cfg.activation) else 2) * cfg.d_model * cfg.d_ff


def _head_dim(cfg: ModelConfig) -> int:
    return cfg.head_dim or cfg.d_model // cfg.num_heads


def _qo_weights(cfg: ModelConfig) -> int:
    return 2 * cfg.d_model * cfg.num_heads * _head_dim(cfg)


def _kv_weights(cfg: ModelConfig) -> int:
    return 2 * cfg.d_model * (cfg.num_kv_heads or cfg.num_heads) * _head_dim(cfg)


def _attention_flops(cfg: ModelConfig, queries: int, keys: int, causal: bool) -> float:
    """Forward FLOPs of QK^T and probs @ V for one sequence in one layer."""
    flops = 4.0 * queries * keys * cfg.num_heads * _head_dim(cfg)
    return flops / 2 if causal else flops


def _self_attention_flops(cfg: ModelConfig, tokens: int, causal: bool) -> float:
    """Forward self-attention FLOPs of one sequence summed over the layers, windows counted."""
    W, T = cfg.sliding_window, tokens
    total = 0.0
    for kind in cfg.layer_attention_types():
        if kind == "global" or W >= T:
            total += _attention_flops(cfg, T, T, causal)
        else:
            pairs = W * W / 2 + (T - W) * W if causal else T * min(T, 2 * W - 1)
            total += 4.0 * pairs * cfg.num_heads * _head_dim(cfg)
    return total


def _forward_parts(cfg: ModelConfig, seq_len: int, target_len: Optional[int]) -> tuple[float, float, float]:
    """Forward FLOPs of one sequence: (weight matmuls, attention, LoRA adapters)."""
    D, V = cfg.d_model, cfg.vocab_size
    layer = _qo_weights(cfg) + _kv_weights(cfg) + _ffn_weights(cfg)
    qo, kv, ffn = (_adapter_weights(cfg, names) for names in (("query", "out"), ("key", "value"), ("wi", "wg", "wo")))
    if cfg.family == "decoder":
        T = seq_len
        weights = cfg.num_layers * layer + V * D
        return 2.0 * weights * T, _self_attention_flops(cfg, T, causal=True), 2.0 * cfg.num_layers * (qo + kv + ffn) * T
    if cfg.family == "encoder":
        T = seq_len
        weights = cfg.num_layers * layer
        if cfg.mlm_head:
            weights += D * D + V * D
        # The pooler and classifier see one token a sequence.
        matmuls = 2.0 * weights * T + 2.0 * ((D * D if cfg.pooler else 0) + D * cfg.num_labels)
        return matmuls, _self_attention_flops(cfg, T, causal=False), 2.0 * cfg.num_layers * (qo + kv + ffn) * T
    S, T = seq_len, target_len or seq_len
    dec_layers = cfg.num_decoder_layers or cfg.num_layers
    # Decoder layer: self-attention and FFN over T, cross-attention Q/O over T, K/V over S.
    matmuls = 2.0 * cfg.num_layers * layer * S + 2.0 * V * D * T
    matmuls += 2.0 * dec_layers * ((layer + _qo_weights(cfg)) * T + _kv_weights(cfg) * S)
    attention = cfg.num_layers * _attention_flops(cfg, S, S, causal=False)
    attention += dec_layers * (_attention_flops(cfg, T, T, causal=True) + _attention_flops(cfg, T, S, causal=False))
    adapters = 2.0 * cfg.num_layers * (qo + kv + ffn) * S
    adapters += 2.0 * dec_layers * ((2 * qo + kv + ffn) * T + kv * S)
    return matmuls, attention, adapters


def _adapter_weights(cfg: ModelConfig, names: tuple[str, ...]) -> int:
    """R * (in + out) summed over the projections among `names` that carry a LoRA adapter."""
    if not cfg.lora.rank:
        return 0
    D, F, H = cfg.d_model, cfg.d_ff, _head_dim(cfg)
    sizes = {"query": D + cfg.num_heads * H, "key": D + (cfg.num_kv_heads or cfg.num_heads) * H,
             "out": D + cfg.num_heads * H, "wi": D + F, "wg": D + F if is_gated(cfg.activation) else 0, "wo": D + F}
    sizes["value"] = sizes["key"]
    return cfg.lora.rank * sum(sizes[n] for n in names if n in cfg.lora.targets)


def forward_flops_per_sequence(cfg: ModelConfig, seq_len: int, target_len: Optional[int] = None) -> float:
    """Matmul FLOPs of one forward pass over one sequence (see the module docstring).

    seq_len: tokens of the (only) stack, or the encoder's for encoder_decoder.
    target_len: decoder tokens of an encoder_decoder (None: = seq_len).
    """
    return sum(_forward_parts(cfg, seq_len, target_len))


def tokens_per_sequence(cfg: ModelConfig, seq_len: int, target_len: Optional[int] = None) -> int:
    """The tokens a sequence row holds: seq_len, plus target_len for encoder_decoder."""
    if cfg.family == "encoder_decoder":
        return seq_len + (target_len or seq_len)
    return seq_len


def training_flops_per_token(cfg: ModelConfig, seq_len: int, target_len: Optional[int] = None) -> float:
    """Model FLOPs of one training step per token: 3x the forward pass (PaLM convention);
    with LoRA, the frozen base's weight gradients left out (see the module docstring)."""
    matmuls, attention, adapters = _forward_parts(cfg, seq_len, target_len)
    step = (2.0 if cfg.lora.rank else 3.0) * matmuls + 3.0 * (attention + adapters)
    return step / tokens_per_sequence(cfg, seq_len, target_len)


def matmul_timer(dtype: str = "float32", size: int = 2048) -> Callable[[], float]:
    """A function that runs one jitted size^3 matmul on the default device, returning seconds.

    Compiled and run once on creation, so every call times the product alone.
    """
    keys = jax.random.split(jax.random.key(0))
    a, b = (jax.random.normal(k, (size, size), jnp.dtype(dtype)) for k in keys)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()

    def seconds() -> float:
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        return time.perf_counter() - start

    return seconds


def matmul_flops_from_seconds(size: int, seconds: float) -> float:
    """FLOP/s of a size^3 matmul that took `seconds`."""
    return 2.0 * size**3 / seconds


@functools.cache
def matmul_peak_flops(dtype: str = "float32", size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a jitted size^3 matmul on the default device: the best of `repeats` runs.

    Measured once per (dtype, size) and process, then cached; the first call compiles and
    takes a second or so on a CPU.
    """
    time_one = matmul_timer(dtype, size)
    return matmul_flops_from_seconds(size, min(time_one() for _ in range(repeats)))


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model-FLOPs utilisation: the fraction of `peak_flops` the model's FLOPs use."""
    if peak_flops <= 0:
        raise ValueError(f"peak_flops={peak_flops} must be > 0")
    return tokens_per_s * flops_per_token / peak_flops
