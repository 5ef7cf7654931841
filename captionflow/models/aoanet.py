"""AoANet (Huang et al. 2019, "Attention on Attention for Image Captioning", ICCV).

Attention on Attention (sec. 3.1): from the attended vector v and its query q, an
information vector i = W_i [v; q] + b_i and a gate g = sigmoid(W_g [v; q] + b_g) give the
attended information i * g. The refiner (sec. 3.2) is a stack of multi-head self-attention
layers over the regions, each followed by AoA, a residual connection and layer norm. The
decoder (sec. 3.3) is an LSTM fed [word embedding, mean refined feature + previous context];
multi-head attention from its hidden state over the refined features, gated by AoA, gives
the context vector c_t, and p(y_t) = softmax(W_p c_t).

Defaults are the paper's COCO model: D = 1024 everywhere, 8 heads, 6 refining layers.
Where the paper is silent they follow the authors' released configuration: ReLU + dropout
after the region embedding, dropout 0.5 in the language model (region and word embeddings,
previous context, output), 0.1 on attention weights and the refiner's residual branch,
0.3 on the refiner's AoA input, and a layer norm on the decoder's attention query.

Two options follow the released code (models/AoAModel.py, AttModel.py) where it departs from
the paper, both off by default: norm_first=True gives its pre-LN refiner (a layer norm on each
layer's input, one more after the last layer), word_embed_activation="relu" its word embedding
nn.Sequential(Embedding, ReLU, Dropout).
"""

import torch
from torch import nn
from torch.nn import functional as F

from captionflow.errors import CaptionflowError
from captionflow.layers import AttentionOnAttention, MultiHeadAttention
from captionflow.models.base import CaptionModel, FeatureNorm, check_choice
from captionflow.models.registry import register_model


class RefinerLayer(nn.Module):
    """A' = LayerNorm(A + AoA(f_mh-att(A W_Q, A W_K, A W_V), A)) (sec. 3.2).

    norm_first moves the norm onto the branch input, A' = A + AoA(MHA(LN(A)), LN(A)), as in
    the authors' released code (the refiner then ends with one more layer norm).
    """

    def __init__(self, d_model, n_heads, attn_dropout, aoa_dropout, norm_first):
        super().__init__()
        self.norm_first = norm_first
        self.attention = MultiHeadAttention(d_model, n_heads, attn_dropout, out_proj=False)  # AoA maps the heads
        self.aoa = AttentionOnAttention(d_model, d_model, d_model, aoa_dropout)
        self.residual_dropout = nn.Dropout(attn_dropout)
        self.norm = nn.LayerNorm(d_model)

    def _branch(self, x, mask):
        # self-attention: every region is a query over all (real) regions
        attended = self.attention.self_attend(x, mask=mask)
        return self.residual_dropout(self.aoa(attended, x))

    def forward(self, x, mask=None):
        # x (B, R, D), mask (B, R) -> (B, R, D)
        if self.norm_first:
            return x + self._branch(self.norm(x), mask)
        return self.norm(x + self._branch(x, mask))


class Refiner(nn.Module):
    """The encoder's refining module: `layers` RefinerLayers, (B, R, D) -> (B, R, D).

    No positional information is used, so it is permutation-equivariant over regions.
    """

    def __init__(self, d_model, n_heads, layers, attn_dropout, aoa_dropout, norm_first):
        super().__init__()
        self.layers = nn.ModuleList(
            RefinerLayer(d_model, n_heads, attn_dropout, aoa_dropout, norm_first) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(d_model) if norm_first and layers else nn.Identity()

    def forward(self, x, mask=None):
        for layer in self.layers:
            x = layer(x, mask)
        return self.norm(x)


@register_model("aoanet")
class AoANet(CaptionModel):
    """AoANet: AoA refiner over regions, LSTM + multi-head AoA attention decoder.

    hidden_size is the model width D (region embedding, refiner, LSTM, context vector);
    embed_size is the word embedding size. feats may carry "att_mask" (B, R) bool, True
    for a real region: padded regions then take no part in any attention or in the mean.
    norm_first: the refiner's layers are pre-LN, with a final layer norm (the released code)
    rather than post-LN (the paper). word_embed_activation: "none" (the paper) or "relu" (the
    released code: ReLU on the word embedding, before its dropout).
    """

    image_state = ("mean", "keys", "values", "mask")
    option_choices = {"word_embed_activation": ("none", "relu")}

    def __init__(
        self,
        vocab_size,
        feat_dim,
        embed_size=1024,
        hidden_size=1024,
        n_heads=8,
        refiner_layers=6,
        dropout=0.5,
        attn_dropout=0.1,
        aoa_dropout=0.3,
        norm_first=False,
        word_embed_activation="none",
    ):
        super().__init__()
        check_choice(
            "aoanet", "word_embed_activation", word_embed_activation, self.option_choices["word_embed_activation"]
        )
        if n_heads < 1 or hidden_size % n_heads:
            raise CaptionflowError(f"aoanet: n_heads={n_heads} must be a positive divisor of hidden_size={hidden_size}")
        if refiner_layers < 0:
            raise CaptionflowError(f"aoanet: refiner_layers={refiner_layers} must be >= 0 (0 = no refining)")
        self.vocab_size = vocab_size
        self.word_embed_relu = word_embed_activation == "relu"
        self.att_norm = FeatureNorm(feat_dim)
        self.att_embed = nn.Sequential(nn.Linear(feat_dim, hidden_size), nn.ReLU(), nn.Dropout(dropout))
        self.refiner = Refiner(hidden_size, n_heads, refiner_layers, attn_dropout, aoa_dropout, norm_first)
        self.embed = nn.Embedding(vocab_size + 1, embed_size)
        self.lstm = nn.LSTMCell(embed_size + hidden_size, hidden_size)
        self.query_norm = nn.LayerNorm(hidden_size)
        self.attention = MultiHeadAttention(hidden_size, n_heads, attn_dropout, out_proj=False)
        self.aoa = AttentionOnAttention(hidden_size, hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.logit = nn.Linear(hidden_size, vocab_size + 1)

    def init_state(self, feats):
        """Embed and refine the regions once per image.

        feats {"att": (B, R, F), optional "att_mask": (B, R) bool} -> state: mean (B, D),
        keys/values (B, R, D), h/c/ctx (B, D) zeros, and mask (B, R) when given.
        """
        att = feats["att"]
        mask = feats.get("att_mask")
        if mask is not None:
            if mask.shape != att.shape[:2]:
                raise CaptionflowError(
                    f"aoanet: att_mask has shape {tuple(mask.shape)}, expected {tuple(att.shape[:2])} from att"
                )
            mask = mask.bool()
            if not mask.any(dim=1).all():
                raise CaptionflowError("aoanet: an image has no real region (an att_mask row is all False)")
        x = self.att_embed(self.att_norm(att))  # (B, R, D)
        if mask is not None:
            # padded rows are never attended to; zeroing them keeps NaN/inf padding out too
            x = x.masked_fill(~mask[..., None], 0.0)
        x = self.refiner(x, mask)
        if mask is None:
            mean = x.mean(dim=1)
        else:
            mean = x.masked_fill(~mask[..., None], 0.0).sum(dim=1) / mask.sum(dim=1, keepdim=True).to(x.dtype)
        keys, values = self.attention.project_kv(x)
        zeros = x.new_zeros(x.shape[0], x.shape[-1])
        state = {"mean": mean, "keys": keys, "values": values, "h": zeros, "c": zeros, "ctx": zeros}
        if mask is not None:
            state["mask"] = mask
        return state

    def attention_layer(self):
        return self.attention  # h_t's multi-head attention over the refined regions

    def step(self, tokens, state):
        # tokens (B,) -> logprobs (B, V + 1); x_t = [W_e y_{t-1}, mean + c_{t-1}] (sec. 3.3)
        emb = self.embed(tokens)
        if self.word_embed_relu:  # the released code's nn.Sequential(Embedding, ReLU, Dropout)
            emb = F.relu(emb)
        emb = self.dropout(emb)
        x = torch.cat([emb, state["mean"] + self.dropout(state["ctx"])], dim=-1)
        h, c = self.lstm(x, (state["h"], state["c"]))
        # multi-head attention from h_t over the refined regions, then AoA
        query = self.query_norm(h)[:, None]  # (B, 1, D)
        attended = self.attention(query, state["keys"], state["values"], mask=state.get("mask"))[:, 0]
        ctx = self.aoa(attended, h)
        logprobs = F.log_softmax(self.logit(self.dropout(ctx)).float(), dim=-1)  # softmax(W_p c_t)
        return logprobs, {**state, "h": h, "c": c, "ctx": ctx}
