"""`captionflow import-weights`: released weights of other projects -> files captionflow runs.

    expansionnet  ExpansionNet v2's published checkpoint (github jchenghu/ExpansionNet_v2:
                  rf_model.pth, its Swin-L backbone included) and its token pickle
                  (demo_coco_tokens.pickle) -> a bundle that `captionflow caption` runs
    swin          a Swin checkpoint in Microsoft's layout (microsoft/Swin-Transformer
                  releases) -> a backbone state dict that `features.weights` reads

Both refuse what they cannot account for: every published key has its place in our model
with the same shape, and every weight of our model comes from one published key; anything
else is a one-line error naming the key. The checkpoint is read with weights_only loading
and the token pickle with an unpickler that builds plain lists, dicts, strings and numbers
only (a pickle naming any Python class or function is refused: nothing of it runs).

ExpansionNet v2 in the authors' code and ours (models/expansionnet.py) are the same
network under other names: the tables below map them. Its vocabulary has four special
tokens, PAD, SOS, EOS and UNK; ours has index 0 for both the start and the end of a
caption and the words at 1..V. Input and output layers are not tied, so index 0 takes the
SOS row of the word embedding (what decoding starts from) and the EOS row of the output
layer (what ends a caption); PAD and SOS leave the output layer and EOS the embedding (a
caption never continues past its end), UNK stays a word as in our vocabularies (labels.UNK).
Whitespace-only tokens (the published vocabulary has a newline) are no words to us and are
dropped likewise.

The Swin backbone of either checkpoint is in Microsoft's layout (patch merging at the end of
a stage, attention-mask and position-index buffers); timm's own converter for it,
timm.models.swin_transformer.checkpoint_filter_fn, moves it to timm's layout.
"""

import argparse
import os
import pickle
import re
import sys
from pathlib import Path

import torch
from timm.models.swin_transformer import checkpoint_filter_fn

from captionflow.config import section_defaults
from captionflow.data.labels import UNK, vocab_hash
from captionflow.deploy.bundle import FORMAT, FORMAT_VERSION, provenance, write_bundle
from captionflow.errors import CaptionflowError
from captionflow.features.backbones import Backbone
from captionflow.models import create_model
from captionflow.utils.io import atomic_path
from captionflow.utils.state import first_nonfinite, load_checked, load_torch_file

MODEL = "expansionnet_v2"
SWIN = "swin_large_patch4_window12_384"  # ExpansionNet v2's backbone (its demo.py builds this Swin-L)
IMAGE_SIZE = 384
PAPER_ENC_EXPANSIONS = (32, 64, 128, 256, 512)  # not in the checkpoint: the authors' demo.py sets them
PAPER_HEADS = 8  # likewise
BACKBONE_PREFIX = "swin_transf."

# Our top-level module -> the authors' (End_ExpansionNet_v2); word_embed and logit are
# re-indexed to our vocabulary, att_norm (feature standardisation) has no counterpart: the
# authors feed the Swin grid to input_linear as it is, so it stays the identity (mean 0, std 1).
TOP = {
    "att_embed": "input_linear",
    "enc_merge": "enc_reduce_group",
    "enc_norm": "enc_reduce_norm",
    "word_embed": "out_embedder.embed",
    "pos_embed": "pos_encoder",
    "dec_merge": "dec_reduce_group",
    "dec_norm": "dec_reduce_norm",
    "logit": "vocab_linear",
}
IDENTITY = ("att_norm.mean", "att_norm.std")
# Inside encoder layer i (ours encoder.i, theirs encoders.i) and decoder layer i (decoder.i, decoders.i).
ENCODER = {
    "norm1": "norm_1",
    "norm2": "norm_2",
    "mixer.queries": "stc_exp.query_exp_vectors.weight",
    "mixer.biases": "stc_exp.bias_exp_vectors.weight",
    "mixer.key": "stc_exp.key_embed",
    "mixer.value_a": "stc_exp.class_a_embed",
    "mixer.value_b": "stc_exp.class_b_embed",
    "mixer.selector": "stc_exp.selector_embed",
    "ff.fc1": "ff.linear_1",
    "ff.fc2": "ff.linear_2",
}
DECODER = {
    "norm1": "norm_1",
    "norm2": "norm_2",
    "norm3": "norm_3",
    "mixer.queries": "dyn_exp.query_exp_vectors.weight",
    "mixer.biases": "dyn_exp.bias_exp_vectors.weight",
    "mixer.cond": "dyn_exp.cond_embed",
    "mixer.key": "dyn_exp.key_linear",
    "mixer.value_a": "dyn_exp.class_a_embed",
    "mixer.value_b": "dyn_exp.class_b_embed",
    "mixer.selector": "dyn_exp.selector_embed",
    "cross.query": "mha.Wq",
    "cross.key": "mha.Wk",
    "cross.value": "mha.Wv",
    "cross.out": "mha.out_linear",
    "ff.fc1": "ff.linear_1",
    "ff.fc2": "ff.linear_2",
}
LAYERS = {"encoder": ("encoders", ENCODER), "decoder": ("decoders", DECODER)}


def _rename(name, table):
    """`name` with its leading module renamed by `table` (whole dotted parts only), or None."""
    for ours, theirs in table.items():
        if name == ours:
            return theirs
        if name.startswith(ours + "."):
            return theirs + name[len(ours) :]
    return None


def published_key(key):
    """Our ExpansionNetV2 state-dict key -> the authors' key, or None (att_norm, no counterpart)."""
    head, _, rest = key.partition(".")
    if head in LAYERS:
        index, _, inner = rest.partition(".")
        prefix, table = LAYERS[head]
        inner = _rename(inner, table)
        return None if inner is None else f"{prefix}.{index}.{inner}"
    return _rename(key, TOP)


class _PlainUnpickler(pickle.Unpickler):
    """Builds only what needs no class: lists, dicts, tuples, strings, numbers."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name}")


def read_tokens(path):
    """ExpansionNet's token pickle -> (words [(their index, word)] for our ids 1..V in their
    order, the number of published tokens, SOS index, EOS index). Loaded without running
    anything it names."""
    where = f"tokens pickle {path}"
    fix = "give the demo_coco_tokens.pickle released with the checkpoint"
    try:
        with open(path, "rb") as f:
            tokens = _PlainUnpickler(f).load()
    except FileNotFoundError:
        raise CaptionflowError(f"{where} does not exist; {fix}") from None
    except IsADirectoryError:
        raise CaptionflowError(f"{where} is a folder; {fix}") from None
    except pickle.UnpicklingError as exc:
        if (found := re.match(r"GLOBAL (\S+)", str(exc))) is not None:
            raise CaptionflowError(
                f"{where} names Python objects ({found.group(1)}), and a token list needs none: not loaded, nothing of "
                f"it run; {fix}"
            ) from None
        raise CaptionflowError(f"{where} cannot be read ({exc}); {fix}") from None
    except Exception as exc:  # empty, truncated, not a pickle
        raise CaptionflowError(f"{where} cannot be read ({type(exc).__name__}: {exc}); {fix}") from None
    if not isinstance(tokens, dict) or not isinstance(tokens.get("idx2word_list"), list):
        raise CaptionflowError(f"{where} is not a token list (a dict with idx2word_list, sos_str, eos_str); {fix}")
    idx2word = tokens["idx2word_list"]
    if not all(isinstance(w, str) for w in idx2word) or len(set(idx2word)) != len(idx2word):
        raise CaptionflowError(f"{where}: idx2word_list must hold distinct strings; {fix}")
    word2idx = tokens.get("word2idx_dict")
    if word2idx is not None and word2idx != {w: i for i, w in enumerate(idx2word)}:
        raise CaptionflowError(f"{where}: word2idx_dict and idx2word_list disagree; {fix}")
    special = {}
    for name in ("sos_str", "eos_str"):
        token = tokens.get(name)
        if not isinstance(token, str) or token not in idx2word:
            raise CaptionflowError(f"{where}: {name} {token!r} is not one of its words; {fix}")
        special[name] = idx2word.index(token)
    dropped = {tokens["sos_str"], tokens["eos_str"], "PAD"}
    words = [(i, w) for i, w in enumerate(idx2word) if w not in dropped and w.strip()]
    if any(len(w.split()) != 1 for _, w in words):
        bad = next(w for _, w in words if len(w.split()) != 1)
        raise CaptionflowError(f"{where}: token {bad!r} holds whitespace, which captions cannot tell apart; {fix}")
    return words, len(idx2word), special["sos_str"], special["eos_str"]


def _read_checkpoint(path, what, expected, fix):
    """A checkpoint's state dict (weights_only), under model_state_dict/model/state_dict or bare."""
    state = load_torch_file(path, what=what, expected=expected, fix=fix)
    for key in ("model_state_dict", "model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise CaptionflowError(f"{what} {path} holds no state dict of tensors; {fix}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if (bad := first_nonfinite(state)) is not None:
        raise CaptionflowError(f"{what} {path}: {bad} holds NaN or inf; {fix}")
    return state


def _count_layers(state, prefix):
    return len({k.split(".")[1] for k in state if k.startswith(prefix + ".")})


def expansionnet_args(state, vocab_size, enc_expansions, n_heads, where):
    """ExpansionNetV2 arguments from the published tensors' shapes (and the two settings the
    checkpoint does not record: the expansion lengths' split and the number of heads)."""

    def shape(key):
        if key not in state:
            raise CaptionflowError(f"{where} has no {key}, which ExpansionNet v2 holds; give rf_model.pth")
        return tuple(state[key].shape)

    d_model, feat_dim = shape("input_linear.weight")
    n_enc, n_dec = _count_layers(state, "encoders"), _count_layers(state, "decoders")
    n_queries = shape("encoders.0.stc_exp.query_exp_vectors.weight")[0]
    if sum(enc_expansions) != n_queries:
        raise CaptionflowError(
            f"{where}: the encoder has {n_queries} static expansion vectors, but --enc-expansions "
            f"{','.join(map(str, enc_expansions))} add up to {sum(enc_expansions)}; give the lengths it was trained with"
        )
    return {
        "vocab_size": vocab_size,
        "feat_dim": feat_dim,
        "embed_size": d_model,
        "hidden_size": shape("encoders.0.ff.linear_1.weight")[0],
        "n_enc_layers": n_enc,
        "n_dec_layers": n_dec,
        "n_heads": n_heads,
        "enc_expansions": list(enc_expansions),
        "dec_expansions": shape("decoders.0.dyn_exp.query_exp_vectors.weight")[0],
        "max_len": shape("pos_encoder.weight")[0],
    }


def expansionnet_weights(state, model, words, n_tokens, sos, eos, where):
    """The authors' captioner tensors -> our model's state dict (every key accounted for, shapes
    checked); word_embed and logit, one row per published token (n_tokens), re-indexed: row 0 =
    SOS (input) / EOS (output), then `words`."""
    own = model.state_dict()
    source = {k: published_key(k) for k in own if k not in IDENTITY}
    wanted = set(source.values())
    if (extra := sorted(k for k in state if k not in wanted)) != []:
        raise CaptionflowError(f"{where}: key {extra[0]} has no place in model {MODEL} ({len(extra)} such keys)")
    if (missing := sorted(k for k in wanted if k not in state)) != []:
        raise CaptionflowError(f"{where}: key {missing[0]} is missing ({len(missing)} keys missing); give rf_model.pth")
    rows = {"word_embed.weight": [sos], "logit.weight": [eos], "logit.bias": [eos]}
    out = {k: own[k] for k in IDENTITY}
    for key, theirs in source.items():
        tensor = state[theirs]
        if key in rows:
            if tensor.shape[0] != n_tokens:
                raise CaptionflowError(
                    f"{where}: {theirs} has {tensor.shape[0]} rows but the tokens pickle has {n_tokens} tokens; "
                    "give the pickle released with this checkpoint"
                )
            tensor = tensor[rows[key] + [i for i, _ in words]]
        if tensor.shape != own[key].shape:
            raise CaptionflowError(
                f"{where}: {theirs} has shape {tuple(tensor.shape)}, but {key} of model {MODEL} needs "
                f"{tuple(own[key].shape)}"
            )
        out[key] = tensor.to(own[key].dtype).clone()
    return out


def _timm_model(grid):
    model = getattr(grid.backbone.trunk, "model", None)
    if model is None or not hasattr(model, "layers"):
        raise CaptionflowError("the backbone must be a timm Swin model (swin_*)")
    return model


def swin_weights(state, backbone, where):
    """A Microsoft-layout Swin state dict -> the state dict of `backbone`'s network (GridBackbone,
    trunk.model.* keys), converted by timm's checkpoint_filter_fn; the classifier is dropped.
    Shapes are checked first, so a Swin of another size is refused instead of resampled."""
    grid = backbone.build()
    model = _timm_model(grid)
    own = model.state_dict()
    for key, value in state.items():  # these keep their names in both layouts
        if key.endswith(("relative_position_bias_table", "patch_embed.proj.weight")) and key in own:
            if value.shape != own[key].shape:
                raise CaptionflowError(
                    f"{where}: {key} has shape {tuple(value.shape)}, but backbone {backbone.name} at "
                    f"{backbone.image_size} px has {tuple(own[key].shape)}: another window or patch size; "
                    "give --backbone the timm name of the checkpoint's Swin"
                )
    converted = checkpoint_filter_fn(dict(state), model)
    converted = {k: v for k, v in converted.items() if not k.startswith("head.")}
    load_checked(model, converted, where, f"backbone {backbone.name} (timm layout)")
    return grid


def expansionnet_bundle(checkpoint, tokens, backbone_name, image_size, enc_expansions, n_heads):
    """ExpansionNet v2's published checkpoint and token pickle -> a captionflow bundle (dict)."""
    where = f"checkpoint {checkpoint}"
    fix = "give ExpansionNet v2's rf_model.pth"
    state = _read_checkpoint(checkpoint, "checkpoint", "an ExpansionNet v2 checkpoint", fix)
    words, n_tokens, sos, eos = read_tokens(tokens)
    if "input_linear.weight" not in state:
        raise CaptionflowError(
            f"{where} is not an ExpansionNet v2 checkpoint (no input_linear.weight; it holds e.g. "
            f"{next(iter(state))}); {fix}"
        )
    swin = {k[len(BACKBONE_PREFIX) :]: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}
    captioner = {k: v for k, v in state.items() if not k.startswith(BACKBONE_PREFIX)}
    if not swin:
        raise CaptionflowError(f"{where} holds no backbone ({BACKBONE_PREFIX}*); {fix} (the end-to-end model)")
    ix_to_word = {str(i + 1): w for i, (_, w) in enumerate(words)}
    args = expansionnet_args(captioner, len(words), enc_expansions, n_heads, where)
    model = create_model(MODEL, **args)
    load_checked(
        model, expansionnet_weights(captioner, model, words, n_tokens, sos, eos, where), where, f"model {MODEL}"
    )
    backbone = Backbone(backbone_name, "none", 0, image_size, 0)
    grid = swin_weights(swin, backbone, f"{where} ({BACKBONE_PREFIX}*)")
    with torch.no_grad():
        att, _ = grid.eval()(torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8))
    if att.shape[2] != args["feat_dim"]:
        raise CaptionflowError(
            f"{where}: the captioner reads {args['feat_dim']} features per region, but backbone {backbone_name} "
            f"gives {att.shape[2]}; give --backbone the Swin it was trained with"
        )
    decoding = {
        k: v
        for k, v in section_defaults("evaluate").items()
        if k in ("beam_size", "max_len", "alpha", "block_trigrams")
    }
    decoding["max_len"] = min(decoding["max_len"], args["max_len"] - 1)
    bundle = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": {"name": MODEL, "args": args, "weights": model.state_dict(), "blind": False},
        "vocabulary": {"ix_to_word": ix_to_word, "hash": vocab_hash(ix_to_word)},
        "backbone": {
            "name": backbone_name,
            "image_size": image_size,
            "grid_size": 0,
            "weights": grid.backbone.state_dict(),
        },
        "features": {"source": backbone_name, "regions": int(att.shape[1])},
        # the authors squash images to image_size (no crop) and feed them unrounded: "exact",
        # and the JPEG round trip every bundle makes at its highest quality
        "preprocess": {"resize_mode": "exact", "size": image_size, "jpeg_quality": 100, "feature_dtype": "float32"},
        "decoding": decoding,
    }
    bundle["provenance"] = provenance(f"imported {MODEL}", [], checkpoint, None, None, None)
    bundle["provenance"]["tokens"] = str(tokens)
    bundle["provenance"]["imported_from"] = "github.com/jchenghu/ExpansionNet_v2"
    return bundle, words


def _inode(path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def check_output(out, inputs):
    """Refuse, before any work, an output that is a folder, in a missing folder, or one of
    the inputs (it would be destroyed)."""
    out = Path(out)
    if out.is_dir():
        raise CaptionflowError(f"--out {out} is a folder; give a file name")
    target = Path(os.path.realpath(out))
    if not target.parent.is_dir():
        raise CaptionflowError(f"--out {out}: folder {target.parent} does not exist; give a file in an existing folder")
    for path in inputs:
        if (key := _inode(path)) is not None and key == _inode(target):
            raise CaptionflowError(f"--out {out} is the input {path}; write elsewhere")


def card_path(out):
    return Path(out).with_suffix(".json")


def run_expansionnet(args):
    enc_expansions = tuple(int(x) for x in args.enc_expansions.split(","))
    if Path(args.out).suffix == ".json":
        raise CaptionflowError(f"--out {args.out}: the bundle's card goes to a .json beside it; name the bundle .pt")
    check_output(args.out, [args.checkpoint, args.tokens])
    check_output(card_path(args.out), [args.checkpoint, args.tokens])
    bundle, words = expansionnet_bundle(
        args.checkpoint, args.tokens, args.backbone, args.image_size, enc_expansions, args.heads
    )
    write_bundle(bundle, args.out, card_path(args.out))
    unk = " (UNK among them)" if any(w == UNK for _, w in words) else ""
    print(
        f"captionflow import-weights: wrote {args.out} ({MODEL}, {len(words)} words{unk}, backbone {args.backbone} "
        f"{args.image_size} px); caption with: captionflow caption IMAGE --model {args.out}",
        flush=True,
    )
    return 0


def run_swin(args):
    check_output(args.out, [args.checkpoint])
    where = f"checkpoint {args.checkpoint}"
    state = _read_checkpoint(
        args.checkpoint,
        "checkpoint",
        "a Swin checkpoint",
        "give a Swin checkpoint (microsoft/Swin-Transformer release)",
    )
    if not any(k.startswith("layers.") for k in state):
        raise CaptionflowError(
            f"{where} is not a Swin checkpoint (no layers.* keys; it holds e.g. {next(iter(state))})"
        )
    grid = swin_weights(state, Backbone(args.backbone, "none", 0, args.image_size, 0), where)
    with atomic_path(args.out) as tmp:
        torch.save(grid.backbone.state_dict(), tmp)
    print(
        f"captionflow import-weights: wrote {args.out}; in config.yaml: features: {{backbone: {args.backbone}, "
        f"weights: {os.path.abspath(args.out)}}} and resize: {{size: {args.image_size}}}",
        flush=True,
    )
    return 0


def _expansions(text):
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"must be positive integers separated by commas, got {text!r}")
    return text


def _positive(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer of at least 1, got {text!r}")
    return value


def add_parser(subparsers):
    """Register `import-weights` on the `captionflow` command's subparsers."""
    p = subparsers.add_parser(
        "import-weights",
        help="convert released weights (ExpansionNet v2, Swin) into a bundle or backbone file",
        description="Convert released weights into files captionflow runs; nothing is overwritten but --out, "
        "which is written atomically. Exit status: 0 written; 2 an error (one line, nothing written).",
    )
    kinds = p.add_subparsers(dest="kind", required=True)
    e = kinds.add_parser(
        "expansionnet",
        help="ExpansionNet v2's rf_model.pth + demo_coco_tokens.pickle -> a bundle for `captionflow caption`",
        description="ExpansionNet v2's published checkpoint (github jchenghu/ExpansionNet_v2) -> a captionflow bundle.",
    )
    e.add_argument("--checkpoint", required=True, metavar="rf_model.pth")
    e.add_argument("--tokens", required=True, metavar="demo_coco_tokens.pickle")
    e.add_argument(
        "--out", required=True, metavar="BUNDLE.pt", help="the bundle; its card is written beside it as .json"
    )
    e.add_argument("--backbone", default=SWIN, help="timm name of the Swin the checkpoint holds")
    e.add_argument("--image-size", type=_positive, default=IMAGE_SIZE, help="the Swin's input side in pixels")
    e.add_argument(
        "--enc-expansions",
        type=_expansions,
        default=",".join(map(str, PAPER_ENC_EXPANSIONS)),
        help="the static expansion lengths (the checkpoint holds only their sum)",
    )
    e.add_argument("--heads", type=_positive, default=PAPER_HEADS, help="cross-attention heads (not in the checkpoint)")
    e.set_defaults(run=run_expansionnet)
    s = kinds.add_parser(
        "swin",
        help="a Microsoft-layout Swin checkpoint -> a backbone file for features.weights",
        description="A Swin checkpoint in Microsoft's layout (microsoft/Swin-Transformer) -> a state dict that "
        "features.weights reads (the classifier dropped).",
    )
    s.add_argument("--checkpoint", required=True, metavar="swin_*.pth")
    s.add_argument("--out", required=True, metavar="BACKBONE.pth")
    s.add_argument("--backbone", default=SWIN, help="timm name of the checkpoint's Swin (features.backbone)")
    s.add_argument("--image-size", type=_positive, default=IMAGE_SIZE, help="the images' side (resize.size)")
    s.set_defaults(run=run_swin)
    return p


def main(argv=None):
    """`captionflow import-weights` on its own -> exit status."""
    p = argparse.ArgumentParser(prog="captionflow")
    add_parser(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(["import-weights", *(argv or [])])
    try:
        return args.run(args)
    except CaptionflowError as exc:
        print(f"captionflow import-weights: {exc}", file=sys.stderr)
        return 2
