"""The model options that follow the source systems' released code (model_args, off by default):
each one changes the function as its source does (checked against a few lines of plain torch
written from the source's formula), the defaults keep today's function and state-dict keys, the
rules' check refuses a value outside the option's choices, and ONNX export runs with them."""

import math

import pytest
import torch
from torch.nn import functional as F

from captionflow.errors import CaptionflowError
from captionflow.models import CAPTIONERS, create_model

V, D, R = 9, 12, 5  # words, feature dim, regions
SIZES = {
    "aoanet": {"embed_size": 8, "hidden_size": 16, "n_heads": 4, "refiner_layers": 2},
    "transformer": {"embed_size": 16, "hidden_size": 32, "n_layers": 2, "n_heads": 4},
    "show_attend_tell": {"embed_size": 8, "hidden_size": 16, "att_size": 8},
}
# every new option at its non-default value, and its default
OPTIONS = {
    "aoanet": {"word_embed_activation": ("relu", "none"), "norm_first": (True, False)},
    "transformer": {"region_embed_activation": ("relu", "none"), "tie_output": (False, True)},
    "show_attend_tell": {"readout_activation": ("tanh", "none"), "alpha_reg_average": ("region", "image")},
}


def _model(name, **options):
    torch.manual_seed(0)
    return create_model(name, vocab_size=V, feat_dim=D, dropout=0.0, **SIZES[name], **options).eval()


def _feats(b=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    att = 2 * torch.randn(b, R, D, generator=g)
    return {"att": att, "fc": att.mean(dim=1)}


def _inputs(b=3, t=4, seed=2):
    inputs = torch.randint(1, V + 1, (b, t), generator=torch.Generator().manual_seed(seed))
    inputs[:, 0] = 0
    return inputs


def _forward(model):
    with torch.no_grad():
        return model.teacher_forcing(_feats(), _inputs())[0]


# ---- the defaults keep today's function


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_the_defaults_are_todays_model(name):
    """Giving every new option its default builds the model built without them: same keys, same
    weights (the same random numbers drawn), same outputs."""
    plain = _model(name)
    explicit = _model(name, **{option: default for option, (_, default) in OPTIONS[name].items()})
    assert list(explicit.state_dict()) == list(plain.state_dict())
    assert all(torch.equal(explicit.state_dict()[k], v) for k, v in plain.state_dict().items())
    assert torch.equal(_forward(explicit), _forward(plain))


def test_the_default_state_dict_keys_are_todays():
    """Today's keys: the Transformer's output layer is the word embedding plus logit_bias, AoANet's
    post-LN refiner has no final norm; the options add keys only when they are set."""
    transformer = set(_model("transformer").state_dict())
    assert "logit_bias" in transformer and not any(k.startswith("logit.") for k in transformer)
    assert set(_model("transformer", tie_output=False).state_dict()) == transformer - {"logit_bias"} | {
        "logit.weight",
        "logit.bias",
    }
    aoanet = set(_model("aoanet").state_dict())
    assert not any(k.startswith("refiner.norm.") for k in aoanet)
    assert set(_model("aoanet", norm_first=True).state_dict()) == aoanet | {"refiner.norm.weight", "refiner.norm.bias"}
    for name, options in (
        ("aoanet", {"word_embed_activation": "relu"}),
        ("transformer", {"region_embed_activation": "relu"}),
        ("show_attend_tell", {"readout_activation": "tanh", "alpha_reg_average": "region"}),
    ):
        assert list(_model(name, **options).state_dict()) == list(_model(name).state_dict())


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_every_option_changes_the_output_on_the_same_weights(name):
    """Each non-default value (but the regulariser's normalisation, a loss: tested below) changes
    the log-probs of a model whose weights are otherwise the default model's."""
    base = _model(name)
    for option, (value, _) in OPTIONS[name].items():
        if option == "alpha_reg_average":
            continue
        other = _model(name, **{option: value})
        other.load_state_dict(base.state_dict(), strict=False)  # the shared weights: the default's
        assert (_forward(other) - _forward(base)).abs().max() > 1e-3, option


# ---- AoANet


def test_aoanet_relu_word_embedding_is_the_released_embed_sequence():
    """The released code's embed, nn.Sequential(Embedding, ReLU, Dropout): ReLU on the looked-up
    vector, the same as a default model whose embedding matrix is ReLU'd."""
    relu = _model("aoanet", word_embed_activation="relu")
    folded = _model("aoanet")
    with torch.no_grad():
        folded.embed.weight.copy_(F.relu(relu.embed.weight))
    assert (relu.embed.weight < 0).any()  # so the ReLU has something to do
    assert torch.allclose(_forward(relu), _forward(folded), atol=1e-6)
    assert not torch.allclose(_forward(relu), _forward(_model("aoanet")), atol=1e-3)


def _reference_refiner(refiner, x, norm_first, final_norm):
    """The refiner in plain torch. Released code (norm_first): x + AoA(MHA(LN(x)), LN(x)) per
    layer, then a final LN; paper: LN(x + AoA(MHA(x), x)). MHA without an output projection."""
    for layer in refiner.layers:
        y = F.layer_norm(x, x.shape[-1:], layer.norm.weight, layer.norm.bias) if norm_first else x
        att = layer.attention
        B, n, d = y.shape
        h = att.n_heads

        def split(t):
            return t.view(B, n, h, d // h).transpose(1, 2)

        q, k, v = split(att.query(y)), split(att.key(y)), split(att.value(y))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), dim=-1)
        heads = (weights @ v).transpose(1, 2).reshape(B, n, d)
        info, gate = layer.aoa.proj(torch.cat([heads, y], dim=-1)).chunk(2, dim=-1)
        out = info * torch.sigmoid(gate)
        x = x + out if norm_first else F.layer_norm(x + out, (d,), layer.norm.weight, layer.norm.bias)
    if final_norm:
        x = F.layer_norm(x, x.shape[-1:], refiner.norm.weight, refiner.norm.bias)
    return x


@pytest.mark.parametrize("norm_first", [False, True], ids=["paper", "released"])
def test_aoanet_refiner_is_the_paper_or_the_released_pre_ln_refiner(norm_first):
    model = _model("aoanet", norm_first=norm_first)
    with torch.no_grad():  # non-trivial norms, so a missing or misplaced one shows
        for p in model.refiner.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
        x = torch.randn(2, R, 16)
        got = model.refiner(x)
        assert torch.allclose(got, _reference_refiner(model.refiner, x, norm_first, final_norm=norm_first), atol=1e-5)
        # controls: the other layer kind, and (released) the final norm left out
        assert not torch.allclose(
            got, _reference_refiner(model.refiner, x, not norm_first, final_norm=False), atol=1e-3
        )
        if norm_first:
            assert not torch.allclose(got, _reference_refiner(model.refiner, x, True, final_norm=False), atol=1e-3)


# ---- Transformer


def test_transformer_relu_region_embedding_feeds_the_encoder():
    """region_embed_activation relu: encoder layers see relu(W x + b) (the source's att_embed
    Linear, ReLU, Dropout), the default W x + b."""
    for activation, f in (("relu", F.relu), ("none", lambda t: t)):
        model = _model("transformer", region_embed_activation=activation)
        att = model.att_norm(_feats()["att"])
        with torch.no_grad():
            x = f(att @ model.att_embed.weight.T + model.att_embed.bias)
            assert (x < 0).any() == (activation == "none")
            for layer in model.encoder:
                x = layer(x)
            assert torch.allclose(model.encode(att, None), model.enc_norm(x), atol=1e-6), activation


def test_transformer_untied_output_has_its_own_weight_and_bias():
    tied, untied = _model("transformer"), _model("transformer", tie_output=False)
    d = SIZES["transformer"]["embed_size"]
    # (V + 1) x d weights more; its bias replaces logit_bias (V + 1 either way)
    count = sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in tied.parameters())
    assert count == (V + 1) * d
    x = torch.randn(2, 3, d)
    with torch.no_grad():
        want = F.layer_norm(x, (d,), untied.dec_norm.weight, untied.dec_norm.bias) @ untied.logit.weight.T
        assert torch.allclose(untied.head([x]), want + untied.logit.bias, atol=1e-5)
        before = untied.head([x])
        untied.word_embed.weight.add_(1.0)  # the input embedding no longer reaches the output
        assert torch.equal(untied.head([x]), before)
        tied_before = tied.head([x])
        tied.word_embed.weight.add_(1.0)
        assert not torch.allclose(tied.head([x]), tied_before)
    # a word that is never an input: only a tied output layer gives its embedding row a gradient
    word = min(set(range(1, V + 1)) - set(_inputs().flatten().tolist()))
    grads = {}
    for name, model in (("tied", _model("transformer")), ("untied", _model("transformer", tie_output=False))):
        model.teacher_forcing(_feats(), _inputs())[0][..., word].sum().backward()
        grads[name] = model.word_embed.weight.grad[word].abs().sum().item()
    assert grads["tied"] > 0 and grads["untied"] == 0


# ---- Show, Attend and Tell


def test_sat_tanh_readout_is_eq_7_through_tanh():
    """One step in plain torch: p(y_t) = softmax(L_o tanh(E y_{t-1} + L_h h_t + L_z z_t)) (the authors'
    capgen.py), without the tanh by default."""
    for activation, f in (("tanh", torch.tanh), ("none", lambda t: t)):
        model = _model("show_attend_tell", readout_activation=activation)
        tokens = torch.tensor([0, 3, 7])
        with torch.no_grad():
            state = model.init_state(_feats())
            got, new = model.step(tokens, state)
            alpha = torch.softmax(
                model.attention.score(
                    torch.tanh(state["att_proj"] + model.attention.hidden_proj(state["h"])[:, None])
                ).squeeze(-1),
                dim=-1,
            )
            z = torch.sigmoid(model.beta(state["h"])) * (alpha[..., None] * state["att"]).sum(dim=1)
            emb = model.embed.weight[tokens]
            h, _ = model.lstm(torch.cat([emb, z], dim=-1), (state["h"], state["c"]))
            readout = emb + h @ model.out_h.weight.T + model.out_h.bias + z @ model.out_z.weight.T + model.out_z.bias
            assert (readout.abs() > 1).any()  # where tanh bends
            want = torch.log_softmax(f(readout) @ model.logit.weight.T + model.logit.bias, dim=-1)
            assert torch.allclose(got, want, atol=1e-5), activation


def _alpha_example():
    """Two images, two steps, three regions; image 2 has two real regions and one padded step.

    image 1: sums over t (1.5, 0.25, 0.25) -> deficits (0.25, 0.5625, 0.5625), sum 1.375, mean 1.375 / 3
    image 2: step 2 masked, sums (0.25, 0.75) -> deficits (0.5625, 0.0625), sum 0.625, mean 0.3125
    """
    alpha = torch.tensor(
        [
            [[0.5, 0.25, 0.25], [1.0, 0.0, 0.0]],  # a region is real where step 1 attends to it
            [[0.25, 0.75, 0.0], [0.5, 0.5, 0.0]],
        ]
    )  # (B, T, R)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])  # (B, T)
    return {"aux_alpha": alpha}, mask


@pytest.mark.parametrize(
    "average, want",
    [
        ("image", 2.0 * (1.375 + 0.625) / 2),  # summed over regions, averaged over images
        ("region", 2.0 * (1.375 / 3 + 0.625 / 2)),  # averaged over real regions, summed over images
    ],
)
def test_sat_regulariser_by_hand(average, want):
    model = create_model("show_attend_tell", vocab_size=V, feat_dim=D, alpha_reg=2.0, alpha_reg_average=average)
    aux, mask = _alpha_example()
    assert model.aux_loss(aux, mask).item() == pytest.approx(want, abs=1e-6)


def test_sat_region_regulariser_is_capgens_formula():
    """The authors' capgen.py: alpha_c * ((1. - alphas.sum(0)) ** 2).sum(0).mean(), alphas (T, B, R),
    on full grids and captions of one length (their batches: homogeneous lengths)."""
    g = torch.Generator().manual_seed(0)
    alpha = torch.softmax(torch.randn(4, 6, 7, generator=g), dim=-1)  # (B, T, R)
    mask = torch.ones(4, 6)
    alphas = alpha.transpose(0, 1)  # their (T, B, R)
    want = 0.7 * ((1.0 - alphas.sum(0)) ** 2).sum(0).mean()
    model = create_model("show_attend_tell", vocab_size=V, feat_dim=D, alpha_reg=0.7, alpha_reg_average="region")
    assert model.aux_loss({"aux_alpha": alpha}, mask).item() == pytest.approx(want.item(), rel=1e-6)
    # ours by default: R / B times theirs on this batch
    model.alpha_reg_average = "image"
    assert model.aux_loss({"aux_alpha": alpha}, mask).item() == pytest.approx(want.item() * 7 / 4, rel=1e-6)


# ---- checking and export


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_the_rules_check_accepts_the_options_and_refuses_other_values(name):
    for option, (value, default) in OPTIONS[name].items():
        assert option in CAPTIONERS.options(name)
        CAPTIONERS.check_options(name, {option: value})
        assert list(CAPTIONERS.bad_values(name, {option: value})) == []
        assert list(CAPTIONERS.bad_values(name, {option: default})) == []
    for option, choices in CAPTIONERS.classes[name].option_choices.items():
        assert list(CAPTIONERS.bad_values(name, {option: "gelu"})) == [
            (option, f"'gelu' must be one of {', '.join(choices)}")
        ]
        with pytest.raises(CaptionflowError, match=f"^model {name}: {option} must be one of .*got 'gelu'$"):
            CAPTIONERS.classes[name](vocab_size=V, feat_dim=D, **{option: "gelu"})  # without the registry's check


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_onnx_export_with_the_options_gives_pytorchs_log_probs(name, tmp_path):
    pytest.importorskip("onnxruntime")
    from captionflow.deploy.onnx import OnnxCaptioner, export_onnx

    model = _model(name, **{option: value for option, (value, _) in OPTIONS[name].items()})
    onnx = OnnxCaptioner(export_onnx(model, tmp_path))
    feats = _feats(b=2)
    tokens = torch.tensor([0, 0])
    with torch.no_grad():
        want_state = model.init_state(feats)
        state = onnx.init_state(feats)
        for t in (1, 4, 0):  # three steps, the cache or recurrent state carried along
            want, want_state = model.step(tokens, want_state)
            got, state = onnx.step(tokens, state)
            assert torch.allclose(got, want, atol=1e-4)
            tokens = torch.full((2,), t)


def test_a_bundle_keeps_the_options(tiny_data, tmp_path):
    """A bundle of a model with every option set loads as that model (its args and weights), and captions."""
    import captionflow
    from tests.unit.conftest import _checkpoint, _export, _test_images

    options = {option: value for option, (value, _) in OPTIONS["transformer"].items()}
    sizes = {**SIZES["transformer"], "dropout": 0.0}
    model = _checkpoint(tiny_data, tmp_path / "model.pt", name="transformer", **sizes, **options).eval()
    captioner = captionflow.load(_export(tiny_data, tmp_path, tmp_path / "model.pt"), device="cpu")
    loaded = captioner.members[0].model
    assert (loaded.tie_output, loaded.region_embed_relu) == (False, True)
    assert list(loaded.state_dict()) == list(model.state_dict())
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    assert all(isinstance(c, str) for c in captioner.caption(_test_images(tiny_data)[:2]))
