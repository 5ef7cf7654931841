"""Attention on Attention (Huang et al. 2019, "Attention on Attention for Image Captioning",
sec. 3.1): a layer on top of multi-head attention. From the attended vector v and its
query q, an information vector i = W_i [v; q] + b_i and a gate g = sigmoid(W_g [v; q] + b_g)
give the attended information i * g."""

import torch
from torch import nn
from torch.nn import functional as F


class AttentionOnAttention(nn.Module):
    """AoA: an information vector times a sigmoid gate, both linear in [attended; query].

    dropout acts on the [attended; query] input (AoANet's released refiner uses 0.3).
    """

    def __init__(self, attended_dim, query_dim, out_dim, dropout=0.0):
        super().__init__()
        self.input_dropout = nn.Dropout(dropout)
        # one projection to 2 * out_dim: the information half, then the gate half (as F.glu)
        self.proj = nn.Linear(attended_dim + query_dim, 2 * out_dim)

    def _project(self, attended, query):
        return self.proj(self.input_dropout(torch.cat([attended, query], dim=-1)))

    def info_and_gate(self, attended, query):
        # attended (..., A), query (..., Q) -> information (..., O), gate in (0, 1) (..., O)
        info, gate = self._project(attended, query).chunk(2, dim=-1)
        return info, torch.sigmoid(gate)

    def forward(self, attended, query):
        # (..., A), (..., Q) -> information * gate (..., O)
        return F.glu(self._project(attended, query), dim=-1)
