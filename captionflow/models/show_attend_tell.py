"""Show, Attend and Tell (Xu et al. 2015), soft attention.

Attention over grid regions (eq. 4-6), LSTM state initialised from the mean feature, a
gating scalar beta on the context (sec. 4.2.1), the deep output layer (eq. 7) and the
doubly stochastic attention regulariser lambda * sum_i (1 - sum_t alpha_ti)^2 (eq. 14).
"""

import torch
from torch import nn
from torch.nn import functional as F

from captionflow.layers import AdditiveAttention
from captionflow.models.base import CaptionModel, FeatureNorm
from captionflow.models.registry import register_model


@register_model("show_attend_tell")
class ShowAttendTell(CaptionModel):
    image_state = ("att", "att_proj", "mask")

    def __init__(self, vocab_size, feat_dim, embed_size=256, hidden_size=512, att_size=256, dropout=0.5, alpha_reg=1.0):
        super().__init__()
        self.vocab_size = vocab_size
        self.alpha_reg = alpha_reg
        self.att_norm = FeatureNorm(feat_dim)
        self.embed = nn.Embedding(vocab_size + 1, embed_size)
        self.attention = AdditiveAttention(feat_dim, hidden_size, att_size)
        self.init_h = nn.Linear(feat_dim, hidden_size)
        self.init_c = nn.Linear(feat_dim, hidden_size)
        self.beta = nn.Linear(hidden_size, 1)
        self.lstm = nn.LSTMCell(embed_size + feat_dim, hidden_size)
        self.out_h = nn.Linear(hidden_size, embed_size)
        self.out_z = nn.Linear(feat_dim, embed_size)
        self.dropout = nn.Dropout(dropout)
        self.logit = nn.Linear(embed_size, vocab_size + 1)

    def init_state(self, feats):
        att = self.att_norm(feats["att"])  # (B, R, D)
        mask = feats.get("att_mask")  # (B, R) bool, region features with a variable box count
        if mask is None:
            mask = torch.ones(att.shape[:2], dtype=torch.bool, device=att.device)
        att = att * mask[..., None]
        mean = att.sum(dim=1) / mask.sum(dim=1, keepdim=True)
        return {
            "att": att,
            "att_proj": self.attention.feat_proj(att),  # computed once per image
            "mask": mask,
            "h": torch.tanh(self.init_h(mean)),
            "c": torch.tanh(self.init_c(mean)),
        }

    def step(self, tokens, state):
        # tokens (B,) -> logprobs (B, V + 1); alpha (B, R) kept as aux_alpha for the regulariser
        emb = self.embed(tokens)
        context, alpha = self.attention(state["att"], state["att_proj"], state["h"], state["mask"])
        z = torch.sigmoid(self.beta(state["h"])) * context
        h, c = self.lstm(torch.cat([emb, z], dim=-1), (state["h"], state["c"]))
        out = self.logit(self.dropout(emb + self.out_h(self.dropout(h)) + self.out_z(z)))
        new_state = {**state, "h": h, "c": c, "aux_alpha": alpha}
        return F.log_softmax(out.float(), dim=-1), new_state

    def attention_layer(self):
        return self.attention  # alpha (B, R) per word, eq. 5

    def aux_loss(self, aux, mask):
        # alpha (B, T, R), mask (B, T): every (real) region attended about once over the caption
        alpha = aux["aux_alpha"] * mask[..., None]
        real = aux["aux_alpha"][:, 0] > 0  # padded regions get exactly zero attention
        return self.alpha_reg * (((1.0 - alpha.sum(dim=1)) ** 2) * real).sum(dim=1).mean()
