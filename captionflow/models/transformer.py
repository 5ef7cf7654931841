"""Transformer captioner (Vaswani et al. 2017, "Attention Is All You Need"), and the cached
encoder-decoder machinery it shares with ExpansionNet v2.

The image regions feats["att"] (B, R, D), projected to d_model, pass through N encoder
layers of self-attention; N decoder layers apply masked self-attention over the caption
prefix, cross-attention to the encoder memory and a feed-forward network (sec. 3.1).
Positions are sinusoidal (sec. 3.5); the output layer shares the word-embedding matrix
(sec. 3.4). Layers normalise their input (pre-LN, as in the Annotated Transformer and most
captioning code) rather than their output: it trains without a long warm-up.

Decoding keeps a key/value cache: `step` runs the layers on the new word only, attending
over the cached keys/values of the t words before it, instead of running them again on all
t + 1 positions. Setting `model.use_cache = False` re-decodes the whole prefix at every
step instead (the reference the cache is tested and benchmarked against).
"""

import math

import torch
from torch import nn
from torch.nn import functional as F

from captionflow.errors import CaptionflowError
from captionflow.models.base import CaptionModel, FeatureNorm
from captionflow.models.registry import register_model


def check_sizes(model_name, d_model, n_heads, **layers):
    """Refuse sizes no layer can be built with, naming the option (a one-line user error)."""
    if d_model < 1 or n_heads < 1 or d_model % n_heads:
        raise CaptionflowError(f"model {model_name}: n_heads ({n_heads}) must divide embed_size ({d_model})")
    for name, n in layers.items():
        if n < 1:
            raise CaptionflowError(f"model {model_name}: {name} must be at least 1, got {n}")


def sinusoids(positions, dim):
    """Sinusoidal position encodings (Vaswani et al. 2017, sec. 3.5). positions (T,) -> (T, dim)

    PE[p, 2i] = sin(p / 10000^(2i/dim)), PE[p, 2i+1] = cos(p / 10000^(2i/dim)); computed on the
    fly, so captions of any length have positions.
    """
    half = (dim + 1) // 2
    freqs = torch.exp(torch.arange(half, device=positions.device) * (-2.0 * math.log(10000.0) / dim))
    angles = positions.float()[:, None] * freqs[None]
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)[:, :dim]


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention over n_heads heads (Vaswani et al. 2017, sec. 3.2).

    Keys and values are projected by the caller (`self.key`, `self.value`), so a decoder can
    project the image once per caption and each word once per decoding.
    """

    def __init__(self, d_model, n_heads, dropout):
        super().__init__()
        self.n_heads = n_heads
        self.dropout = dropout
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)

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
        return self(x, self.key(x), self.value(x), causal, mask)


class FeedForward(nn.Module):
    """Position-wise feed-forward network, d -> d_ff -> d with ReLU (sec. 3.3)."""

    def __init__(self, d_model, d_ff, dropout):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.fc2(self.dropout(F.relu(self.fc1(x))))


class CausalSelfAttention(nn.Module):
    """Masked self-attention over the caption prefix (sec. 3.2.3), with a key/value cache.

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
        k, v = self.attn.key(x), self.attn.value(x)
        out = self.attn(x, torch.cat([cache["k"], k], dim=1), torch.cat([cache["v"], v], dim=1))
        return out, {"k": k, "v": v}


class RegionSelfAttention(nn.Module):
    """Self-attention over the image regions (sec. 3.2.3), the encoder's mixing sublayer."""

    def __init__(self, d_model, n_heads, dropout):
        super().__init__()
        self.attn = MultiHeadAttention(d_model, n_heads, dropout)

    def forward(self, x, mask=None):
        # x (B, R, d), mask (B, R) bool real regions or None -> (B, R, d)
        return self.attn.self_attend(x, mask=mask)


class EncoderLayer(nn.Module):
    """Pre-LN encoder layer: `mixer` over the regions, then the feed-forward network.

    `mixer(x, mask)` mixes the regions: RegionSelfAttention here, the static expansion in
    ExpansionNet v2.
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

    `mixer` is the causal sublayer (CausalSelfAttention here, the dynamic expansion in
    ExpansionNet v2); it offers forward(x) over a prefix and extend(x, cache) for one step.
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


class CachedDecoderCaptioner(CaptionModel):
    """Decoding protocol, parallel teacher forcing and the key/value cache of encoder-decoders.

    Subclasses provide
        att_norm      FeatureNorm over feats["att"]
        decoder       nn.ModuleList of DecoderLayer, all with the same mixer type
        encode(att (B, R, D), mask (B, R) bool or None) -> memory (B, R, d)
        embed_tokens(tokens (B, T), start) -> (B, T, d) for positions start .. start + T - 1
        head(outputs) -> logits (B, T, V + 1), outputs: one (B, T, d) per decoder layer

    The state, every tensor batch-first (beam search expands it with repeat_interleave on
    dim 0 and reorders all but the image's tensors, `image_state`, with index_select):
        mem_k, mem_v  (B, L, R, d)  cross-attention keys/values of the image per decoder
                      layer, projected once in init_state (the memory itself is not needed
                      again, so it is not kept)
        mem_mask      (B, R) bool, the real regions; only when feats has "att_mask" (region
                      features padded to a common box count)
        use_cache (default): one (B, L, t, d) tensor per name in the mixer's cache_names
                      ("k", "v" for self-attention), the t words so far as each layer saw
                      them; a step appends position t along dim 2
        use_cache False: prefix (B, t) the words so far, re-decoded in full every step
    """

    use_cache = True
    image_state = ("mem_k", "mem_v", "mem_mask")

    def init_state(self, feats):
        att = self.att_norm(feats["att"])  # (B, R, D)
        mask = feats.get("att_mask")  # (B, R) bool, region features with a variable box count
        if mask is not None:
            att = att.masked_fill(~mask[..., None], 0.0)  # whatever the file pads with
        memory = self.encode(att, mask)  # (B, R, d)
        state = {
            "mem_k": torch.stack([layer.cross.key(memory) for layer in self.decoder], dim=1),
            "mem_v": torch.stack([layer.cross.value(memory) for layer in self.decoder], dim=1),
        }
        if mask is not None:
            state["mem_mask"] = mask
        B, L, _, d = state["mem_k"].shape
        if self.use_cache:
            for name in self._cache_names():
                state[name] = memory.new_zeros(B, L, 0, d)
        else:
            state["prefix"] = torch.zeros(B, 0, dtype=torch.long, device=memory.device)
        return state

    def step(self, tokens, state):
        # tokens (B,) -> logprobs (B, V + 1), state with position t added
        if not self.use_cache:
            return self._step_uncached(tokens, state)
        names = self._cache_names()
        x = self.embed_tokens(tokens[:, None], start=state[names[0]].shape[2])  # (B, 1, d)
        outputs, entries = [], {name: [] for name in names}
        for i, layer in enumerate(self.decoder):
            cache = {name: state[name][:, i] for name in names}
            x, new = layer.extend(x, state["mem_k"][:, i], state["mem_v"][:, i], cache, state.get("mem_mask"))
            outputs.append(x)
            for name in names:
                entries[name].append(new[name])
        new_state = {k: v for k, v in state.items() if k not in names}  # the image's tensors
        for name in names:
            new_state[name] = torch.cat([state[name], torch.stack(entries[name], dim=1)], dim=2)
        return F.log_softmax(self.head(outputs)[:, 0], dim=-1), new_state

    def _step_uncached(self, tokens, state):
        # Re-decode the whole prefix; only the newest position goes through the output layer.
        prefix = torch.cat([state["prefix"], tokens[:, None]], dim=1)  # (B, t + 1)
        outputs = self._decode(prefix, state)
        logits = self.head([x[:, -1:] for x in outputs])[:, 0]
        return F.log_softmax(logits, dim=-1), {**state, "prefix": prefix}

    def teacher_forcing(self, feats, inputs, ss_prob=0.0, generator=None):
        """inputs (B, T) -> logprobs (B, T, V + 1), {} (no auxiliary outputs).

        Without scheduled sampling every position's input is known, so one causal-masked
        pass computes what T steps would; with it, inputs depend on earlier outputs and the
        step-by-step loop of CaptionModel runs.
        """
        if ss_prob > 0:
            return super().teacher_forcing(feats, inputs, ss_prob, generator)
        outputs = self._decode(inputs, self.init_state(feats))
        return F.log_softmax(self.head(outputs), dim=-1), {}

    def _decode(self, tokens, state):
        # tokens (B, T) from position 0 -> one (B, T, d) output per decoder layer
        x = self.embed_tokens(tokens, start=0)
        outputs = []
        for i, layer in enumerate(self.decoder):
            x = layer(x, state["mem_k"][:, i], state["mem_v"][:, i], state.get("mem_mask"))
            outputs.append(x)
        return outputs

    def _cache_names(self):
        return self.decoder[0].mixer.cache_names


@register_model("transformer")
class TransformerCaptioner(CachedDecoderCaptioner):
    """Encoder-decoder Transformer over region features (Vaswani et al. 2017).

    embed_size is d_model and hidden_size the feed-forward width d_ff (the registry's common
    option names); n_layers encoder and n_layers decoder layers.
    """

    def __init__(self, vocab_size, feat_dim, embed_size=512, hidden_size=2048, n_layers=3, n_heads=8, dropout=0.1):
        super().__init__()
        check_sizes("transformer", embed_size, n_heads, n_layers=n_layers, hidden_size=hidden_size)
        self.vocab_size = vocab_size
        self.d_model = embed_size
        self.att_norm = FeatureNorm(feat_dim)
        self.att_embed = nn.Linear(feat_dim, embed_size)
        self.encoder = nn.ModuleList(
            EncoderLayer(RegionSelfAttention(embed_size, n_heads, dropout), embed_size, hidden_size, dropout) for _ in range(n_layers)
        )
        self.enc_norm = nn.LayerNorm(embed_size)
        self.word_embed = nn.Embedding(vocab_size + 1, embed_size)
        self.decoder = nn.ModuleList(
            DecoderLayer(CausalSelfAttention(embed_size, n_heads, dropout), embed_size, hidden_size, n_heads, dropout)
            for _ in range(n_layers)
        )
        self.dec_norm = nn.LayerNorm(embed_size)
        self.logit_bias = nn.Parameter(torch.zeros(vocab_size + 1))
        self.dropout = nn.Dropout(dropout)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def encode(self, att, mask):
        # att (B, R, D) normalised, mask (B, R) or None -> memory (B, R, d)
        x = self.dropout(self.att_embed(att))
        for layer in self.encoder:
            x = layer(x, mask)
        return self.enc_norm(x)

    def embed_tokens(self, tokens, start):
        # tokens (B, T) at positions start.. -> (B, T, d); embeddings scaled by sqrt(d) (sec. 3.4)
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        pe = sinusoids(positions, self.d_model).to(self.word_embed.weight.dtype)  # (T, d)
        return self.dropout(self.word_embed(tokens) * math.sqrt(self.d_model) + pe)

    def head(self, outputs):
        # last decoder layer (B, T, d) -> logits (B, T, V + 1) through the shared embedding
        return F.linear(self.dec_norm(outputs[-1]), self.word_embed.weight, self.logit_bias)
