"""Ensembles: several captioners decode as one model of the decoding protocol.

At each step the members' log-probabilities are averaged and renormalised (a product of
the members' distributions, as ensembles of captioners are usually decoded), so greedy,
beam search and sampling run on an ensemble unchanged. Each member reads its own
features: feats and state entries of member i are named "<i>.<name>" (member 0's regions
are feats["0.att"]), so an ensemble mixes backbones, models and feature sizes freely.
"""

import torch
from torch import nn


def member_feats(feats_per_member):
    """[{"att", "fc", ...} per member] -> one feats dict with "<i>.<name>" keys."""
    return {f"{i}.{k}": v for i, feats in enumerate(feats_per_member) for k, v in feats.items()}


def _part(entries, i):
    prefix = f"{i}."
    return {k[len(prefix) :]: v for k, v in entries.items() if k.startswith(prefix)}


class Ensemble(nn.Module):
    """Members (models of the decoding protocol, same vocabulary) decoding together."""

    def __init__(self, members):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.vocab_size = members[0].vocab_size
        self.image_state = tuple(f"{i}.{k}" for i, m in enumerate(members) for k in getattr(m, "image_state", ()))

    def init_state(self, feats):
        return member_feats([m.init_state(_part(feats, i)) for i, m in enumerate(self.members)])

    def step(self, tokens, state):
        # tokens (B,) -> mean of the members' logprobs, renormalised (B, V + 1), state
        logprobs, states = [], []
        for i, m in enumerate(self.members):
            lp, s = m.step(tokens, _part(state, i))
            logprobs.append(lp.float())
            states.append(s)
        return torch.stack(logprobs).mean(dim=0).log_softmax(dim=-1), member_feats(states)
