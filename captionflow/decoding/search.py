"""Greedy decoding, sampling and beam search, written once for every registered model.

All functions take a model implementing init_state/step (captionflow.models) and a feats
dict of (B, ...) tensors, and return token sequences (N, T) zero-padded after the end
token, with their summed log-probabilities. Batched over images x beams / samples.
"""

import torch


def expand_state(state, n):
    """Repeat every state tensor n times along the batch: (B, ...) -> (B * n, ...)."""
    return {k: v.repeat_interleave(n, dim=0) for k, v in state.items()}


def select_state(state, index, keep=()):
    """Reorder/select batch rows of every state tensor (beam search's reshuffle) except
    those named in `keep`: the image's own tensors, alike in every beam of an image."""
    return {k: v if k in keep else v.index_select(0, index) for k, v in state.items()}


def _batch_size(feats):
    return next(iter(feats.values())).shape[0]


def _start_tokens(feats, n):
    return torch.zeros(n, dtype=torch.long, device=next(iter(feats.values())).device)


@torch.no_grad()
def greedy(model, feats, max_len=16):
    """Most likely word at each step. -> tokens (B, T), logprob (B,)"""
    state = model.init_state(feats)
    tokens = _start_tokens(feats, _batch_size(feats))
    return _rollout(model, state, tokens, max_len, pick=lambda lp: lp.argmax(dim=-1))[:2]


@torch.no_grad()
def greedy_steps(model, feats, max_len=16):
    """greedy with each word's log-probability. -> tokens (B, T), per-token logprobs (B, T)
    (0 after the end token)."""
    state = model.init_state(feats)
    tokens = _start_tokens(feats, _batch_size(feats))
    seqs, _, token_lp = _rollout(model, state, tokens, max_len, pick=lambda lp: lp.argmax(dim=-1))
    return seqs, token_lp


def sample(model, feats, n=1, max_len=16, temperature=1.0, top_k=0, generator=None, track_grad=False):
    """n sampled captions per image (multinomial, temperature, optional top-k).

    -> tokens (B * n, T) grouped by image, per-token logprobs (B * n, T) under the model
    (not the tempered distribution), with gradients when track_grad (for SCST).
    """

    def pick(lp):
        logits = lp / temperature
        if top_k:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)

    with torch.set_grad_enabled(track_grad):
        state = expand_state(model.init_state(feats), n)
        tokens = _start_tokens(feats, _batch_size(feats) * n)
        seqs, _, token_lp = _rollout(model, state, tokens, max_len, pick)
    return seqs, token_lp


def _rollout(model, state, tokens, max_len, pick):
    """Feed each picked word back until every row has ended or max_len words."""
    seqs, token_lps = [], []
    done = torch.zeros_like(tokens, dtype=torch.bool)
    for _ in range(max_len):
        logprobs, state = model.step(tokens, state)
        tokens = pick(logprobs.detach())
        tokens = tokens.masked_fill(done, 0)
        lp = logprobs.gather(1, tokens[:, None]).squeeze(1).masked_fill(done, 0.0)
        seqs.append(tokens)
        token_lps.append(lp)
        done = done | (tokens == 0)
        if done.all():
            break
    seqs = torch.stack(seqs, dim=1)
    token_lps = torch.stack(token_lps, dim=1)
    return seqs, token_lps.sum(dim=1), token_lps


def _block_trigrams(logprobs, seqs):
    """Forbid words that would repeat a trigram already in the sequence (in place).

    logprobs (N, V + 1), seqs (N, t) of words so far.
    """
    if seqs.shape[1] < 3:
        return
    # positions j where (seq[j], seq[j+1]) equals the last two words: seq[j+2] is banned
    match = (seqs[:, :-2] == seqs[:, -2:-1]) & (seqs[:, 1:-1] == seqs[:, -1:])
    rows, cols = match.nonzero(as_tuple=True)
    logprobs[rows, seqs[rows, cols + 2]] = float("-inf")


def length_penalty(lengths, alpha):
    """GNMT length normalisation ((5 + |Y|) / 6) ** alpha; alpha = 0 ranks by log-prob."""
    return ((5.0 + lengths) / 6.0) ** alpha


@torch.no_grad()
def beam_candidates(model, feats, beam_size=3, max_len=16, alpha=0.0, block_trigrams=False):
    """Batched beam search over images x beams, keeping every final beam.

    Finished hypotheses keep their score and stay in the beam (extended by padding at no
    cost); at the end each image's beams are ranked by logprob / length_penalty(alpha).
    -> tokens (B, K, T), scores (B, K), best first per image (what a reranker reorders).
    """
    B, K = _batch_size(feats), beam_size
    state = expand_state(model.init_state(feats), K)
    tokens = _start_tokens(feats, B * K)
    device = tokens.device
    # Only the first beam is live at the start: the others are copies of it.
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0
    seqs = torch.zeros(B * K, 0, dtype=torch.long, device=device)
    done = torch.zeros(B * K, dtype=torch.bool, device=device)
    for _ in range(max_len):
        logprobs, state = model.step(tokens, state)
        logprobs = logprobs.float().clone()
        V1 = logprobs.shape[1]
        if block_trigrams:
            _block_trigrams(logprobs, seqs)
        # a finished beam continues only with padding (token 0), at no cost
        logprobs[done] = float("-inf")
        logprobs[done, 0] = 0.0
        total = (scores.view(B * K, 1) + logprobs).view(B, K * V1)
        scores, flat = total.topk(K, dim=1)  # (B, K)
        beam = flat // V1
        tokens = (flat % V1).view(-1)
        rows = (beam + torch.arange(B, device=device)[:, None] * K).view(-1)
        state = select_state(state, rows, keep=getattr(model, "image_state", ()))  # rows stay in their image
        seqs = torch.cat([seqs[rows], tokens[:, None]], dim=1)
        done = done[rows] | (tokens == 0)
        if done.all():
            break
    lengths = (seqs != 0).sum(dim=1).float() + done.float()  # words + the end token
    final = (scores.view(-1) / length_penalty(lengths, alpha)).view(B, K)
    order = final.argsort(dim=1, descending=True, stable=True)
    picks = (order + torch.arange(B, device=device)[:, None] * K).view(-1)
    return seqs[picks].view(B, K, -1), final.gather(1, order)


def beam_search(model, feats, beam_size=3, max_len=16, alpha=0.0, block_trigrams=False):
    """Batched beam search -> tokens (B, T), score (B,) of the best beam per image."""
    seqs, scores = beam_candidates(model, feats, beam_size, max_len, alpha, block_trigrams)
    return seqs[:, 0], scores[:, 0]


def decode(model, feats, method="beam", beam_size=3, max_len=16, alpha=0.0, block_trigrams=False):
    """Dispatch used by evaluation: greedy when beam_size == 1 or method == 'greedy'."""
    if method == "greedy" or beam_size == 1:
        return greedy(model, feats, max_len)
    return beam_search(model, feats, beam_size, max_len, alpha, block_trigrams)


def until_end(seqs):
    """(N, T) token tensor -> list of token lists up to the first 0 (the end token)."""
    return [row[: row.index(0)] if 0 in row else row for row in seqs.tolist()]


def to_words(seqs, ix_to_word):
    """(N, T) token tensor -> list of caption strings (words up to the first 0)."""
    captions = []
    for row in seqs.tolist():
        words = []
        for ix in row:
            if ix == 0:
                break
            words.append(ix_to_word[str(ix)])
        captions.append(" ".join(words))
    return captions


class ForbidEnd(torch.nn.Module):
    """A model whose end token is never chosen: searches run all max_len steps (benchmarks,
    and tests of a key/value cache that must grow every step)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.image_state = getattr(model, "image_state", ())

    def init_state(self, feats):
        return self.model.init_state(feats)

    def step(self, tokens, state):
        logprobs, state = self.model.step(tokens, state)
        return logprobs.index_fill(1, torch.tensor([0], device=logprobs.device), float("-inf")), state
