"""The feed-forward network and the pre-LN encoder and decoder layers (Vaswani et al. 2017,
sec. 3.1 and 3.3). Layers normalise their input (pre-LN) rather than their output: it
trains without a long warm-up. The mixing sublayer is a parameter, so ExpansionNet v2's
expansions slot in where self-attention sits."""

from torch import nn
from torch.nn import functional as F

from captionflow.layers.attention import MultiHeadAttention


class FeedForward(nn.Module):
    """Position-wise feed-forward network, d -> d_ff -> d with ReLU (sec. 3.3)."""

    def __init__(self, d_model, d_ff, dropout):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.fc2(self.dropout(F.relu(self.fc1(x))))


class EncoderLayer(nn.Module):
    """Pre-LN encoder layer: `mixer` over the regions, then the feed-forward network.

    `mixer(x, mask)` mixes the regions: RegionSelfAttention, or ExpansionNet v2's static
    expansion.
    """

    def __init__(self, mixer, d_model, d_ff, dropout):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.mixer = mixer
        self.norm2 = nn.LayerNorm(d_model)
        self.ff = FeedForward(d_model, d_ff, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, mask=None):
        # x (B, R, d), mask (B, R) bool real regions or None -> (B, R, d)
        x = x + self.dropout(self.mixer(self.norm1(x), mask))
        return x + self.dropout(self.ff(self.norm2(x)))


class DecoderLayer(nn.Module):
    """Pre-LN decoder layer: causal mixing of the prefix, cross-attention to the image, FFN.

    `mixer` is the causal sublayer (CausalSelfAttention, or ExpansionNet v2's dynamic
    expansion); it offers forward(x) over a prefix and extend(x, cache) for one step, and
    names its per-position cache tensors in `cache_names`.
    """

    def __init__(self, mixer, d_model, d_ff, n_heads, dropout):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.mixer = mixer
        self.norm2 = nn.LayerNorm(d_model)
        self.cross = MultiHeadAttention(d_model, n_heads, dropout)
        self.norm3 = nn.LayerNorm(d_model)
        self.ff = FeedForward(d_model, d_ff, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, mem_k, mem_v, mem_mask=None):
        # x (B, T, d) the whole prefix, mem_k/mem_v (B, R, d), mem_mask (B, R) or None -> (B, T, d)
        x = x + self.dropout(self.mixer(self.norm1(x)))
        return self._cross_and_ff(x, mem_k, mem_v, mem_mask)

    def extend(self, x, mem_k, mem_v, cache, mem_mask=None):
        # x (B, 1, d) the newest position -> (B, 1, d), the mixer's new cache entries
        mixed, entries = self.mixer.extend(self.norm1(x), cache)
        return self._cross_and_ff(x + self.dropout(mixed), mem_k, mem_v, mem_mask), entries

    def _cross_and_ff(self, x, mem_k, mem_v, mem_mask):
        x = x + self.dropout(self.cross(self.norm2(x), mem_k, mem_v, mask=mem_mask))
        return x + self.dropout(self.ff(self.norm3(x)))
