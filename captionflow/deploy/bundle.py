"""Stage export_model: one experiment's trained captioner as a self-contained bundle.

A bundle is one torch file that `torch.load(..., weights_only=True)` reads (tensors, dicts,
lists, strings and numbers only), with everything needed to caption a new image:

    format, version      "captionflow-bundle", FORMAT_VERSION
    model                name, args, weights (state dict; feature statistics included), blind
    vocabulary           ix_to_word {"1": word, ...} (index 0 ends a caption), hash
    backbone             name, image_size, grid_size, weights (state dict) of the network whose
                         features the model read: the fine-tuned one after finetune_e2e, the
                         extraction backbone otherwise; None for region features (bottom-up)
    features             source (the backbone name in the feature files), regions: the
                         att rows per image the model read (the backbone's grid at image_size)
    preprocess           resize mode and size, JPEG quality of the resized copies, the
                         feature dtype of the HDF5 files (float16 features are rounded alike)
    decoding             the experiment's evaluate settings (beam_size, max_len, alpha, block_trigrams)
    provenance           experiment, stages, stage, checkpoint sha256, test metrics per stage,
                         reward signature, config sha256, captionflow and torch versions

An ensemble's bundle holds `members` (member bundles without their provenance) instead of
model/vocabulary/backbone/preprocess. `bundle.json` beside the bundle repeats everything but
the weights, for people and tools.

Loading checks what a bundle carries against itself, so a damaged or hand-assembled bundle
is refused in one line instead of captioning with garbage: finite weights, a vocabulary
that fits its recorded hash and the model's output layer, and preprocessing that fits the
backbone (load_bundle; the feature grid, which needs the backbone run once, in Captioner).
Version 2 added features.regions; a version 1 bundle loads without that one check.
Version 3 names the backbone's grid size `grid_size` (the config's features.grid_size);
older bundles call it `att_size`, and `bundle_backbone` reads both.
"""

import hashlib
import json
from importlib import metadata
from pathlib import Path

import torch

from captionflow.data.captions import read_labels_json
from captionflow.data.labels import vocab_hash
from captionflow.data.resize import RESIZE_MODES
from captionflow.data.store import REEXTRACT, open_h5
from captionflow.errors import CaptionflowError
from captionflow.features.backbones import Backbone
from captionflow.models import checkpoint
from captionflow.utils.io import atomic_path, file_sha256, write_json
from captionflow.utils.state import first_nonfinite, load_torch_file

FORMAT = "captionflow-bundle"
FORMAT_VERSION = 3  # 2: features.regions; 3: backbone.grid_size (was att_size)
REGION_BACKBONES = ("bottomup_tsv", "fasterrcnn_resnet50_fpn")
FEATURE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
EXPORT_AGAIN = "export it again (snakemake export_model)"


def _version(package):
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def feature_attrs(path):
    """The attributes a feature HDF5 records about how it was made (backbone, weights, ...)."""
    with open_h5(path, "features", REEXTRACT) as f:
        return {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}


def feature_regions(path):
    """The att rows per image of a feature HDF5: the grid (or box count) the model read."""
    with open_h5(path, "features", REEXTRACT) as f:
        return int(f["att"].shape[1])


def feature_backbone(attrs, seed):
    """The Backbone that made a feature HDF5, from its attributes (None for region features).
    seed: the config's seed, the random init's when the weights are none."""
    name = str(attrs.get("backbone"))
    if name in REGION_BACKBONES:
        return None
    grid_size = attrs["grid_size"] if "grid_size" in attrs else attrs.get("att_size", 0)  # files before the rename
    return Backbone(name, str(attrs.get("weights", "none")), seed, int(attrs["image_size"]), int(grid_size))


def _backbone_part(attrs, seed):
    """The bundle's backbone from the attributes of the features the model read."""
    backbone = feature_backbone(attrs, seed)
    if backbone is None:
        return None
    network = backbone.build().backbone
    return {
        "name": backbone.name,
        "image_size": backbone.image_size,
        "grid_size": backbone.grid_size,
        "weights": network.state_dict(),
    }


def bundle_backbone(part):
    """-> (the Backbone a bundle part records, its weights (state dict)), or (None, None) for
    region features. The Backbone is built with random weights; load the state dict into
    its network (`build().backbone`). Bundles before version 3 call grid_size att_size."""
    b = part["backbone"]
    if b is None:
        return None, None
    grid_size = b["grid_size"] if "grid_size" in b else b.get("att_size", 0)
    return Backbone(b["name"], "none", 0, int(b["image_size"]), int(grid_size)), b["weights"]


def model_bundle(checkpoint_path, labels_json, features, manifest, decoding, seed=0):
    """The captioner part of a bundle: model, vocabulary, backbone, preprocessing, decoding."""
    index = read_labels_json(labels_json)
    model, ckpt = checkpoint.load_model(checkpoint_path, index["vocab_hash"])  # refuses a foreign vocabulary
    attrs = feature_attrs(features)
    with open(manifest) as f:
        resize = json.load(f)
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model": {
            "name": ckpt["model_name"],
            "args": ckpt["model_args"],
            "weights": model.state_dict(),
            "blind": bool(ckpt.get("blind", False)),
        },
        "vocabulary": {"ix_to_word": dict(index["ix_to_word"]), "hash": index["vocab_hash"]},
        "backbone": _backbone_part(attrs, seed),
        "features": {"source": str(attrs.get("backbone")), "regions": feature_regions(features)},
        "preprocess": {
            "resize_mode": resize["mode"],
            "size": int(resize["size"]),
            "jpeg_quality": int(resize["quality"]),
            "feature_dtype": str(attrs.get("dtype", "float32")),
        },
        "decoding": dict(decoding),
    }


def provenance(experiment, stages, checkpoint_path, metrics_json, signature, config_sha256):
    """Where a bundle comes from: stages, metrics, reward signature, config hash, versions."""
    metrics = {}
    if metrics_json:
        with open(metrics_json) as f:
            metrics = {stage: rep["metrics"] for stage, rep in json.load(f)["stages"].items()}
    return {
        "experiment": experiment,
        "stages": list(stages),
        "stage": stages[-1] if stages else None,
        "checkpoint": str(checkpoint_path) if checkpoint_path else None,
        "checkpoint_sha256": file_sha256(checkpoint_path) if checkpoint_path else None,
        "test_metrics": metrics,
        "reward_signature": Path(signature).read_text().strip() if signature else None,
        "config_sha256": config_sha256,
        "captionflow": _version("captionflow"),
        "torch": str(torch.__version__),
    }


def card(bundle):
    """The bundle without its weights (what bundle.json holds)."""
    if isinstance(bundle, dict):
        return {k: card(v) for k, v in bundle.items() if k != "weights"}
    if isinstance(bundle, list):
        return [card(v) for v in bundle]
    return bundle


def _nonfinite_weight(part):
    """'model weight <key>' (or backbone) of a bundle part's first NaN or inf tensor, or None."""
    for key in ("model", "backbone"):
        if part.get(key) and (bad := first_nonfinite(part[key]["weights"])) is not None:
            return f"{key} weight {bad}"
    return None


def write_bundle(bundle, out_bundle, out_card):
    """Write the bundle atomically (refusing non-finite weights) and its card beside it."""
    for part in [bundle] + bundle.get("members", []):
        if bad := _nonfinite_weight(part):
            raise CaptionflowError(f"{bad} holds NaN or inf: not exporting it; retrain the stage that wrote it")
    with atomic_path(out_bundle) as tmp:
        torch.save(bundle, tmp)
        load_torch_file(tmp, what="bundle", expected="a captionflow bundle", fix=None)  # reads back with weights_only
    write_json(out_card, card(bundle), indent=1)


def export_model(
    checkpoint_path,
    labels_json,
    features,
    manifest,
    metrics_json,
    signature,
    decoding,
    experiment,
    stages,
    config_sha256,
    out_bundle,
    out_card,
    seed=0,
):
    """Stage export_model: bundle an experiment's last checkpoint with all it needs."""
    bundle = model_bundle(checkpoint_path, labels_json, features, manifest, decoding, seed)
    bundle["provenance"] = provenance(experiment, stages, checkpoint_path, metrics_json, signature, config_sha256)
    write_bundle(bundle, out_bundle, out_card)
    b = bundle["backbone"]
    print(
        f"{experiment}: bundle {out_bundle} ({bundle['model']['name']}, stage {stages[-1]}, "
        f"backbone {b['name'] + ' ' + str(b['image_size']) + 'px' if b else 'none (region features)'}, "
        f"{len(bundle['vocabulary']['ix_to_word'])} words)",
        flush=True,
    )


def export_ensemble(member_bundles, metrics_json, decoding, ensemble, config_sha256, out_bundle, out_card):
    """Stage export_model of an ensemble: its members' bundles in one, with its decoding."""
    members = []
    for path in member_bundles:
        member = load_bundle(path)
        if "members" in member:
            raise CaptionflowError(f"bundle {path} is an ensemble itself; ensembles list single experiments")
        members.append({k: v for k, v in member.items() if k != "provenance"})
    bundle = {"format": FORMAT, "version": FORMAT_VERSION, "members": members, "decoding": dict(decoding)}
    bundle["provenance"] = provenance(ensemble, ["ensemble"], None, metrics_json, None, config_sha256)
    bundle["provenance"]["members"] = [str(p) for p in member_bundles]
    write_bundle(bundle, out_bundle, out_card)
    print(f"{ensemble}: ensemble bundle {out_bundle} of {len(members)} members", flush=True)


def bundle_path(path):
    """A bundle file, or the export folder holding bundle.pt."""
    path = Path(path)
    return path / "bundle.pt" if path.is_dir() else path


def load_bundle(path):
    """Read a bundle (weights_only): a damaged file, a foreign one or a newer format is one line."""
    path = bundle_path(path)
    fix = "export it again (snakemake export_model)"
    bundle = load_torch_file(path, what="bundle", expected="a captionflow bundle", fix=fix)
    if not isinstance(bundle, dict) or bundle.get("format") != FORMAT:
        raise CaptionflowError(
            f"bundle {path} is not a captionflow bundle (a checkpoint? give results/<experiment>/export/bundle.pt); {fix}"
        )
    version = bundle.get("version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CaptionflowError(
            f"bundle {path} has format version {version}, and this captionflow reads versions up to {FORMAT_VERSION}: "
            "upgrade captionflow, or export the bundle with this version"
        )
    check_bundle(bundle, path)
    return bundle


def check_bundle(bundle, path):
    """Refuse a bundle whose parts disagree with each other (each member of an ensemble)."""
    for part in bundle.get("members") or [bundle]:
        check_finite(part, path)
        check_vocabulary(part, path)
        check_preprocess(part, path)


def check_finite(part, path):
    """NaN or inf in the weights would give NaN log-probabilities, i.e. garbage captions."""
    if bad := _nonfinite_weight(part):
        raise CaptionflowError(
            f"bundle {path}: {bad} holds NaN or inf, so its captions would be garbage; {EXPORT_AGAIN} from a checkpoint that did not diverge"
        )


def check_vocabulary(part, path):
    """The words must be indices 1..V, as many as the model's embedding and output layer
    have (vocab_size; Captioner's load_checked holds the weights' shapes to it), and hash
    to the vocab_hash recorded at export: another order or other words give wrong captions."""
    vocabulary, model = part["vocabulary"], part["model"]
    words = vocabulary["ix_to_word"]
    if set(words) != {str(i) for i in range(1, len(words) + 1)}:
        raise CaptionflowError(f"bundle {path}: the vocabulary's indices are not 1..{len(words)}; {EXPORT_AGAIN}")
    size = model["args"].get("vocab_size")
    if len(words) != size:
        raise CaptionflowError(
            f"bundle {path}: the vocabulary has {len(words)} words but model {model['name']}'s embedding and output layer "
            f"are of {size} words (and the end token); {EXPORT_AGAIN} from one run's checkpoint and labels"
        )
    if (found := vocab_hash(words)) != vocabulary.get("hash"):
        raise CaptionflowError(
            f"bundle {path}: the vocabulary hashes to {found}, not to the {vocabulary.get('hash')} the model was trained "
            f"with (words reordered or replaced: captions would use the wrong words); {EXPORT_AGAIN}"
        )


def check_preprocess(part, path):
    """The resize mode and feature dtype must be known ones, and the images resized to the
    side the backbone was run on when the features were extracted: another side gives a
    transformer (Swin, ViT) input it was not built for and any backbone another grid."""
    pre, backbone = part["preprocess"], part["backbone"]
    if pre.get("resize_mode") not in RESIZE_MODES:
        raise CaptionflowError(
            f"bundle {path}: preprocessing resize_mode {pre.get('resize_mode')!r} is not one of {', '.join(RESIZE_MODES)}; {EXPORT_AGAIN}"
        )
    dtype = pre.get("feature_dtype", "float32")
    if dtype not in FEATURE_DTYPES:
        raise CaptionflowError(
            f"bundle {path}: preprocessing feature_dtype {dtype!r} is not one of {', '.join(FEATURE_DTYPES)}; {EXPORT_AGAIN}"
        )
    if backbone is not None and pre["size"] != backbone["image_size"]:
        raise CaptionflowError(
            f"bundle {path}: preprocessing resizes images to {pre['size']} px, but backbone {backbone['name']} made the "
            f"model's features from {backbone['image_size']} px images; {EXPORT_AGAIN}"
        )
    if (
        backbone is not None
        and part.get("version", FORMAT_VERSION) >= 2
        and not isinstance(part["features"].get("regions"), int)
    ):
        raise CaptionflowError(
            f"bundle {path}: features.regions (the feature grid the model read) is missing; {EXPORT_AGAIN}"
        )


def fingerprint(part):
    """16 hex digits of sha256 over what an ONNX export of a bundle holds or relies on: the
    model (name, args, blind, weights), the backbone (name, sizes, weights), the feature
    dtype and the vocabulary. Recorded in the export's manifest, so `--onnx` can refuse an
    export of another bundle; re-saving a bundle does not change it."""
    spec = {
        "model": card(part["model"]),
        "backbone": card(part["backbone"]),
        "feature_dtype": part["preprocess"].get("feature_dtype", "float32"),
        "vocabulary": part["vocabulary"]["ix_to_word"],
    }
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode())
    for key in ("model", "backbone"):
        for name, tensor in sorted((part[key] or {}).get("weights", {}).items()):
            digest.update(f"{key}.{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]
