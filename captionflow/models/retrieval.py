"""Image-text retrieval models, in a registry of their own: GNA-RNN as published (Li et al.
2017, "Person Search with Natural Language Description", CVPR), its factorised fast variant,
and a dual-encoder baseline.

`gna_rnn` (published): the image feature fc gives an image embedding e = fc2(ReLU(BN(fc1 fc)))
and U visual units v = fc2'(ReLU(BN(fc1' fc))); an LSTM reads [word embedding x_t ; e] at
every step t, so its hidden state h_t depends on the image; unit-level attention
a_t = softmax(W_a h_t), word-level gate g_t = sigmoid(w_g h_t) (both from the dropped-out
h_t alone) give the affinity
    p(match) = sigmoid(sum_t g_t sum_u a_t,u v_u + b).
The LSTM must run once per (text, image) pair: `score_gallery` runs it over a chunk of texts
times every image of the gallery at once (the image side and the word side of the LSTM's
input projection computed once per image / per word), chunks bounded by `pair_budget` pairs.

`gna_rnn_factorised` (the fast variant, before issue 28 named `gna_rnn`): the LSTM reads the
words only and the attention reads [h_t; x_t], visual units v = W_v fc (ReLU with
relu_units=True: on the demo's random-init features the linear units reach text-to-image
R@1 4.2% after 8 epochs where ReLU units stay at chance, 1.0%). The sum then factorises:
s = sum_t g_t a_t is the description's vector and the logit is s . v + b, so a gallery is
one matrix product.

Dual encoder: mean-pooled word embeddings and the image feature, each projected and
normalised; logit = scale * cosine + b. It has no attention: the baseline that measures it.

Every model: score_gallery(tokens (N, T), lengths (N,), fc (M, D)) -> (N, M) logits of every
text against every image; score_pairs(tokens, lengths, fc (M, D), index (N, C)) -> (N, C)
the logit of text n with image fc[index[n, c]] (training: positives and negatives);
forward(tokens, lengths, fc (N, D)) -> (N,) the logits of N (text, image) pairs. Token 0 pads.
"""

import torch
from torch import nn
from torch.nn import functional as F

from captionflow.models.base import FeatureNorm
from captionflow.models.registry import Registry

RETRIEVAL = Registry("retrieval model")
register_retrieval = RETRIEVAL.register
create_retrieval_model = RETRIEVAL.create
GNA_RNN_VERSION = 2  # checkpoints of `gna_rnn` carry it; version 1 (none) was the factorised variant


def _mask(tokens, lengths):
    return (torch.arange(tokens.shape[1], device=tokens.device)[None] < lengths[:, None]).float()


class RetrievalModel(nn.Module):
    CHECKPOINT_TAG = {}  # what train_retrieval records in the checkpoint beside the model's name

    def forward(self, tokens, lengths, fc):
        # N (text, image) pairs -> (N,) logits
        return self.score_pairs(tokens, lengths, fc, torch.arange(len(fc), device=fc.device)[:, None])[:, 0]


class FactorisedModel(RetrievalModel):
    """A model whose logit is encode_text(text) . encode_image(image) + bias."""

    def pair_logits(self, texts, images):
        return texts @ images.t() + self.bias

    def score_gallery(self, tokens, lengths, fc):
        return self.pair_logits(self.encode_text(tokens, lengths), self.encode_image(fc))

    def score_pairs(self, tokens, lengths, fc, index):
        texts, images = self.encode_text(tokens, lengths), self.encode_image(fc)
        # the first column apart, as train_retrieval computed its positives before (same numbers)
        first = (texts * images[index[:, 0]]).sum(dim=1) + self.bias
        return torch.cat([first[:, None], (texts[:, None] * images[index[:, 1:]]).sum(dim=2) + self.bias], dim=1)


@register_retrieval("gna_rnn")
class GNARNN(RetrievalModel):
    """GNA-RNN as published; see the module docstring. Sizes: embed_size (word embedding),
    image_embed_size (the image embedding the LSTM reads at every step; null: embed_size, as the source),
    hidden_size (LSTM, and the visual units' hidden layer as in the source), units (visual
    units), dropout (on h_t before attention and gate; the source: 0.5)."""

    CHECKPOINT_TAG = {"gna_rnn_version": GNA_RNN_VERSION}

    def __init__(
        self,
        vocab_size,
        feat_dim,
        embed_size=512,
        image_embed_size=None,
        hidden_size=512,
        units=512,
        dropout=0.5,
        pair_budget=65536,
    ):
        super().__init__()
        image_embed_size = embed_size if image_embed_size is None else image_embed_size  # the source: the same
        self.embed_size, self.pair_budget = embed_size, pair_budget
        self.fc_norm = FeatureNorm(feat_dim)
        self.embed = nn.Embedding(vocab_size + 1, embed_size, padding_idx=0)
        self.image_embed = nn.Sequential(
            nn.Linear(feat_dim, image_embed_size),
            nn.BatchNorm1d(image_embed_size),
            nn.ReLU(),
            nn.Linear(image_embed_size, image_embed_size),
        )
        self.visual = nn.Sequential(
            nn.Linear(feat_dim, hidden_size), nn.BatchNorm1d(hidden_size), nn.ReLU(), nn.Linear(hidden_size, units)
        )
        self.lstm = nn.LSTM(embed_size + image_embed_size, hidden_size, batch_first=True)
        self.attention = nn.Linear(hidden_size, units)  # unit-level attention, from h_t alone
        self.gate = nn.Linear(hidden_size, 1)  # word-level gate
        self.dropout = nn.Dropout(dropout)
        self.bias = nn.Parameter(torch.zeros(()))

    def _images(self, fc):
        """fc (M, D) -> the image side of the LSTM's input projection (M, 4H), visual units (M, U)."""
        x = self.fc_norm(fc)
        w_img = self.lstm.weight_ih_l0[:, self.embed_size :]
        return self.image_embed(x) @ w_img.t(), self.visual(x)

    def _words(self, tokens):
        """tokens (N, T) -> the word side of the LSTM's input projection plus its biases (N, T, 4H)."""
        w_word = self.lstm.weight_ih_l0[:, : self.embed_size]
        return self.embed(tokens) @ w_word.t() + self.lstm.bias_ih_l0 + self.lstm.bias_hh_l0

    def _run(self, words, mask, images, units):
        """words (N, T, 4H), mask (N, T), images (N or 1, C, 4H), units (N or 1, C, U) -> (N, C) logits."""
        n, c = words.shape[0], images.shape[1]
        hidden = self.lstm.hidden_size
        h = words.new_zeros(n, c, hidden)
        cell = torch.zeros_like(h)
        score = words.new_zeros(n, c)
        for word, real in zip(words.unbind(1), mask.unbind(1)):  # unbind: one backward copy, not one per step
            gates = word[:, None] + images + h @ self.lstm.weight_hh_l0.t()
            i, f, g, o = gates.chunk(4, dim=-1)  # torch's LSTM order
            cell = torch.sigmoid(f) * cell + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(cell)
            out = self.dropout(h)
            a = torch.softmax(self.attention(out), dim=-1)
            gate = torch.sigmoid(self.gate(out))[..., 0]
            score = score + real[:, None] * gate * (a * units).sum(dim=-1)
        return score + self.bias

    def score_pairs(self, tokens, lengths, fc, index):
        images, units = self._images(fc)
        return self._run(self._words(tokens), _mask(tokens, lengths), images[index], units[index])

    def score_gallery(self, tokens, lengths, fc):
        images, units = self._images(fc)  # once per image
        words, mask = self._words(tokens), _mask(tokens, lengths)
        chunk = max(1, self.pair_budget // max(1, len(fc)))
        return torch.cat(
            [
                self._run(words[b : b + chunk], mask[b : b + chunk], images[None], units[None])
                for b in range(0, len(tokens), chunk)
            ]
        )


@register_retrieval("gna_rnn_factorised")
class FactorisedGNARNN(FactorisedModel):
    """The fast variant of GNA-RNN (registry name `gna_rnn` before issue 28): the LSTM reads
    the words only and the attention reads [h_t; x_t], so the affinity factorises into a text
    vector . the visual units and a gallery is one matrix product; see the module docstring."""

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
        return (g * a * _mask(tokens, lengths)[..., None]).sum(dim=1)


@register_retrieval("dual_encoder")
class DualEncoder(FactorisedModel):
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
        mask = _mask(tokens, lengths)[..., None]
        mean = (self.embed(tokens) * mask).sum(dim=1) / lengths.clamp_min(1)[:, None].float()
        return F.normalize(self.text_proj(mean), dim=-1)
