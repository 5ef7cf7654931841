"""Transformer captioner (Vaswani et al. 2017, "Attention Is All You Need").

The image regions feats["att"] (B, R, D), projected to d_model, pass through N encoder
layers of self-attention; N decoder layers apply masked self-attention over the caption
prefix, cross-attention to the encoder memory and a feed-forward network (sec. 3.1), all
from captionflow.layers (pre-LN). Positions are sinusoidal (sec. 3.5); the output layer
shares the word-embedding matrix (sec. 3.4). Decoding and its key/value cache are
CachedDecoderCaptioner's (models/encoder_decoder.py).
"""

import math

import torch
from torch import nn
from torch.nn import functional as F

from captionflow.layers import CausalSelfAttention, DecoderLayer, EncoderLayer, RegionSelfAttention, sinusoids
from captionflow.models.base import FeatureNorm, check_sizes
from captionflow.models.encoder_decoder import CachedDecoderCaptioner
from captionflow.models.registry import register_model


@register_model("transformer")
class TransformerCaptioner(CachedDecoderCaptioner):
    """Encoder-decoder Transformer over region features (Vaswani et al. 2017).

    embed_size is d_model and hidden_size the feed-forward width d_ff (the registry's common
    option names); n_layers encoder and n_layers decoder layers.
    """

    def __init__(self, vocab_size, feat_dim, embed_size=512, hidden_size=2048, n_layers=3, n_heads=8, dropout=0.1):
        super().__init__()
        check_sizes("transformer", embed_size, n_heads, n_layers=n_layers, hidden_size=hidden_size)
        self.vocab_size = vocab_size
        self.d_model = embed_size
        self.att_norm = FeatureNorm(feat_dim)
        self.att_embed = nn.Linear(feat_dim, embed_size)
        self.encoder = nn.ModuleList(
            EncoderLayer(RegionSelfAttention(embed_size, n_heads, dropout), embed_size, hidden_size, dropout)
            for _ in range(n_layers)
        )
        self.enc_norm = nn.LayerNorm(embed_size)
        self.word_embed = nn.Embedding(vocab_size + 1, embed_size)
        self.decoder = nn.ModuleList(
            DecoderLayer(CausalSelfAttention(embed_size, n_heads, dropout), embed_size, hidden_size, n_heads, dropout)
            for _ in range(n_layers)
        )
        self.dec_norm = nn.LayerNorm(embed_size)
        self.logit_bias = nn.Parameter(torch.zeros(vocab_size + 1))
        self.dropout = nn.Dropout(dropout)
        self.xavier_init()

    def encode(self, att, mask):
        # att (B, R, D) normalised, mask (B, R) or None -> memory (B, R, d)
        x = self.dropout(self.att_embed(att))
        for layer in self.encoder:
            x = layer(x, mask)
        return self.enc_norm(x)

    def embed_tokens(self, tokens, start):
        # tokens (B, T) at positions start.. -> (B, T, d); embeddings scaled by sqrt(d) (sec. 3.4)
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        pe = sinusoids(positions, self.d_model).to(self.word_embed.weight.dtype)  # (T, d)
        return self.dropout(self.word_embed(tokens) * math.sqrt(self.d_model) + pe)

    def head(self, outputs):
        # last decoder layer (B, T, d) -> logits (B, T, V + 1) through the shared embedding
        return F.linear(self.dec_norm(outputs[-1]), self.word_embed.weight, self.logit_bias)
