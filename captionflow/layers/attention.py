"""Multi-head scaled dot-product attention (Vaswani et al. 2017, sec. 3.2), with region
masks and the key/value cache of causal self-attention; additive attention (Xu et al. 2015)."""

import math

import torch
from torch import nn
from torch.nn import functional as F


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention over n_heads heads.

    Keys and values are projected apart from the query (`project_kv`), so a decoder can
    project the image once per caption and each word once per decoding. out_proj=False
    leaves the heads concatenated, for a layer that maps them itself (AoANet's AoA).
    """

    def __init__(self, d_model, n_heads, dropout, out_proj=True):
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model) if out_proj else nn.Identity()

    def project_kv(self, x):
        # x (B, S, d) -> keys, values (B, S, d)
        return self.key(x), self.value(x)

    def forward(self, x, keys, values, causal=False, mask=None):
        # x (B, T, d) queries' inputs; keys, values (B, S, d) projected -> (B, T, d)
        # causal (T == S): position i attends to positions <= i only
        # mask (B, S) bool: the keys that exist (padded image regions are False)
        B, T, d = x.shape
        h = self.n_heads

        def heads(y):
            return y.view(B, -1, h, d // h).transpose(1, 2)  # (B, h, S, d / h)

        drop = self.dropout if self.training else 0.0
        attn_mask = None if mask is None else mask[:, None, None, :]
        out = F.scaled_dot_product_attention(
            heads(self.query(x)), heads(keys), heads(values), attn_mask=attn_mask, dropout_p=drop, is_causal=causal
        )
        return self.out(out.transpose(1, 2).reshape(B, T, d))

    def self_attend(self, x, causal=False, mask=None):
        return self(x, *self.project_kv(x), causal, mask)

    def weights(self, x, keys, mask=None):
        """The attention weights `forward` applies (its fused kernel does not return them),
        for showing where a decoder looks; not used in training or decoding. No causal mask:
        for cross-attention. x (B, T, d), keys (B, S, d) projected, mask (B, S) bool
        -> (B, n_heads, T, S), each row summing to 1."""
        B, T, d = x.shape
        h = self.n_heads
        q = self.query(x).view(B, T, h, d // h).transpose(1, 2)  # (B, h, T, d / h)
        k = keys.view(B, -1, h, d // h).transpose(1, 2)  # (B, h, S, d / h)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // h)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        return scores.softmax(dim=-1)


class CausalSelfAttention(nn.Module):
    """Masked self-attention over a caption prefix (sec. 3.2.3), with a key/value cache.

    The decoder's causal sublayer: `forward` over a whole prefix, `extend` for one new
    position given the cached per-position tensors named in `cache_names`.
    """

    cache_names = ("k", "v")

    def __init__(self, d_model, n_heads, dropout):
        super().__init__()
        self.attn = MultiHeadAttention(d_model, n_heads, dropout)

    def forward(self, x):
        # x (B, T, d) -> (B, T, d)
        return self.attn.self_attend(x, causal=True)

    def extend(self, x, cache):
        # x (B, 1, d) the newest position; cache {"k", "v": (B, t, d)} of the earlier ones
        # -> (B, 1, d), {"k", "v": (B, 1, d)} to append to the cache
        k, v = self.attn.project_kv(x)
        out = self.attn(x, torch.cat([cache["k"], k], dim=1), torch.cat([cache["v"], v], dim=1))
        return out, {"k": k, "v": v}


class RegionSelfAttention(nn.Module):
    """Self-attention over image regions (sec. 3.2.3), an encoder's mixing sublayer."""

    def __init__(self, d_model, n_heads, dropout):
        super().__init__()
        self.attn = MultiHeadAttention(d_model, n_heads, dropout)

    def forward(self, x, mask=None):
        # x (B, R, d), mask (B, R) bool real regions or None -> (B, R, d)
        return self.attn.self_attend(x, mask=mask)


class AdditiveAttention(nn.Module):
    """Additive (soft) attention of an LSTM state over regions (Xu et al. 2015, eq. 4-6).

    The regions' projection `feat_proj(feats)` is computed once per image by the caller.
    """

    def __init__(self, feat_dim, hidden_size, att_size):
        super().__init__()
        self.feat_proj = nn.Linear(feat_dim, att_size)
        self.hidden_proj = nn.Linear(hidden_size, att_size)
        self.score = nn.Linear(att_size, 1)

    def forward(self, feats, feats_proj, h, mask=None):
        # feats (B, R, D), feats_proj (B, R, A), h (B, H), mask (B, R) bool -> context (B, D), alpha (B, R)
        e = self.score(torch.tanh(feats_proj + self.hidden_proj(h)[:, None])).squeeze(-1)
        if mask is not None:  # padded regions of variable-count region features
            e = e.masked_fill(~mask, float("-inf"))
        alpha = e.softmax(dim=-1)
        return (alpha[..., None] * feats).sum(dim=1), alpha
