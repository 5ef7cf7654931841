"""FC / Show and Tell (Vinyals et al. 2015, "Show and Tell: A Neural Image Caption Generator").

The pooled image feature, embedded, is the LSTM's first input; words follow.
"""

from torch import nn
from torch.nn import functional as F

from captionflow.models.base import CaptionModel, FeatureNorm
from captionflow.models.registry import register_model


@register_model("fc")
class ShowAndTell(CaptionModel):
    def __init__(self, vocab_size, feat_dim, embed_size=256, hidden_size=512, dropout=0.5):
        super().__init__()
        self.vocab_size = vocab_size
        self.fc_norm = FeatureNorm(feat_dim)
        self.img_embed = nn.Linear(feat_dim, embed_size)
        self.embed = nn.Embedding(vocab_size + 1, embed_size)
        self.lstm = nn.LSTMCell(embed_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.logit = nn.Linear(hidden_size, vocab_size + 1)

    def init_state(self, feats):
        # fc (B, D) -> h, c (B, H) after reading the image
        fc = self.fc_norm(feats["fc"])
        zeros = fc.new_zeros(fc.shape[0], self.lstm.hidden_size)
        h, c = self.lstm(self.dropout(self.img_embed(fc)), (zeros, zeros))
        return {"h": h, "c": c}

    def step(self, tokens, state):
        # tokens (B,) -> logprobs (B, V + 1)
        h, c = self.lstm(self.dropout(self.embed(tokens)), (state["h"], state["c"]))
        return F.log_softmax(self.logit(self.dropout(h)).float(), dim=-1), {"h": h, "c": c}
