"""Every registered model: forward/backward, decoding protocol, and search correctness."""

import itertools

import pytest
import torch

from captionflow.decoding.search import beam_search, greedy, sample
from captionflow.errors import CaptionflowError
from captionflow.models import MODELS, create_model

V, D, R = 7, 12, 5  # words, feature dim, regions


SMALL = {  # beyond the common small sizes
    "aoanet": {"refiner_layers": 1, "n_heads": 2},
    "transformer": {"n_layers": 1, "n_heads": 2},
    "expansionnet_v2": {
        "n_enc_layers": 1,
        "n_dec_layers": 1,
        "n_heads": 2,
        "enc_expansions": [4, 8],
        "dec_expansions": 4,
    },
}


def _model(name, **kw):
    torch.manual_seed(0)
    kw = {"embed_size": 8, "hidden_size": 16, "dropout": 0.0, **SMALL.get(name, {}), **kw}
    model = create_model(name, vocab_size=V, feat_dim=D, **kw)
    return model.eval()


def _feats(b, seed=1):
    g = torch.Generator().manual_seed(seed)
    att = torch.randn(b, R, D, generator=g)
    return {"att": att, "fc": att.mean(dim=1)}


class WordsFirst(torch.nn.Module):
    """`model` that cannot end a caption in its first `n` steps. A random-init model often
    ends every caption at step 0, and comparisons of empty captions prove nothing; this
    one's searches compare `n` or more real words."""

    def __init__(self, model, n):
        super().__init__()
        self.model, self.n = model, n
        self.image_state = getattr(model, "image_state", ())

    def init_state(self, feats):
        state = self.model.init_state(feats)
        return {**state, "steps": torch.zeros(next(iter(feats.values())).shape[0], dtype=torch.long)}

    def step(self, tokens, state):
        steps = state["steps"]
        logprobs, state = self.model.step(tokens, {k: v for k, v in state.items() if k != "steps"})
        logprobs = logprobs.clone()
        logprobs[steps < self.n, 0] = float("-inf")
        return logprobs, {**state, "steps": steps + 1}


def _words(seqs):
    return [[w for w in row if w != 0] for row in seqs.tolist()]


def _trim(seqs):
    """Drop all-zero trailing columns so sequences of different padding compare equal."""
    keep = int((seqs != 0).any(dim=0).nonzero().max()) + 1 if (seqs != 0).any() else 0
    return seqs[:, : keep + 1] if keep < seqs.shape[1] else seqs


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_backward_no_nan(name):
    model = _model(name).train()
    inputs = torch.randint(1, V + 1, (3, 6))
    inputs[:, 0] = 0
    targets = torch.randint(0, V + 1, (3, 6))
    mask = torch.ones(3, 6)
    logprobs, aux = model.teacher_forcing(_feats(3), inputs, ss_prob=0.5, generator=torch.Generator().manual_seed(0))
    assert logprobs.shape == (3, 6, V + 1)
    assert torch.allclose(logprobs.exp().sum(-1), torch.ones(3, 6), atol=1e-5)
    loss = -logprobs.gather(2, targets[..., None]).mean() + model.aux_loss(aux, mask)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_beam_size_one_equals_greedy(name):
    model, feats = WordsFirst(_model(name), 4), _feats(6)
    g_seq, g_lp = greedy(model, feats, max_len=8)
    b_seq, b_lp = beam_search(model, feats, beam_size=1, max_len=8)
    assert all(len(words) >= 4 for words in _words(g_seq))  # real captions are compared
    assert torch.equal(_trim(g_seq), _trim(b_seq))
    assert torch.allclose(g_lp, b_lp, atol=1e-5)


def _sequence_logprob(model, state, seq):
    """Log-probability of one word sequence (ending with 0 unless it hits max_len)."""
    tokens = torch.zeros(1, dtype=torch.long)
    total = 0.0
    for word in seq:
        logprobs, state = model.step(tokens, state)
        total += logprobs[0, word].item()
        tokens = torch.tensor([word])
    return total


@pytest.mark.parametrize("name", sorted(MODELS))
def test_wide_beam_finds_the_exhaustive_optimum(name):
    model, max_len = _model(name), 3
    feats = _feats(1, seed=5)
    candidates = []
    for n in range(0, max_len):  # n words then the end token
        candidates += [(*words, 0) for words in itertools.product(range(1, V + 1), repeat=n)]
    candidates += list(itertools.product(range(1, V + 1), repeat=max_len))  # cut at max_len
    with torch.no_grad():
        state = model.init_state(feats)  # the image encoded once; steps never modify a state
        scored = [(_sequence_logprob(model, state, c), c) for c in candidates]
    best_lp, best = max(scored)
    seq, lp = beam_search(model, feats, beam_size=len(candidates), max_len=max_len)
    words = [w for w in seq[0].tolist() if w != 0]
    assert words == [w for w in best if w != 0]
    assert lp.item() == pytest.approx(best_lp, abs=1e-4)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("block", [False, True])
def test_batched_beam_equals_per_image_beam(name, block):
    model, feats = WordsFirst(_model(name), 6), _feats(5)
    seqs, scores = beam_search(model, feats, beam_size=4, max_len=10, alpha=0.7, block_trigrams=block)
    assert all(len(words) >= 6 for words in _words(seqs))
    assert len({round(x, 4) for x in scores.tolist()}) > 1  # the images' beams differ: mixing them shows
    for i in range(5):
        one, score = beam_search(
            model, {k: v[i : i + 1] for k, v in feats.items()}, beam_size=4, max_len=10, alpha=0.7, block_trigrams=block
        )
        assert [w for w in one[0].tolist() if w] == [w for w in seqs[i].tolist() if w]
        assert score.item() == pytest.approx(scores[i].item(), abs=1e-5)


def _repeats_a_trigram(words):
    trigrams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return len(trigrams) != len(set(trigrams))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_trigram_blocking_forbids_repeats(name):
    model, feats = WordsFirst(_model(name), 12), _feats(8)  # 12 words from 7: repeats are likely
    free, _ = beam_search(model, feats, beam_size=3, max_len=12, block_trigrams=False)
    blocked, _ = beam_search(model, feats, beam_size=3, max_len=12, block_trigrams=True)
    assert all(len(words) == 12 for words in _words(blocked))
    assert any(_repeats_a_trigram(words) for words in _words(free))  # control: unblocked beams repeat
    assert not any(_repeats_a_trigram(words) for words in _words(blocked))


def test_sampling_is_seeded_and_has_gradients():
    model, feats = _model("show_attend_tell"), _feats(2)
    a, lp = sample(
        model,
        feats,
        n=3,
        max_len=6,
        temperature=0.8,
        top_k=3,
        generator=torch.Generator().manual_seed(1),
        track_grad=True,
    )
    b, _ = sample(model, feats, n=3, max_len=6, temperature=0.8, top_k=3, generator=torch.Generator().manual_seed(1))
    assert a.shape[0] == 6 and torch.equal(a, b)
    lp.sum().backward()
    assert any(p.grad is not None for p in model.parameters())


def test_unknown_model_and_option_are_refused():
    with pytest.raises(CaptionflowError, match="unknown model 'aoa'"):
        create_model("aoa", vocab_size=V, feat_dim=D)
    with pytest.raises(CaptionflowError, match="model fc has no option\\(s\\) hiden_size"):
        create_model("fc", vocab_size=V, feat_dim=D, hiden_size=3)


def test_a_model_name_is_registered_once():
    from captionflow.models.registry import register_model

    with pytest.raises(ValueError, match="model name 'fc' is registered twice"):
        register_model("fc")(type("AnotherFC", (), {}))
    assert MODELS["fc"].__name__ != "AnotherFC"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_padded_regions_behind_a_mask_change_nothing(name):
    """Bottom-up features have 10-100 boxes per image: files pad to the maximum, with a mask."""
    model, feats = _model(name), _feats(3)
    junk = torch.randn(3, 4, D) * 100
    padded = {
        "att": torch.cat([feats["att"], junk], dim=1),
        "fc": feats["fc"],
        "att_mask": torch.cat([torch.ones(3, R, dtype=torch.bool), torch.zeros(3, 4, dtype=torch.bool)], dim=1),
    }
    model = WordsFirst(model, 5)
    plain_seqs, plain_lp = beam_search(model, feats, beam_size=2, max_len=5)
    padded_seqs, padded_lp = beam_search(model, padded, beam_size=2, max_len=5)
    assert all(len(words) == 5 for words in _words(plain_seqs))
    assert torch.equal(plain_seqs, padded_seqs) and torch.allclose(plain_lp, padded_lp, atol=1e-5)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_beam_search_may_leave_the_image_state_unordered(name):
    """What a model lists in image_state no step changes, so beam search need not reorder it."""
    model, feats = _model(name), _feats(4, seed=3)
    state = model.init_state(feats)
    tokens = torch.randint(1, V + 1, (4,))
    _, after = model.step(tokens, state)
    for key in model.image_state:
        if key in state:
            assert after[key] is state[key] or torch.equal(after[key], state[key]), key
    seqs, lp = beam_search(model, feats, beam_size=3, max_len=8)
    model.image_state = ()  # reorder every state tensor
    all_seqs, all_lp = beam_search(model, feats, beam_size=3, max_len=8)
    assert torch.equal(seqs, all_seqs) and torch.allclose(lp, all_lp)
