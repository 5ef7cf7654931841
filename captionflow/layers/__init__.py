"""Building blocks every captioning model shares: attention with masks and a key/value
cache, the feed-forward network, pre-LN encoder/decoder layers, position encodings, and
AoANet's attention on attention. Layers know nothing of vocabularies or decoding."""

from captionflow.layers.aoa import AttentionOnAttention
from captionflow.layers.attention import AdditiveAttention, CausalSelfAttention, MultiHeadAttention, RegionSelfAttention
from captionflow.layers.blocks import DecoderLayer, EncoderLayer, FeedForward
from captionflow.layers.position import sinusoids

__all__ = [
    "AdditiveAttention",
    "AttentionOnAttention",
    "CausalSelfAttention",
    "DecoderLayer",
    "EncoderLayer",
    "FeedForward",
    "MultiHeadAttention",
    "RegionSelfAttention",
    "sinusoids",
]
