"""Transformer and ExpansionNet v2: the key/value cache decodes exactly like re-decoding the prefix."""

import pytest
import torch

from captionflow.decoding.search import ForbidEnd, beam_search, expand_state, greedy, select_state
from captionflow.errors import CaptionflowError
from captionflow.models import create_model
from captionflow.models.base import CaptionModel
from captionflow.models.expansionnet import ExpansionNetV2, StaticExpansion
from captionflow.models.transformer import TransformerCaptioner

V, D, R = 20, 12, 5  # words, feature dim, regions
SMALL = {
    "transformer": {"n_layers": 2},
    "expansionnet_v2": {"n_enc_layers": 2, "n_dec_layers": 2, "enc_expansions": [4, 8], "dec_expansions": 4},
}
NAMES = sorted(SMALL)


def _model(name, dropout=0.0):
    torch.manual_seed(0)
    model = create_model(
        name, vocab_size=V, feat_dim=D, embed_size=32, hidden_size=64, n_heads=4, dropout=dropout, **SMALL[name]
    )
    return model.eval()


def _feats(b, seed=1):
    g = torch.Generator().manual_seed(seed)
    att = torch.randn(b, R, D, generator=g)
    return {"att": att, "fc": att.mean(dim=1)}


def _inputs(b, t, seed=2):
    inputs = torch.randint(1, V + 1, (b, t), generator=torch.Generator().manual_seed(seed))
    inputs[:, 0] = 0
    return inputs


@pytest.mark.parametrize("name", NAMES)
def test_parallel_teacher_forcing_equals_step_by_step(name):
    model, feats, inputs = _model(name), _feats(3), _inputs(3, 9)
    parallel, aux = model.teacher_forcing(feats, inputs)
    assert parallel.shape == (3, 9, V + 1) and aux == {}
    cached, _ = CaptionModel.teacher_forcing(model, feats, inputs)  # the base class's step loop
    model.use_cache = False
    uncached, _ = CaptionModel.teacher_forcing(model, feats, inputs)
    assert torch.allclose(parallel, cached, atol=1e-5)
    assert torch.allclose(parallel, uncached, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("forbid_end", [False, True])
def test_cached_greedy_equals_uncached(name, forbid_end):
    model, feats = _model(name), _feats(6)
    search = ForbidEnd(model) if forbid_end else model
    seqs, lp = greedy(search, feats, max_len=12)
    model.use_cache = False
    ref_seqs, ref_lp = greedy(search, feats, max_len=12)
    assert torch.equal(seqs, ref_seqs)
    assert torch.allclose(lp, ref_lp, atol=1e-5)
    if forbid_end:
        assert seqs.shape[1] == 12


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("forbid_end", [False, True])
def test_cached_beam_equals_uncached(name, forbid_end):
    model, feats = _model(name), _feats(4)
    search = ForbidEnd(model) if forbid_end else model
    seqs, score = beam_search(search, feats, beam_size=3, max_len=12, alpha=0.7)
    model.use_cache = False
    ref_seqs, ref_score = beam_search(search, feats, beam_size=3, max_len=12, alpha=0.7)
    assert torch.equal(seqs, ref_seqs)
    assert torch.allclose(score, ref_score, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("use_cache", [True, False])
def test_state_survives_expand_and_select(name, use_cache):
    model, feats = _model(name), _feats(3)
    model.use_cache = use_cache
    state = model.init_state(feats)
    for word in (0, 4, 9):  # three steps: the cache holds three positions
        _, state = model.step(torch.full((3,), word), state)
    assert all(v.shape[0] == 3 for v in state.values())
    if use_cache:
        layers, d = 2, 32
        names = ("k", "v") if name == "transformer" else ("cond", "key", "value_a", "value_b")
        assert sorted(state) == sorted(("mem_k", "mem_v", *names))
        assert state["mem_k"].shape == (3, layers, R, d)
        assert all(state[n].shape == (3, layers, 3, d) for n in names)
    tokens = torch.tensor([5, 1, 17])
    ref, _ = model.step(tokens, state)
    index = torch.tensor([5, 0, 3, 3, 1, 4])  # rows of the 2x expanded batch: reorder + duplicate
    out, new_state = model.step(tokens.repeat_interleave(2)[index], select_state(expand_state(state, 2), index))
    assert torch.allclose(out, ref.repeat_interleave(2, dim=0)[index], atol=1e-5)
    assert all(v.shape[0] == 6 for v in new_state.values())


@pytest.mark.parametrize("name", NAMES)
def test_padded_regions_change_nothing_in_parallel_teacher_forcing(name):
    model, feats, inputs = _model(name), _feats(3), _inputs(3, 6)
    padded = {
        "att": torch.cat([feats["att"], torch.randn(3, 4, D) * 100], dim=1),
        "fc": feats["fc"],
        "att_mask": torch.cat([torch.ones(3, R, dtype=torch.bool), torch.zeros(3, 4, dtype=torch.bool)], dim=1),
    }
    assert torch.allclose(model.teacher_forcing(feats, inputs)[0], model.teacher_forcing(padded, inputs)[0], atol=1e-5)
    state = model.init_state(padded)
    assert torch.equal(
        select_state(expand_state(state, 2), torch.tensor([1, 4]))["mem_mask"], padded["att_mask"][[0, 2]]
    )


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_no_nan(name):
    model = _model(name, dropout=0.1).train()
    inputs, targets = _inputs(4, 7), _inputs(4, 7, seed=3)
    logprobs, _ = model(_feats(4), inputs)
    assert torch.allclose(logprobs.exp().sum(-1), torch.ones(4, 7), atol=1e-5)
    loss = -logprobs.gather(2, targets[..., None]).mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_paper_preset_parameter_count(report_figure):
    # ExpansionNet v2 as in the paper: d_model 512, 3 + 3 layers, FFN 2048, expansions
    # 32..512 / 16; a COCO-sized vocabulary and Swin-L's 1536-d features.
    model = ExpansionNetV2(vocab_size=10000, feat_dim=1536)
    n = sum(p.numel() for p in model.parameters())
    report_figure(f"expansionnet_v2 paper preset (vocab 10000, 1536-d features): {n / 1e6:.1f}M parameters")
    assert 35e6 < n < 45e6
    words = 2 * 10001 * 512 + 10001  # input embedding + untied output layer
    assert 25e6 < n - words < 32e6  # the encoder-decoder body
    n = sum(p.numel() for p in TransformerCaptioner(vocab_size=10000, feat_dim=1536).parameters())
    report_figure(f"transformer default (vocab 10000, 1536-d features): {n / 1e6:.1f}M parameters")


def test_bad_sizes_are_refused():
    with pytest.raises(CaptionflowError, match="n_heads \\(5\\) must divide embed_size \\(32\\)"):
        create_model("transformer", vocab_size=V, feat_dim=D, embed_size=32, n_heads=5)
    with pytest.raises(CaptionflowError, match="n_dec_layers must be at least 1"):
        create_model("expansionnet_v2", vocab_size=V, feat_dim=D, embed_size=32, n_dec_layers=0)
    with pytest.raises(CaptionflowError, match="enc_expansions must be a list of positive lengths"):
        create_model("expansionnet_v2", vocab_size=V, feat_dim=D, embed_size=32, enc_expansions=[])


def test_decoding_past_the_learned_positions_is_refused():
    model = create_model(
        "expansionnet_v2",
        vocab_size=V,
        feat_dim=D,
        embed_size=16,
        hidden_size=32,
        max_len=4,
        **SMALL["expansionnet_v2"],
    )
    with pytest.raises(CaptionflowError, match="has 4 positions \\(max_len\\) but was asked to decode 5 words"):
        greedy(ForbidEnd(model.eval()), _feats(2), max_len=5)


def test_static_expansion_equals_forming_the_expanded_vectors():
    """The layer's factorised contraction against the paper's two passes written out."""
    torch.manual_seed(0)
    layer = StaticExpansion(16, [3, 5, 8], dropout=0.0)
    for p in layer.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(2, 7, 16)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    for m in (None, mask):
        z = layer.queries @ layer.key(x).transpose(1, 2) / 4.0  # (B, N, R)
        out = []
        for w, value in ((torch.relu(z), layer.value_a(x)), (torch.relu(-z), layer.value_b(x))):
            if m is not None:
                w = w * m[:, None, :]
            expanded = w / w.sum(-1, keepdim=True).clamp_min(1e-30) @ value + layer.biases  # (B, N, d)
            groups = torch.split(torch.arange(16), [3, 5, 8])
            out.append(
                sum(
                    w[:, g].transpose(1, 2) / w[:, g].sum(1)[..., None].clamp_min(1e-30) @ expanded[:, g]
                    for g in groups
                )
                / 3
            )
        s = torch.sigmoid(layer.selector(x))
        reference = s * out[0] + (1 - s) * out[1]
        real = torch.ones(2, 7, dtype=torch.bool) if m is None else m
        assert torch.allclose(layer(x, m)[real], reference[real], atol=1e-4)
