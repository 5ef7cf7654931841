"""`captionflow import-weights`: ExpansionNet v2's published checkpoint layout -> a bundle that
`captionflow caption` runs, a Microsoft-layout Swin -> a features.weights file, bad inputs.

No downloads: the published layout is written down here as data (key names and shapes as
the authors' End_ExpansionNet_v2 names them, jchenghu/ExpansionNet_v2 models/layers.py), at
toy sizes, and filled with random tensors; the Swin is a toy one registered with timm."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.models import register_model
from timm.models.swin_transformer import _create_swin_transformer

from captionflow.cli import main
from captionflow.deploy.bundle import load_bundle
from captionflow.errors import CaptionflowError
from captionflow.features.backbones import Backbone

TOY_SWIN = "swin_cftest_tiny"
IMAGE = 32  # 8 x 8 patches, one merge -> a 4 x 4 grid of 32 features


@register_model
def swin_cftest_tiny(pretrained=False, **kwargs):
    """A Swin small enough for a unit test: 2 stages of 2 blocks, window 4, widths 16 and 32."""
    args = dict(patch_size=4, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2))
    return _create_swin_transformer(TOY_SWIN, pretrained=pretrained, **dict(args, **kwargs))


D, FF, ENC_EXP, DEC_EXP, POSITIONS, FEAT = 16, 24, (3, 5), 4, 20, 32
N_ENC, N_DEC = 2, 2
# The published token list: the authors' four special tokens, a blank token (their list has "\n").
TOKENS = ["\n", "a", "EOS", "PAD", "SOS", "UNK", "cat", "dog", "on", "mat", "red", "the"]
WORDS = ["a", "UNK", "cat", "dog", "on", "mat", "red", "the"]  # ours, ids 1..8: specials and blank dropped
# name -> shape in the published layout ("T" = number of tokens)
ENCODER_LAYER = {
    "norm_1.weight": (D,),
    "norm_1.bias": (D,),
    "norm_2.weight": (D,),
    "norm_2.bias": (D,),
    "stc_exp.query_exp_vectors.weight": (sum(ENC_EXP), D),
    "stc_exp.bias_exp_vectors.weight": (sum(ENC_EXP), D),
    **{
        f"stc_exp.{m}.{p}": (D, D) if p == "weight" else (D,)
        for m in ("key_embed", "class_a_embed", "class_b_embed", "selector_embed")
        for p in ("weight", "bias")
    },
    "ff.linear_1.weight": (FF, D),
    "ff.linear_1.bias": (FF,),
    "ff.linear_2.weight": (D, FF),
    "ff.linear_2.bias": (D,),
}
DECODER_LAYER = {
    **{f"norm_{i}.{p}": (D,) for i in (1, 2, 3) for p in ("weight", "bias")},
    **{
        f"mha.{m}.{p}": (D, D) if p == "weight" else (D,)
        for m in ("Wq", "Wk", "Wv", "out_linear")
        for p in ("weight", "bias")
    },
    "dyn_exp.query_exp_vectors.weight": (DEC_EXP, D),
    "dyn_exp.bias_exp_vectors.weight": (DEC_EXP, D),
    **{
        f"dyn_exp.{m}.{p}": (D, D) if p == "weight" else (D,)
        for m in ("cond_embed", "key_linear", "class_a_embed", "class_b_embed", "selector_embed")
        for p in ("weight", "bias")
    },
    "ff.linear_1.weight": (FF, D),
    "ff.linear_1.bias": (FF,),
    "ff.linear_2.weight": (D, FF),
    "ff.linear_2.bias": (D,),
}
TOP = {
    "input_linear.weight": (D, FEAT),
    "input_linear.bias": (D,),
    "vocab_linear.weight": ("T", D),
    "vocab_linear.bias": ("T",),
    "out_embedder.embed.weight": ("T", D),
    "pos_encoder.weight": (POSITIONS, D),
    "enc_reduce_group.weight": (D, N_ENC * D),
    "enc_reduce_group.bias": (D,),
    "enc_reduce_norm.weight": (D,),
    "enc_reduce_norm.bias": (D,),
    "dec_reduce_group.weight": (D, N_DEC * D),
    "dec_reduce_group.bias": (D,),
    "dec_reduce_norm.weight": (D,),
    "dec_reduce_norm.bias": (D,),
}


def _toy_swin(seed, num_classes=0):
    torch.manual_seed(seed)
    return timm.create_model(TOY_SWIN, img_size=IMAGE, num_classes=num_classes).eval()


def microsoft_layout(timm_state, window=4, resolution=8):
    """timm's Swin state dict -> Microsoft's layout (the inverse of timm's checkpoint_filter_fn):
    patch merging moves from the start of stage i + 1 to the end of stage i, the classifier is
    `head`, and the buffers timm does not save are added (their values are never read)."""
    out = {}
    for key, value in timm_state.items():
        parts = key.split(".")
        if parts[0] == "layers" and parts[2] == "downsample":
            parts[1] = str(int(parts[1]) - 1)
        key = ".".join(parts).replace("head.fc.", "head.")
        out[key] = value
        if key.endswith("attn.relative_position_bias_table"):
            block = key.removesuffix("attn.relative_position_bias_table")
            out[block + "attn.relative_position_index"] = torch.randint(0, 49, (window**2, window**2))
            if block.startswith("layers.0.") and block.endswith(".1."):  # a shifted block of stage 0
                n_windows = (resolution // window) ** 2
                out[block + "attn_mask"] = torch.zeros(n_windows, window**2, window**2)
    return out


def published_state(seed=0):
    """Random tensors in the published layout: the captioner's keys plus swin_transf.*."""
    g = torch.Generator().manual_seed(seed)
    shapes = dict(TOP)
    for i in range(N_ENC):
        shapes.update({f"encoders.{i}.{k}": s for k, s in ENCODER_LAYER.items()})
    for i in range(N_DEC):
        shapes.update({f"decoders.{i}.{k}": s for k, s in DECODER_LAYER.items()})
    state = {
        k: torch.randn(tuple(len(TOKENS) if n == "T" else n for n in s), generator=g) * 0.3 for k, s in shapes.items()
    }
    # every caption would end at once if the end token won: keep it from winning, so the
    # caption runs to max_len words and shows the vocabulary is read
    state["vocab_linear.bias"][TOKENS.index("EOS")] = -100.0
    swin = microsoft_layout(_toy_swin(seed + 1).state_dict())
    state.update({f"swin_transf.{k}": v for k, v in swin.items()})
    return state


def _save_tokens(path, tokens=TOKENS, **extra):
    with open(path, "wb") as f:
        pickle.dump(
            {
                "word2idx_dict": {w: i for i, w in enumerate(tokens)},
                "idx2word_list": tokens,
                "sos_str": "SOS",
                "eos_str": "EOS",
                **extra,
            },
            f,
        )
    return path


def _run(capsys, *args):
    status = main(["import-weights", *map(str, args)])
    out, err = capsys.readouterr()
    return status, out, err.splitlines()


def _import(capsys, tmp_path, state, tokens=None, out="en.pt"):
    ckpt = tmp_path / "rf_model.pth"
    torch.save({"model_state_dict": state}, ckpt)
    tokens = tokens or _save_tokens(tmp_path / "tokens.pickle")
    return _run(
        capsys,
        "expansionnet",
        "--checkpoint",
        ckpt,
        "--tokens",
        tokens,
        "--out",
        tmp_path / out,
        "--backbone",
        TOY_SWIN,
        "--image-size",
        IMAGE,
        "--enc-expansions",
        "3,5",
        "--heads",
        2,
    )


def _one_line(err, status):
    return (
        status == 2
        and len(err) == 1
        and err[0].startswith("captionflow import-weights: ")
        and "Traceback" not in err[0]
    )


def test_expansionnet_checkpoint_becomes_a_bundle_that_captions(capsys, tmp_path):
    state = published_state()
    status, out, err = _import(capsys, tmp_path, state)
    assert status == 0, err
    bundle = load_bundle(tmp_path / "en.pt")
    assert (tmp_path / "en.json").is_file()
    assert [bundle["vocabulary"]["ix_to_word"][str(i)] for i in range(1, len(WORDS) + 1)] == WORDS
    args = bundle["model"]["args"]
    assert (args["embed_size"], args["hidden_size"], args["n_enc_layers"], args["n_dec_layers"]) == (
        D,
        FF,
        N_ENC,
        N_DEC,
    )
    assert (args["enc_expansions"], args["dec_expansions"], args["max_len"], args["feat_dim"]) == (
        [3, 5],
        DEC_EXP,
        POSITIONS,
        FEAT,
    )
    ours, theirs = bundle["model"]["weights"], state
    for our_key, their_key in [
        ("encoder.1.mixer.queries", "encoders.1.stc_exp.query_exp_vectors.weight"),
        ("encoder.0.mixer.value_b.weight", "encoders.0.stc_exp.class_b_embed.weight"),
        ("decoder.1.cross.value.bias", "decoders.1.mha.Wv.bias"),
        ("decoder.0.mixer.cond.weight", "decoders.0.dyn_exp.cond_embed.weight"),
        ("decoder.1.norm3.weight", "decoders.1.norm_3.weight"),
        ("dec_merge.weight", "dec_reduce_group.weight"),
        ("pos_embed.weight", "pos_encoder.weight"),
    ]:
        assert torch.equal(ours[our_key], theirs[their_key]), our_key
    # index 0: starts from SOS's embedding, ends with EOS's logit; word k: its published row
    assert torch.equal(ours["word_embed.weight"][0], theirs["out_embedder.embed.weight"][TOKENS.index("SOS")])
    assert torch.equal(ours["logit.weight"][0], theirs["vocab_linear.weight"][TOKENS.index("EOS")])
    assert ours["logit.bias"][0] == -100.0
    cat = WORDS.index("cat") + 1
    assert torch.equal(ours["logit.weight"][cat], theirs["vocab_linear.weight"][TOKENS.index("cat")])
    assert torch.equal(ours["word_embed.weight"][cat], theirs["out_embedder.embed.weight"][TOKENS.index("cat")])
    assert torch.equal(ours["att_norm.std"], torch.ones(FEAT))  # the Swin grid goes in as it is
    backbone = bundle["backbone"]["weights"]
    assert torch.equal(
        backbone["trunk.model.layers.1.downsample.reduction.weight"],
        theirs["swin_transf.layers.0.downsample.reduction.weight"],
    )
    assert torch.equal(backbone["trunk.model.norm.bias"], theirs["swin_transf.norm.bias"])

    image = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(image)
    assert main(["caption", str(image), "--model", str(tmp_path / "en.pt"), "-q", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{image}\t")
    words = lines[0].split("\t")[1].split(" ")
    assert words and all(w in WORDS for w in words), words


def test_microsoft_swin_loads_into_the_backbone_with_equal_outputs(capsys, tmp_path):
    source = _toy_swin(seed=7, num_classes=10)  # a classifier, as released checkpoints have
    ckpt = tmp_path / "swin_ms.pth"
    torch.save({"model": microsoft_layout(source.state_dict())}, ckpt)
    status, out, err = _run(
        capsys,
        "swin",
        "--checkpoint",
        ckpt,
        "--out",
        tmp_path / "swin.pth",
        "--backbone",
        TOY_SWIN,
        "--image-size",
        IMAGE,
    )
    assert status == 0, err
    assert "features: {backbone: swin_cftest_tiny, weights: " in out
    grid = Backbone(TOY_SWIN, str(tmp_path / "swin.pth"), 0, IMAGE, 0).build().eval()  # what features.weights does
    images = torch.randint(0, 256, (2, 3, IMAGE, IMAGE), dtype=torch.uint8)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        att, _ = grid(images)
        want = source.forward_features((images.float() / 255 - mean) / std)  # (B, 4, 4, 32), channels last
        random_init, _ = Backbone(TOY_SWIN, "none", 0, IMAGE, 0).build().eval()(images)
    assert torch.allclose(att, want.flatten(1, 2), atol=1e-5)
    assert not torch.allclose(att, random_init, atol=1e-2)
    # the unconverted file given straight to features.weights: one line that names the command
    with pytest.raises(CaptionflowError, match="Microsoft-layout Swin.*import-weights swin"):
        Backbone(TOY_SWIN, str(ckpt), 0, IMAGE, 0).build()


def test_bad_inputs_are_one_line_and_write_nothing(capsys, tmp_path):
    state = published_state()
    other = {"fc.weight": torch.zeros(3, 4), "logit.weight": torch.zeros(5, 4)}  # another model's checkpoint
    status, _, err = _import(capsys, tmp_path, other)
    assert _one_line(err, status) and "is not an ExpansionNet v2 checkpoint" in err[0]

    missing = {k: v for k, v in state.items() if k != "decoders.1.mha.Wv.bias"}
    status, _, err = _import(capsys, tmp_path, missing)
    assert _one_line(err, status) and "key decoders.1.mha.Wv.bias is missing" in err[0]

    extra = dict(state, **{"decoders.0.mha.Wx.weight": torch.zeros(D, D)})
    status, _, err = _import(capsys, tmp_path, extra)
    assert _one_line(err, status) and "decoders.0.mha.Wx.weight has no place" in err[0]

    wrong = dict(state, **{"encoders.1.ff.linear_2.weight": torch.zeros(FF, D)})
    status, _, err = _import(capsys, tmp_path, wrong)
    assert _one_line(err, status) and "encoders.1.ff.linear_2.weight has shape (24, 16)" in err[0]

    no_list = tmp_path / "list.pickle"
    no_list.write_bytes(pickle.dumps([1, 2, 3]))
    status, _, err = _import(capsys, tmp_path, state, tokens=no_list)
    assert _one_line(err, status) and "is not a token list" in err[0]

    class Boom:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "ran",))

    code = tmp_path / "code.pickle"
    code.write_bytes(pickle.dumps({"idx2word_list": TOKENS, "sos_str": Boom()}))
    status, _, err = _import(capsys, tmp_path, state, tokens=code)
    assert _one_line(err, status) and "names Python objects (pathlib" in err[0]
    assert not (tmp_path / "ran").exists()

    status, _, err = _import(capsys, tmp_path, state, tokens=_save_tokens(tmp_path / "t.pickle", TOKENS[:-2]))
    assert _one_line(err, status) and ".weight has 12 rows but the tokens pickle has 10 tokens" in err[0]

    assert not (tmp_path / "en.pt").exists() and not (tmp_path / "en.json").exists()

    before = (tmp_path / "rf_model.pth").read_bytes()
    status, _, err = _import(capsys, tmp_path, state, out="rf_model.pth")
    assert _one_line(err, status) and "is the input" in err[0]
    assert (tmp_path / "rf_model.pth").read_bytes() == before

    torch.manual_seed(0)  # a Swin of another window: refused, not resampled
    other_window = timm.create_model(
        "swin_tiny_patch4_window7_224",
        num_classes=0,
        img_size=IMAGE,
        depths=(2, 2),
        num_heads=(1, 2),
        embed_dim=16,
        window_size=2,
    )
    torch.save({"model": microsoft_layout(other_window.state_dict(), window=2)}, tmp_path / "w2.pth")
    status, _, err = _run(
        capsys,
        "swin",
        "--checkpoint",
        tmp_path / "w2.pth",
        "--out",
        tmp_path / "s.pth",
        "--backbone",
        TOY_SWIN,
        "--image-size",
        IMAGE,
    )
    assert _one_line(err, status) and "relative_position_bias_table has shape (9, 1)" in err[0]
    assert not (tmp_path / "s.pth").exists()


def test_help_and_usage_errors(capsys):
    with pytest.raises(SystemExit) as done:
        main(["import-weights", "expansionnet", "--help"])
    assert done.value.code == 0 and "--tokens" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        main(
            [
                "import-weights",
                "expansionnet",
                "--checkpoint",
                "x",
                "--tokens",
                "y",
                "--out",
                "z",
                "--enc-expansions",
                "3,-1",
            ]
        )
    assert done.value.code == 2
