"""ExpansionNet v2 (Hu, Cavicchioli and Capotondi 2023, "Exploiting Multiple Sequence Lengths
in Fast End to End Training for Image Captioning", arXiv:2208.06551).

The "expansion mechanism" replaces attention's fixed sequence length: a layer distributes its
input over a different number of learned expansion vectors (the forward, expanding pass) and
reads them back to the input length (the backward, contracting pass). Scores are split by
ReLU(z) and ReLU(-z) into two classes, each normalised by its sum instead of a softmax, and a
sigmoid selector blends the two classes' results.

  encoder  N_enc layers of Block Static Expansion (several learned sequences of fixed lengths,
           32..512 in the paper) + FFN; the outputs of all layers are merged by a linear map
  decoder  N_dec layers of Dynamic Expansion (16 expansion vectors per word, offset by the
           word, causal over the prefix) + cross-attention to the encoder + FFN; outputs of
           all layers merged likewise, then an untied output layer

Here the encoder reads pre-extracted region features feats["att"] rather than a Swin
backbone, and one `dropout` stands for the paper's five dropout rates (its XE recipe uses 0.3
everywhere, SCST 0.1). Dropout falls on the normalised expansion/contraction weights, like
attention dropout, rather than on the raw scores and expanded vectors. Positions are learned
(max_len of them).

The dynamic expansion is written so that it decodes with a cache (see DynamicExpansion):
per layer and word the cache holds four d_model vectors, like a transformer's two.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F

from captionflow.errors import CaptionflowError
from captionflow.layers import DecoderLayer, EncoderLayer
from captionflow.models.base import FeatureNorm, check_sizes
from captionflow.models.encoder_decoder import CachedDecoderCaptioner
from captionflow.models.registry import register_model


def _normalise(w, dims):
    """Divide non-negative weights by their sum over dims (the paper's ReLU normalisation).

    All-zero weights stay zero: the paper adds a small epsilon to the sum; clamping the sum to
    the smallest normal number of its dtype does the same without a constant that underflows
    to 0 in half precision.
    """
    total = w.sum(dim=dims, keepdim=True)
    return w / total.clamp_min(torch.finfo(total.dtype).tiny)


class StaticExpansion(nn.Module):
    """Block Static Expansion over image regions (encoder sublayer).

    N = sum(lengths) learned query vectors q_n and bias vectors b_n, split in G groups of the
    given lengths; keys k_r = W_k x_r and scores z[n, r] = q_n . k_r / sqrt(d).
      expand:   e+[n] = sum_r relu(z)[n, r] W_a x_r / sum_r relu(z)[n, r] + b_n
                (e- likewise with relu(-z) and W_b): N vectors whatever the number of regions
      contract: y+[r] = 1/G sum_g sum_{n in g} relu(z)[n, r] e+[n] / sum_{n in g} relu(z)[n, r],
                each region reads every group back with weights normalised within the group
      select:   y = s * y+ + (1 - s) * y-,  s = sigmoid(W_s x)
    The two classes (+ and -) are computed together, stacked on dim 1.

    The N expanded vectors are not formed: with fwd (N, R) and back (R, N) the normalised
    expanding and contracting weights, back @ (fwd @ W_a x + b) = (back @ fwd) @ W_a x +
    back @ b, and the (R, R) product back @ fwd costs R / d of the (N, d) one it replaces.
    """

    def __init__(self, d_model, lengths, dropout):
        super().__init__()
        self.n_groups = len(lengths)
        self.queries = nn.Parameter(torch.empty(sum(lengths), d_model))
        self.biases = nn.Parameter(torch.empty(sum(lengths), d_model))
        self.key = nn.Linear(d_model, d_model)
        self.value_a = nn.Linear(d_model, d_model)
        self.value_b = nn.Linear(d_model, d_model)
        self.selector = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)
        # (N, G) one-hot group membership of each expansion vector, for the per-group sums
        membership = torch.repeat_interleave(torch.arange(self.n_groups), torch.tensor(list(lengths)))
        self.register_buffer("groups", F.one_hot(membership, self.n_groups).float(), persistent=False)

    def forward(self, x, mask=None):
        # x (B, R, d), mask (B, R) bool real regions or None -> (B, R, d)
        z = self.queries @ self.key(x).transpose(1, 2) / math.sqrt(x.shape[-1])  # (B, N, R)
        w = torch.stack([F.relu(z), F.relu(-z)], dim=1)  # (B, 2, N, R): the two classes
        if mask is not None:  # padded regions take no part (and read back zeros)
            w = w.masked_fill(~mask[:, None, None, :], 0.0)
        values = torch.stack([self.value_a(x), self.value_b(x)], dim=1)  # (B, 2, R, d)
        fwd = self.dropout(_normalise(w, -1))  # (B, 2, N, R): expand, e = fwd @ values + biases
        w = w.transpose(-1, -2)  # (B, 2, R, N)
        group_totals = (w @ self.groups) @ self.groups.t()  # (B, 2, R, N): the sum over n's group
        back = self.dropout(w / group_totals.clamp_min(torch.finfo(group_totals.dtype).tiny))
        y = ((back @ fwd) @ values + back @ self.biases) / self.n_groups  # (B, 2, R, d) = back @ e / G
        s = torch.sigmoid(self.selector(x))
        return s * y[:, 0] + (1 - s) * y[:, 1]


class DynamicExpansion(nn.Module):
    """Dynamic Expansion over the caption prefix (decoder sublayer), causal, with a cache.

    Word j owns N expansion vectors: queries q[j, n] = Q_n + c_j and biases b[j, n] = B_n + c_j,
    where Q, B are learned (N, d) and c_j = W_c x_j. With keys k_i = W_k x_i,
        z[j, n, i] = q[j, n] . k_i / sqrt(d)
      expand:   e+[j, n] = sum_{i <= j} f+[j, n, i] W_a x_i,  f+ = relu(z) normalised over i <= j
      contract: y+[i] = sum_{j <= i, n} g+[i, j, n] (e+[j, n] + b[j, n]),
                g+ = relu(z[j, n, i]) normalised over (j, n) with j <= i
      select:   y = s * y+ + (1 - s) * y-,  s = sigmoid(W_s x); the "-" class uses relu(-z), W_b.
    No position sees a later one, in either pass.

    The two classes are computed together, stacked on dim 1.

    Decoding cache: e is linear in W_a x, so the contraction applies the combined weights
    sum_{j,n} g[i, j, n] f[j, n, i'] to W_a x_i' directly, and the bias term splits into
    sum_n (sum_j g) B_n + sum_j (sum_n g) c_j. The N expanded vectors per word are never
    formed: the cache holds 4 vectors per word (c, k, W_a x, W_b x; self-attention holds 2),
    and the weights f, g (O(t^2 N) scalars) are recomputed from them at each step, at
    O(t (t + N) d) cost, small next to the layer's O(d^2) projections of the new word.
    """

    cache_names = ("cond", "key", "value_a", "value_b")

    def __init__(self, d_model, n_exp, dropout):
        super().__init__()
        self.queries = nn.Parameter(torch.empty(n_exp, d_model))
        self.biases = nn.Parameter(torch.empty(n_exp, d_model))
        self.cond = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value_a = nn.Linear(d_model, d_model)
        self.value_b = nn.Linear(d_model, d_model)
        self.selector = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def _project(self, x):
        return {"cond": self.cond(x), "key": self.key(x), "value_a": self.value_a(x), "value_b": self.value_b(x)}

    def forward(self, x):
        # x (B, T, d) the whole prefix -> (B, T, d)
        return self._mix(x, **self._project(x))

    def extend(self, x, cache):
        # x (B, 1, d) the newest word; cache {name: (B, t, d)} -> (B, 1, d), {name: (B, 1, d)}
        new = self._project(x)
        full = {name: torch.cat([cache[name], new[name]], dim=1) for name in self.cache_names}
        return self._mix(x, **full), new

    def _mix(self, x_out, cond, key, value_a, value_b):
        # x_out (B, Q, d): inputs of the last Q of the T prefix words; cond .. value_b (B, T, d)
        # -> (B, Q, d) the outputs at those Q positions
        Q, T = x_out.shape[1], key.shape[1]
        scale = 1.0 / math.sqrt(key.shape[-1])
        z_word = cond @ key.transpose(1, 2) * scale  # (B, T_j, T_i): c_j . k_i
        z_exp = (key @ self.queries.t() * scale).transpose(1, 2)  # (B, N, T_i): Q_n . k_i
        z = z_word[:, :, None, :] + z_exp[:, None]  # (B, T_j, N, T_i)
        w = torch.stack([F.relu(z), F.relu(-z)], dim=1)  # (B, 2, T_j, N, T_i): the two classes
        pos = torch.arange(T, device=key.device)
        # expand: vector (j, n) reads the words i <= j
        f = w.masked_fill((pos[None, :] > pos[:, None])[:, None, :], 0.0)
        f = self.dropout(_normalise(f, -1))
        # contract: output word i (one of the last Q) reads the vectors (j, n) with j <= i
        g = w[..., T - Q :].permute(0, 1, 4, 2, 3)  # (B, 2, Q, T_j, N)
        g = g.masked_fill((pos[None, :] > pos[T - Q :, None])[:, :, None], 0.0)
        g = self.dropout(_normalise(g, (-2, -1)))
        mix = torch.einsum("bcqjn,bcjni->bcqi", g, f)  # (B, 2, Q, T_i): word i' through every (j, n)
        values = torch.stack([value_a, value_b], dim=1)  # (B, 2, T_i, d)
        y = mix @ values + g.sum(dim=3) @ self.biases + g.sum(dim=4) @ cond[:, None]  # (B, 2, Q, d)
        s = torch.sigmoid(self.selector(x_out))
        return s * y[:, 0] + (1 - s) * y[:, 1]


@register_model("expansionnet_v2")
class ExpansionNetV2(CachedDecoderCaptioner):
    """ExpansionNet v2 over region features; defaults are the paper's configuration.

    embed_size is d_model and hidden_size the feed-forward width (the registry's common option
    names); enc_expansions the Block Static Expansion lengths, dec_expansions the number of
    dynamic expansion vectors per word; max_len the number of learned positions.
    """

    def __init__(
        self,
        vocab_size,
        feat_dim,
        embed_size=512,
        hidden_size=2048,
        n_enc_layers=3,
        n_dec_layers=3,
        n_heads=8,
        enc_expansions=(32, 64, 128, 256, 512),
        dec_expansions=16,
        dropout=0.1,
        max_len=60,
    ):
        super().__init__()
        check_sizes(
            "expansionnet_v2",
            embed_size,
            n_heads,
            n_enc_layers=n_enc_layers,
            n_dec_layers=n_dec_layers,
            hidden_size=hidden_size,
            dec_expansions=dec_expansions,
            max_len=max_len,
        )
        if not isinstance(enc_expansions, (list, tuple)) or not enc_expansions or min(enc_expansions) < 1:
            raise CaptionflowError(
                f"model expansionnet_v2: enc_expansions must be a list of positive lengths, got {enc_expansions!r}"
            )
        self.vocab_size = vocab_size
        self.d_model = embed_size
        self.max_len = max_len
        self.att_norm = FeatureNorm(feat_dim)
        self.att_embed = nn.Linear(feat_dim, embed_size)
        self.encoder = nn.ModuleList(
            EncoderLayer(StaticExpansion(embed_size, enc_expansions, dropout), embed_size, hidden_size, dropout)
            for _ in range(n_enc_layers)
        )
        self.enc_merge = nn.Linear(n_enc_layers * embed_size, embed_size)
        self.enc_norm = nn.LayerNorm(embed_size)
        self.word_embed = nn.Embedding(vocab_size + 1, embed_size)
        self.pos_embed = nn.Embedding(max_len, embed_size)
        self.decoder = nn.ModuleList(
            DecoderLayer(
                DynamicExpansion(embed_size, dec_expansions, dropout), embed_size, hidden_size, n_heads, dropout
            )
            for _ in range(n_dec_layers)
        )
        self.dec_merge = nn.Linear(n_dec_layers * embed_size, embed_size)
        self.dec_norm = nn.LayerNorm(embed_size)
        self.logit = nn.Linear(embed_size, vocab_size + 1)
        self.dropout = nn.Dropout(dropout)
        self.xavier_init()

    def encode(self, att, mask):
        # att (B, R, D) normalised, mask (B, R) or None -> memory (B, R, d): the last layer
        # plus a merge of every layer's output
        x = self.dropout(self.att_embed(att))
        outputs = []
        for layer in self.encoder:
            x = layer(x, mask)
            outputs.append(x)
        return self.enc_norm(x + self.dropout(self.enc_merge(torch.cat(outputs, dim=-1))))

    def embed_tokens(self, tokens, start):
        # tokens (B, T) at positions start.. -> (B, T, d)
        end = start + tokens.shape[1]
        if end > self.max_len:
            raise CaptionflowError(
                f"model expansionnet_v2 has {self.max_len} positions (max_len) but was asked to decode {end} words; "
                "decode fewer words or build the model with a larger max_len"
            )
        positions = torch.arange(start, end, device=tokens.device)
        return self.dropout(self.word_embed(tokens)) * math.sqrt(self.d_model) + self.pos_embed(positions)

    def head(self, outputs):
        # one (B, T, d) per decoder layer -> logits (B, T, V + 1), merged like the encoder's
        y = self.dec_norm(outputs[-1] + self.dropout(self.dec_merge(torch.cat(outputs, dim=-1))))
        return self.logit(y)
