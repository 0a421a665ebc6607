"""Pure JAX functions: no Flax, no parameters, no config objects."""

from flaxformer_lite.ops.attention import (
    cache_rows,
    cached_dot_product_attention,
    causal_mask,
    combine_masks,
    dot_product_attention,
    lengths_to_valid,
    padding_mask,
    segment_mask,
    sliding_window_mask,
    soft_cap,
    splash_attention,
    splash_block,
    splash_visible_blocks,
)
from flaxformer_lite.ops.ffn import ACTIVATIONS, GATED, activate, feed_forward, is_gated
from flaxformer_lite.ops.gradients import materialize_cotangent
from flaxformer_lite.ops.losses import chunked_cross_entropy, cross_entropy
from flaxformer_lite.ops.norms import layer_norm, rms_norm
from flaxformer_lite.ops.quant import (
    NF4_BLOCK,
    NF4_CODEBOOK,
    int8_dequantize,
    int8_quantize,
    nf4_dequantize,
    nf4_quantize,
    tied,
)
from flaxformer_lite.ops.positions import (
    alibi_bias,
    alibi_slopes,
    relative_position_bias,
    relative_position_bucket,
    rope,
    rope_frequencies,
    sinusoidal,
)
