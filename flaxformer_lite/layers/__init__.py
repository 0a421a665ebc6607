"""Flax Linen modules: thin parameter holders over flaxformer_lite.ops."""

from flaxformer_lite.layers.attention import MultiHeadAttention
from flaxformer_lite.layers.basic import Dense, Embed, FeedForward, Norm, PositionEmbedding
from flaxformer_lite.layers.block import DecoderBlock, EncoderBlock
