"""AoANet specifics: the AoA gate, the refiner's symmetry, region masks, the paper preset."""

import pytest
import torch

from captionflow.decoding.search import beam_search
from captionflow.errors import CaptionflowError
from captionflow.layers import AttentionOnAttention
from captionflow.models import create_model
from captionflow.models.aoanet import Refiner

V, D, R = 7, 12, 5  # words, feature dim, regions


def _model(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=V, feat_dim=D, embed_size=8, hidden_size=16, n_heads=4, refiner_layers=2, dropout=0.0)
    return create_model("aoanet", **{**cfg, **kw}).eval()


def _masked_feats(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    att = torch.randn(len(lengths), R, D, generator=g)
    mask = torch.arange(R)[None, :] < torch.tensor(lengths)[:, None]
    return {"att": att, "fc": att.mean(dim=1), "att_mask": mask}


def _inputs(b, t=5, seed=2):
    inputs = torch.randint(1, V + 1, (b, t), generator=torch.Generator().manual_seed(seed))
    inputs[:, 0] = 0
    return inputs


def test_aoa_is_a_sigmoid_gate_times_an_information_vector():
    torch.manual_seed(0)
    aoa = AttentionOnAttention(attended_dim=6, query_dim=4, out_dim=5)
    attended, query = torch.randn(2, 3, 6), torch.randn(2, 3, 4)
    out = aoa(attended, query)
    assert out.shape == (2, 3, 5)
    info, gate = aoa.info_and_gate(attended, query)
    assert ((gate > 0) & (gate < 1)).all()
    assert torch.allclose(out, info * gate, atol=1e-6)
    with torch.no_grad():  # the gate half of the projection is the second one
        aoa.proj.weight[5:] = 0.0
        aoa.proj.bias[5:] = -50.0
    assert info.abs().min() > 1e-4 and aoa(attended, query).abs().max() < 1e-12  # gate -> 0: nothing passes
    with torch.no_grad():
        aoa.proj.bias[5:] = 50.0
    assert torch.allclose(
        aoa(attended, query), aoa.info_and_gate(attended, query)[0], atol=1e-6
    )  # gate -> 1: all of it


@pytest.mark.parametrize("norm_first", [False, True])
def test_refiner_keeps_shape_mixes_regions_and_is_permutation_equivariant(norm_first):
    torch.manual_seed(0)
    refiner = Refiner(d_model=16, n_heads=4, layers=3, attn_dropout=0.0, aoa_dropout=0.0, norm_first=norm_first).eval()
    x = torch.randn(2, 7, 16)
    out = refiner(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    perm = torch.randperm(7)
    assert torch.allclose(refiner(x[:, perm]), out[:, perm], atol=1e-5)
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    assert torch.allclose(refiner(x[:, perm], mask[:, perm]), refiner(x, mask)[:, perm], atol=1e-5)
    # self-attention: changing one region changes the others' refined features
    y = x.clone()
    y[:, 0] += torch.randn(16)  # not a constant shift, which a layer norm would remove
    assert not torch.allclose(refiner(y)[:, 1:], out[:, 1:], atol=1e-4)


@pytest.mark.parametrize("norm_first", [False, True])
def test_padded_regions_are_irrelevant(norm_first):
    model = _model(norm_first=norm_first)
    lengths = [5, 3, 1]
    feats, inputs = _masked_feats(lengths), _inputs(3)
    logprobs, _ = model.teacher_forcing(feats, inputs)
    junk = dict(feats)
    junk["att"] = torch.where(feats["att_mask"][..., None], feats["att"], 1e4 * torch.randn(3, R, D))
    junk["att"][1, 4] = float("nan")
    junk_lp, _ = model.teacher_forcing(junk, inputs)
    assert torch.isfinite(junk_lp).all()
    assert torch.allclose(junk_lp, logprobs, atol=1e-5)
    # padding an image is the same as giving only its real regions, without a mask
    for i, n in enumerate(lengths):
        alone, _ = model.teacher_forcing(
            {"att": feats["att"][i : i + 1, :n], "fc": feats["fc"][i : i + 1]}, inputs[i : i + 1]
        )
        assert torch.allclose(alone[0], logprobs[i], atol=1e-5)


def test_masked_beam_search_equals_unpadded_per_image_beam():
    # beam search expands and reorders every state tensor, the mask included
    model, lengths = _model(), [2, 5, 4, 1]
    feats = _masked_feats(lengths, seed=3)
    seqs, scores = beam_search(model, feats, beam_size=3, max_len=8)
    for i, n in enumerate(lengths):
        one, score = beam_search(
            model, {"att": feats["att"][i : i + 1, :n], "fc": feats["fc"][i : i + 1]}, beam_size=3, max_len=8
        )
        assert [w for w in one[0].tolist() if w] == [w for w in seqs[i].tolist() if w]
        assert score.item() == pytest.approx(scores[i].item(), abs=1e-5)


def test_all_true_mask_equals_no_mask():
    model, inputs = _model(), _inputs(2)
    feats = _masked_feats([R, R])
    with_mask, _ = model.teacher_forcing(feats, inputs)
    without, _ = model.teacher_forcing({"att": feats["att"], "fc": feats["fc"]}, inputs)
    assert torch.allclose(with_mask, without, atol=1e-6)


def test_user_errors_are_one_line_captionflow_errors():
    with pytest.raises(CaptionflowError, match="n_heads=3 must be a positive divisor of hidden_size=16"):
        _model(n_heads=3)
    with pytest.raises(CaptionflowError, match="refiner_layers: -1 must be a non-negative integer"):
        _model(refiner_layers=-1)
    model = _model()
    with pytest.raises(CaptionflowError, match="no real region"):
        model.init_state(_masked_feats([3, 0]))
    feats = _masked_feats([3, 2])
    feats["att_mask"] = feats["att_mask"][:, :4]
    with pytest.raises(CaptionflowError, match=r"att_mask has shape \(2, 4\), expected \(2, 5\)"):
        model.init_state(feats)


def test_zero_refiner_layers_runs():
    # the paper's "w/o refining" ablation: regions go straight from the embedding to the decoder
    model = _model(refiner_layers=0)
    logprobs, _ = model.teacher_forcing(_masked_feats([5, 2]), _inputs(2))
    assert logprobs.shape == (2, 5, V + 1) and torch.isfinite(logprobs).all()


def test_paper_preset_parameter_count(report_figure):
    # COCO: 10,369 words, 2048-d bottom-up features; built on the meta device (no memory)
    with torch.device("meta"):
        model = create_model("aoanet", vocab_size=10369, feat_dim=2048)
    assert model.lstm.hidden_size == 1024 and model.embed.embedding_dim == 1024
    assert len(model.refiner.layers) == 6 and model.attention.n_heads == 8
    n = sum(p.numel() for p in model.parameters())
    refiner = sum(p.numel() for p in model.refiner.parameters())
    report_figure(f"aoanet paper preset: {n / 1e6:.1f} M parameters ({refiner / 1e6:.1f} M in the refiner)")
    # 6 x (QKV 3.1 M + AoA 4.2 M) refiner, 12.6 M LSTM, 2 x 10.6 M embedding/output, ...
    assert 44e6 < refiner < 45e6
    assert 85e6 < n < 90e6
