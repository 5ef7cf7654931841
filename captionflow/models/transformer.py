"""Transformer captioner (Vaswani et al. 2017, "Attention Is All You Need").

The image regions feats["att"] (B, R, D), projected to d_model, pass through N encoder
layers of self-attention; N decoder layers apply masked self-attention over the caption
prefix, cross-attention to the encoder memory and a feed-forward network (sec. 3.1), all
from captionflow.layers (pre-LN). Positions are sinusoidal (sec. 3.5); the output layer
shares the word-embedding matrix (sec. 3.4). Decoding and its key/value cache are
CachedDecoderCaptioner's (models/encoder_decoder.py).

Two options follow ruotianluo/ImageCaptioning.pytorch (models/TransformerModel.py), both off
by default: region_embed_activation="relu" puts a ReLU between the region embedding and its
dropout (its att_embed), tie_output=False gives the output layer a weight of its own (its
Generator, a Linear with bias) instead of the word-embedding matrix.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F

from captionflow.layers import CausalSelfAttention, DecoderLayer, EncoderLayer, RegionSelfAttention, sinusoids
from captionflow.models.base import FeatureNorm, check_choice, check_sizes
from captionflow.models.encoder_decoder import CachedDecoderCaptioner
from captionflow.models.registry import register_model


@register_model("transformer")
class TransformerCaptioner(CachedDecoderCaptioner):
    """Encoder-decoder Transformer over region features (Vaswani et al. 2017).

    embed_size is d_model and hidden_size the feed-forward width d_ff (the registry's common
    option names); n_layers encoder and n_layers decoder layers. region_embed_activation:
    "none" or "relu" after the region embedding's Linear. tie_output: the output layer's
    weight is the word-embedding matrix (plus a bias of its own), or, False, a Linear of its own.
    """

    option_choices = {"region_embed_activation": ("none", "relu")}

    def __init__(
        self,
        vocab_size,
        feat_dim,
        embed_size=512,
        hidden_size=2048,
        n_layers=3,
        n_heads=8,
        dropout=0.1,
        region_embed_activation="none",
        tie_output=True,
    ):
        super().__init__()
        check_sizes("transformer", embed_size, n_heads, n_layers=n_layers, hidden_size=hidden_size)
        check_choice(
            "transformer",
            "region_embed_activation",
            region_embed_activation,
            self.option_choices["region_embed_activation"],
        )
        self.vocab_size = vocab_size
        self.region_embed_relu = region_embed_activation == "relu"
        self.tie_output = tie_output
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
        if tie_output:
            self.logit_bias = nn.Parameter(torch.zeros(vocab_size + 1))
        else:
            self.logit = nn.Linear(embed_size, vocab_size + 1)  # xavier_init below sets its weight
        self.dropout = nn.Dropout(dropout)
        self.xavier_init()

    def encode(self, att, mask):
        # att (B, R, D) normalised, mask (B, R) or None -> memory (B, R, d)
        x = self.att_embed(att)
        if self.region_embed_relu:
            x = F.relu(x)
        x = self.dropout(x)
        for layer in self.encoder:
            x = layer(x, mask)
        return self.enc_norm(x)

    def embed_tokens(self, tokens, start):
        # tokens (B, T) at positions start.. -> (B, T, d); embeddings scaled by sqrt(d) (sec. 3.4)
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        pe = sinusoids(positions, self.d_model).to(self.word_embed.weight.dtype)  # (T, d)
        return self.dropout(self.word_embed(tokens) * math.sqrt(self.d_model) + pe)

    def head(self, outputs):
        # last decoder layer (B, T, d) -> logits (B, T, V + 1), through the shared embedding when tied
        x = self.dec_norm(outputs[-1])
        if self.tie_output:
            return F.linear(x, self.word_embed.weight, self.logit_bias)
        return self.logit(x)
