"""Show, Attend and Tell (Xu et al. 2015), soft attention.

Attention over grid regions (eq. 4-6), LSTM state initialised from the mean feature, a
gating scalar beta on the context (sec. 4.2.1), the deep output layer (eq. 7) and the
doubly stochastic attention regulariser lambda * sum_i (1 - sum_t alpha_ti)^2 (eq. 14).

Two options follow the authors' code (kelvinxu/arctic-captions, capgen.py), both off by
default: readout_activation="tanh" applies its tanh to E y_{t-1} + L_h h_t + L_z z_t before
the output layer L_o, and alpha_reg_average="region" normalises the regulariser as its
alpha_c * ((1 - alphas.sum(0)) ** 2).sum(0).mean() does: alphas (T, B, R), so a mean over
regions of a sum over the batch's images (ours by default: a sum over regions, a mean over images).
"""

import torch
from torch import nn
from torch.nn import functional as F

from captionflow.layers import AdditiveAttention
from captionflow.models.base import CaptionModel, FeatureNorm, check_choice
from captionflow.models.registry import register_model


@register_model("show_attend_tell")
class ShowAttendTell(CaptionModel):
    """Soft-attention LSTM captioner (Xu et al. 2015).

    readout_activation: "none" (ours) or "tanh" (the authors' code) on the deep output's sum
    before the output layer. alpha_reg_average: how the regulariser's squared deficits
    (1 - sum_t alpha_ti)^2 are combined, "image" (summed over regions, averaged over images) or
    "region" (averaged over an image's real regions, summed over images, as the authors' code).
    """

    image_state = ("att", "att_proj", "mask")
    option_choices = {"readout_activation": ("none", "tanh"), "alpha_reg_average": ("image", "region")}

    def __init__(
        self,
        vocab_size,
        feat_dim,
        embed_size=256,
        hidden_size=512,
        att_size=256,
        dropout=0.5,
        alpha_reg=1.0,
        readout_activation="none",
        alpha_reg_average="image",
    ):
        super().__init__()
        for option, value in (("readout_activation", readout_activation), ("alpha_reg_average", alpha_reg_average)):
            check_choice("show_attend_tell", option, value, self.option_choices[option])
        self.vocab_size = vocab_size
        self.alpha_reg = alpha_reg
        self.readout_tanh = readout_activation == "tanh"
        self.alpha_reg_average = alpha_reg_average
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
        readout = emb + self.out_h(self.dropout(h)) + self.out_z(z)  # eq. 7's E y_{t-1} + L_h h_t + L_z z_t
        if self.readout_tanh:  # capgen.py: logit = tanh(logit) before ff_logit
            readout = torch.tanh(readout)
        out = self.logit(self.dropout(readout))
        new_state = {**state, "h": h, "c": c, "aux_alpha": alpha}
        return F.log_softmax(out.float(), dim=-1), new_state

    def attention_layer(self):
        return self.attention  # alpha (B, R) per word, eq. 5

    def aux_loss(self, aux, mask):
        # alpha (B, T, R), mask (B, T): every (real) region attended about once over the caption
        alpha = aux["aux_alpha"] * mask[..., None]
        real = aux["aux_alpha"][:, 0] > 0  # padded regions get exactly zero attention
        deficit = ((1.0 - alpha.sum(dim=1)) ** 2) * real  # (B, R)
        if self.alpha_reg_average == "region":  # the authors': mean over the regions, sum over the images
            return self.alpha_reg * (deficit.sum(dim=1) / real.sum(dim=1)).sum()
        return self.alpha_reg * deficit.sum(dim=1).mean()
