"""ONNX export of a captioner (its encoder and one decoding step) and OnnxCaptioner, the
decoding protocol on onnxruntime, so greedy, beam search and sampling run on it unchanged.

An export folder holds
    encoder.onnx    images (B, 3, H, W) uint8 -> every init_state tensor (backbone and the
                    model's encoder in one graph), or, without a backbone, the features
                    att (B, R, D), fc (B, D)[, att_mask (B, R) bool] -> the same tensors
    decoder.onnx    tokens (B,) int64 + every state tensor -> logprobs (B, V + 1) float32 and
                    every state tensor a step changes (the image_state ones stay as they are
                    and are not copied out again)
    manifest.json   the graphs' input/output names, the state's names and dtypes, which of
                    them are image_state: all OnnxCaptioner needs (no model code, no checkpoint);
                    for an export of a bundle, "bundle": its file and fingerprint, so that
                    `caption --model B --onnx DIR` refuses graphs of another bundle than B
B is dynamic in both graphs (images x beams in the decoder), and so are the number of
regions R of a feature export and the length t of the Transformer-style key/value caches
(B, L, t, d), which is 0 before the first step.

The exporter is torch's TorchScript-based one (torch.onnx.export(dynamo=False)). It traces
one run of each graph: every model's init_state and step are straight-line tensor code
whose Python branches (an optional mask, a max_len check, AoANet's "a row of att_mask is
all False" check) are fixed per export (OnnxCaptioner makes those checks itself), and the
positions a step derives from its cache's length are traced as shape arithmetic, so one
trace serves every batch, region count and cache length, the empty cache included. The
torch.export (dynamo) exporter also exports all five decoder steps, but it refuses AoANet's
encoder with a mask (it cannot guard on the data-dependent check), takes 10-30x longer per
graph, and adds onnxscript to the dependencies.
"""

import copy
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from captionflow.errors import CaptionflowError
from captionflow.models.base import FeatureNorm

FORMAT = "captionflow-onnx"
FORMAT_VERSION = 1
OPSET = 17  # LayerNormalization is one op from opset 17
MANIFEST, ENCODER, DECODER = "manifest.json", "encoder.onnx", "decoder.onnx"
INPUT_DTYPES = {"images": "uint8", "att": "float32", "fc": "float32", "att_mask": "bool"}
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "bool": np.bool_, "uint8": np.uint8}
TORCH_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.int64: "int64", torch.bool: "bool"}


class _EncoderGraph(nn.Module):
    """images, or the features in `inputs` order -> the init_state tensors in `names` order."""

    def __init__(self, model, inputs, encoder=None, half=False):
        super().__init__()
        self.model, self.encoder, self.inputs, self.half = model, encoder, inputs, half
        self.names = ()

    def init_state(self, *inputs):
        if self.encoder is not None:
            att, fc = self.encoder(inputs[0])
            feats = {"att": att, "fc": fc}
        else:
            feats = dict(zip(self.inputs, inputs))
        if self.half:  # inputs (and a backbone) stay float32; the captioner runs in float16
            feats = {k: v.half() if v.is_floating_point() else v for k, v in feats.items()}
        return self.model.init_state(feats)

    def forward(self, *inputs):
        state = self.init_state(*inputs)
        return tuple(state[n] for n in self.names)


class _DecoderGraph(nn.Module):
    """tokens + the state tensors in `names` order -> float32 logprobs + the `updated` ones."""

    def __init__(self, model, names, updated):
        super().__init__()
        self.model, self.names, self.updated = model, names, updated

    def forward(self, tokens, *state):
        logprobs, new = self.model.step(tokens, dict(zip(self.names, state)))
        return (logprobs.float(), *(new[n] for n in self.updated))


def _feature_dim(model):
    # the model's input size: its first FeatureNorm's statistics (every registry model has one)
    norm = next((m for m in model.modules() if isinstance(m, FeatureNorm)), None)
    if norm is None:
        raise CaptionflowError(
            f"model {model.registry_name}: no FeatureNorm to read the feature size from; pass an encoder"
        )
    return norm.mean.shape[0]


def _example_inputs(model, encoder, image_size, masked, regions):
    """Random example inputs of batch 3 (a size no broadcasting rule special-cases)."""
    g = torch.Generator().manual_seed(0)
    if encoder is not None:
        return {"images": torch.randint(0, 256, (3, 3, image_size, image_size), dtype=torch.uint8, generator=g)}
    att = torch.randn(3, regions, _feature_dim(model), generator=g)
    feats = {"att": att, "fc": att.mean(dim=1)}
    if masked:
        feats["att_mask"] = torch.ones(3, regions, dtype=torch.bool)
        feats["att_mask"][0, -2:] = False
    return feats


def _mark_varying(axes, a, b, label):
    """axes[name][dim] = label for every dim whose size differs between states a and b."""
    for name in a:
        for dim, (x, y) in enumerate(zip(a[name].shape, b[name].shape)):
            if x != y:
                axes.setdefault(name, {0: "batch"})[dim] = label


def export_onnx(model, out_dir, encoder=None, image_size=224, masked=False, fp16=False, bundle=None):
    """Write encoder.onnx, decoder.onnx and manifest.json of `model` into out_dir -> Path.

    model: a registry CaptionModel as trained (weights and FeatureNorm statistics).
    encoder: optional nn.Module uint8 images (B, 3, S, S) -> (att (B, R, D), fc (B, D)), e.g.
    Backbone(...).build(); the encoder graph then reads images of S = image_size
    (fixed: adaptive pooling needs static sizes). Without it the graph reads att and fc, and
    att_mask (B, R) bool when `masked` (region features padded to a common box count).
    fp16: the captioner's weights and state in float16 (inputs, backbone and logprobs stay
    float32); refused in one line when onnxruntime's CPU kernels cannot run that graph.
    bundle: {"file", "fingerprint"} of the bundle the model comes from (manifest "bundle").
    """
    out_dir = Path(out_dir)
    name = model.registry_name or type(model).__name__
    model = copy.deepcopy(model).eval()
    if fp16:
        model = model.half()
    if encoder is not None:
        encoder = copy.deepcopy(encoder).float().eval()
    inputs = _example_inputs(model, encoder, image_size, masked, regions=5)
    graph = _EncoderGraph(model, list(inputs), encoder, fp16)

    with torch.no_grad():
        state = graph.init_state(*inputs.values())
        names = list(state)
        updated = [n for n in names if n not in model.image_state]
        axes = {n: {0: "batch"} for n in [*inputs, *names]}
        if encoder is None:  # which dims follow the region count: probe with another one
            other = _example_inputs(model, None, image_size, masked, regions=7)
            _mark_varying(axes, inputs, other, "regions")
            _mark_varying(axes, state, graph.init_state(*other.values()), "regions")
        tokens = torch.zeros(3, dtype=torch.long)
        _, new = model.step(tokens, state)
        missing = [n for n in updated if n not in new]
        if missing:
            raise CaptionflowError(
                f"model {name}: step returns no {', '.join(missing)} of its state; it cannot be exported"
            )
        # two steps: what grows between them is a cache's length, and the decoder is traced
        # at length 2 (not 0 or 1, which the tracer could take for constants)
        first = {**state, **{n: new[n] for n in updated}}
        _, new = model.step(tokens + 1, first)
        second = {**first, **{n: new[n] for n in updated}}
        _mark_varying(axes, first, second, "length")

    graph.names = names
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": name,
        "vocab_size": int(getattr(model, "vocab_size", -1)),
        "dtype": "float16" if fp16 else "float32",
        "opset": OPSET,
        "torch": torch.__version__,
        "onnxruntime": _onnxruntime().__version__,
        "encoder": {
            "file": ENCODER,
            "inputs": list(inputs),
            "outputs": [f"init_{n}" for n in names],
            "image_size": image_size if encoder is not None else None,
        },
        "decoder": {
            "file": DECODER,
            "inputs": ["tokens", *names],
            "outputs": ["logprobs", *(f"new_{n}" for n in updated)],
        },
        "state": {n: TORCH_DTYPES[state[n].dtype] for n in names},
        "image_state": [n for n in names if n not in updated],
        "dynamic_axes": {n: {str(d): label for d, label in axes[n].items()} for n in names},
        # learned positions (ExpansionNet v2): the graph cannot say "too long" itself
        "max_len": getattr(model, "max_len", None),
        "bundle": bundle,
    }
    enc_axes = {n: axes[n] for n in inputs} | {f"init_{n}": axes[n] for n in names}
    dec_axes = {"tokens": {0: "batch"}, "logprobs": {0: "batch"}} | {n: axes[n] for n in names}
    dec_axes |= {f"new_{n}": axes[n] for n in updated}

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as tmp:
        tmp = Path(tmp)
        _export(graph, tuple(inputs.values()), tmp / ENCODER, manifest["encoder"], enc_axes)
        dec_inputs = (tokens, *(second[n] for n in names))
        _export(_DecoderGraph(model, names, updated), dec_inputs, tmp / DECODER, manifest["decoder"], dec_axes)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if fp16:
            _check_fp16_runs(tmp, name, inputs)
        # the old manifest first, the new one last: a folder with a manifest is complete
        (out_dir / MANIFEST).unlink(missing_ok=True)
        for f in (ENCODER, DECODER, MANIFEST):
            os.replace(tmp / f, out_dir / f)
    return out_dir


def _export(module, args, path, names, dynamic_axes):
    with warnings.catch_warnings():
        # TracerWarnings for the Python branches fixed per export, the TorchScript exporter's
        # deprecation notice
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=names["inputs"],
            output_names=names["outputs"],
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            dynamo=False,
        )


def _check_fp16_runs(folder, name, inputs):
    """Load and run a float16 export once on onnxruntime's CPU: refuse it if it cannot."""
    try:
        captioner = OnnxCaptioner(folder)
        state = captioner.init_state(inputs)
        for _ in range(2):
            _, state = captioner.step(torch.zeros(3, dtype=torch.long), state)
    except Exception as exc:
        reason = _first_line(exc)
        raise CaptionflowError(
            f"model {name} cannot run in float16 on onnxruntime's CPU ({reason}); export it in float32"
        ) from None


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise CaptionflowError(
            "ONNX export and inference need the onnx extra: pip install 'captionflow[onnx]'"
        ) from None
    return onnxruntime


def _first_line(exc):
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


class OnnxCaptioner:
    """The decoding protocol (init_state, step, image_state) on an export's onnxruntime sessions.

    init_state(feats) takes {"att" (B, R, D), "fc" (B, D)[, "att_mask" (B, R)]} for a feature
    export, {"images": uint8 (B, 3, S, S)} or the images tensor itself for an images export
    -> state, a dict of CPU torch tensors; step(tokens (B,), state) -> logprobs (B, V + 1)
    float32, state. providers: onnxruntime execution providers (default: the CPU); threads:
    intra-op threads (default and at most: the CPUs this process may run on). bundle:
    {"file", "fingerprint"} of the bundle whose vocabulary and preprocessing will be used
    with these graphs: an export of another one is refused (check_bundle_source).
    """

    def __init__(self, out_dir, providers=None, threads=None, bundle=None):
        ort = _onnxruntime()
        folder = Path(out_dir)
        self.manifest = manifest = _read_manifest(folder)
        if bundle is not None:
            check_bundle_source(manifest, folder, bundle)
        self.registry_name = manifest["model"]
        self.vocab_size = manifest["vocab_size"]
        self.image_state = tuple(manifest["image_state"])
        options = ort.SessionOptions()
        cpus = len(os.sched_getaffinity(0))  # onnxruntime's default counts every core of the machine
        options.intra_op_num_threads = max(1, min(threads or cpus, cpus))
        # the search runs torch ops between steps: onnxruntime's threads spinning on after a
        # step would take those CPUs from them
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = providers or ["CPUExecutionProvider"]
        self._encoder = _session(ort, folder, manifest["encoder"], providers, options)
        self._decoder = _session(ort, folder, manifest["decoder"], providers, options)
        self._state_names = list(manifest["state"])
        self._updated = [n.removeprefix("new_") for n in manifest["decoder"]["outputs"][1:]]
        # the exporter drops inputs a graph never reads (a Transformer's fc): feed the rest
        self._enc_inputs = [i.name for i in self._encoder.get_inputs()]
        self._dec_inputs = [i.name for i in self._decoder.get_inputs()]
        # one key/value cache and its length axis, to hold decoding to max_len (the graph cannot)
        lengths = [
            (n, int(d))
            for n, axes in manifest["dynamic_axes"].items()
            for d, label in axes.items()
            if label == "length"
        ]
        self._cache = lengths[0] if lengths and manifest.get("max_len") else None

    def init_state(self, feats):
        if torch.is_tensor(feats):
            feats = {"images": feats}
        missing = [n for n in self._enc_inputs if n not in feats]
        if missing:
            wanted = ", ".join(self.manifest["encoder"]["inputs"])
            raise CaptionflowError(
                f"ONNX export of {self.registry_name} reads {wanted}; {', '.join(missing)} not given"
            )
        size = self.manifest["encoder"]["image_size"]
        if "images" in self._enc_inputs and tuple(feats["images"].shape[1:]) != (3, size, size):
            raise CaptionflowError(
                f"ONNX export of {self.registry_name} reads images (B, 3, {size}, {size}), got {tuple(feats['images'].shape)}"
            )
        mask = feats.get("att_mask")
        if mask is not None and not mask.bool().any(dim=1).all():  # the traced model's check is not in the graph
            raise CaptionflowError(
                f"ONNX export of {self.registry_name}: an image has no real region (an att_mask row is all False)"
            )
        outputs = self._encoder.run(None, {n: _numpy(feats[n], INPUT_DTYPES[n]) for n in self._enc_inputs})
        return {n: torch.from_numpy(v) for n, v in zip(self._state_names, outputs)}

    def step(self, tokens, state):
        # tokens (B,) -> logprobs (B, V + 1) float32, state with the updated tensors replaced
        if self._cache and state[self._cache[0]].shape[self._cache[1]] >= self.manifest["max_len"]:
            words = state[self._cache[0]].shape[self._cache[1]] + 1
            raise CaptionflowError(
                f"ONNX export of {self.registry_name} has {self.manifest['max_len']} positions (max_len) but was asked "
                f"to decode {words} words; decode fewer words"
            )
        feed = {
            n: _numpy(tokens, "int64") if n == "tokens" else _numpy(state[n], self.manifest["state"][n])
            for n in self._dec_inputs
        }
        logprobs, *new = self._decoder.run(None, feed)
        return torch.from_numpy(logprobs), {**state, **{n: torch.from_numpy(v) for n, v in zip(self._updated, new)}}


def _numpy(tensor, dtype):
    return tensor.detach().cpu().numpy().astype(NUMPY_DTYPES[dtype], copy=False)


def _read_manifest(folder):
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CaptionflowError(
            f"{path} does not exist: {folder} is no ONNX export (write one with export_onnx)"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CaptionflowError(f"{path} is damaged ({type(exc).__name__}); export the model again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CaptionflowError(f"{path} is not a captionflow ONNX manifest; export the model again")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CaptionflowError(
            f"{path} has format version {manifest.get('format_version')!r} but this captionflow reads version "
            f"{FORMAT_VERSION}; export the model again with this captionflow"
        )
    keys = ("model", "vocab_size", "encoder", "decoder", "state", "image_state", "dynamic_axes")
    if any(k not in manifest for k in keys):
        raise CaptionflowError(
            f"{path} lacks {', '.join(k for k in keys if k not in manifest)}; export the model again"
        )
    return manifest


def check_bundle_source(manifest, folder, bundle):
    """The export must record the fingerprint of `bundle` ({"file", "fingerprint"}): graphs
    of another bundle's weights would caption with this one's vocabulary and preprocessing.
    A manifest without one (an older captionflow's, or a model's export) cannot be told
    apart from another bundle's, so it is refused too."""
    again = f"export this bundle again: captionflow export-onnx {bundle['file']} OUT_DIR"
    recorded = manifest.get("bundle")
    if not isinstance(recorded, dict) or "fingerprint" not in recorded:
        raise CaptionflowError(
            f"ONNX folder {folder} records no bundle it was exported from (an older captionflow's export, or a model's), "
            f"so it cannot be checked against bundle {bundle['file']}; {again}"
        )
    if recorded["fingerprint"] != bundle["fingerprint"]:
        raise CaptionflowError(
            f"ONNX folder {folder} was exported from bundle {recorded.get('file')} (fingerprint {recorded['fingerprint']}), "
            f"not from bundle {bundle['file']} (fingerprint {bundle['fingerprint']}); caption with --model {recorded.get('file')}, or {again}"
        )


def _session(ort, folder, graph, providers, options):
    """An InferenceSession of graph["file"], checked against the manifest's names."""
    path = folder / graph["file"]
    if not path.is_file():
        raise CaptionflowError(f"{path} does not exist: the ONNX export is incomplete; export the model again")
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # onnxruntime's own errors (InvalidProtobuf, Fail, NotImplemented)
        raise CaptionflowError(
            f"{path} cannot be loaded by onnxruntime ({_first_line(exc)}); export the model again"
        ) from None
    inputs, outputs = [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]
    if outputs != graph["outputs"] or not set(inputs) <= set(graph["inputs"]):
        raise CaptionflowError(
            f"{path} does not match {folder / MANIFEST} (its inputs/outputs differ); export the model again"
        )
    return session


def export_bundle(bundle, out_dir, fp16=False):
    """`captionflow export-onnx` / rule export_onnx: a bundle's image encoder (backbone,
    feature rounding, model encoder) and decoder step as ONNX graphs in out_dir, with the
    bundle's card (vocabulary, preprocessing, decoding) beside them as bundle.json."""
    from captionflow.deploy.bundle import bundle_path, card, fingerprint
    from captionflow.deploy.captioner import Captioner

    captioner = Captioner(bundle, device="cpu")
    if len(captioner.members) > 1:
        raise CaptionflowError(f"bundle {bundle} is an ensemble: export its members' bundles to ONNX one by one")
    member = captioner.members[0]
    if member.features is None:
        raise CaptionflowError(
            f"bundle {bundle} reads {member.source} region features: there is no image encoder to export"
        )
    source = {"file": str(bundle_path(bundle)), "fingerprint": fingerprint(captioner.bundle)}
    out = export_onnx(
        member.model, out_dir, encoder=member.features, image_size=member.preprocess.size, fp16=fp16, bundle=source
    )
    with open(out / "bundle.json", "w") as f:
        json.dump(card(captioner.bundle), f, indent=1)
    print(
        f"ONNX export of {member.model.registry_name}{' (fp16)' if fp16 else ''}: {out}/encoder.onnx, decoder.onnx",
        flush=True,
    )
    return out
