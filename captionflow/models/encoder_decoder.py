"""Encoder-decoder captioners: the decoding protocol, parallel teacher forcing and the
key/value cache shared by the Transformer and ExpansionNet v2.

Decoding keeps a key/value cache: `step` runs the decoder layers on the new word only,
attending over the cached keys/values of the t words before it, instead of running them
again on all t + 1 positions. Setting `model.use_cache = False` re-decodes the whole prefix
at every step instead (the reference the cache is tested and benchmarked against).
"""

import torch
from torch import nn
from torch.nn import functional as F

from captionflow.models.base import CaptionModel


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
        return F.log_softmax(self.head(outputs)[:, 0].float(), dim=-1), new_state

    def _step_uncached(self, tokens, state):
        # Re-decode the whole prefix; only the newest position goes through the output layer.
        prefix = torch.cat([state["prefix"], tokens[:, None]], dim=1)  # (B, t + 1)
        outputs = self._decode(prefix, state)
        logits = self.head([x[:, -1:] for x in outputs])[:, 0]
        return F.log_softmax(logits.float(), dim=-1), {**state, "prefix": prefix}

    def attention_layer(self):
        return self.decoder[-1].cross  # the last decoder layer's cross-attention to the image

    def teacher_forcing(self, feats, inputs, ss_prob=0.0, generator=None):
        """inputs (B, T) -> logprobs (B, T, V + 1), {} (no auxiliary outputs).

        Without scheduled sampling every position's input is known, so one causal-masked
        pass computes what T steps would; with it, inputs depend on earlier outputs and the
        step-by-step loop of CaptionModel runs.
        """
        if ss_prob > 0:
            return super().teacher_forcing(feats, inputs, ss_prob, generator)
        outputs = self._decode(inputs, self.init_state(feats))
        return F.log_softmax(self.head(outputs).float(), dim=-1), {}

    def _decode(self, tokens, state):
        # tokens (B, T) from position 0 -> one (B, T, d) output per decoder layer
        x = self.embed_tokens(tokens, start=0)
        outputs = []
        for i, layer in enumerate(self.decoder):
            x = layer(x, state["mem_k"][:, i], state["mem_v"][:, i], state.get("mem_mask"))
            outputs.append(x)
        return outputs

    def xavier_init(self):
        """Xavier-uniform init of every weight matrix (biases, norms and vectors keep theirs)."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def _cache_names(self):
        return self.decoder[0].mixer.cache_names
