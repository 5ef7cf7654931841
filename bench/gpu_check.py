"""Check the CUDA paths for correctness, then measure throughput (issue 29): `make gpu-check`.

    python bench/gpu_check.py [--tiny] [--device cuda] [--seconds 10] [--out gpu_check.md]

Checks, one PASS / FAIL / SKIP line each with the measured value and its tolerance:
  1. bf16 and fp16 (GradScaler) XE losses against fp32 (same batch, same init, one step apart)
  2. the AdamW the project picks (fused on CUDA) against torch's single-tensor loop
  3. the backbone forward on channels-last input (extraction's CUDA layout) against contiguous
  4. XE crashed and resumed (the real xe.train) against an uninterrupted run
  5. one DistributedDataParallel step (nccl on CUDA, gloo on the CPU) against the plain model's
  6. caption_batches (reader threads, pinned memory, non_blocking copies) against caption_batch
  7. a torch.compile'd XE forward/backward against eager (bf16, dropout 0)
Then a markdown table: XE steps/s (ExpansionNet v2 and AoANet, fp32 / bf16 / bf16+compile),
SCST steps/s, beam-3 images/s, extraction images/s against the bare backbone forward, and
the feature store's feed rate against the XE steps/s it must feed; peak GPU memory per row.

Paper sizes (presets/, docs/presets.md) on CUDA; without CUDA (or with --tiny) a tiny version
of everything runs as a test of the script itself (fp16 and nccl SKIP, one compile only).
Exit status 1 when any check FAILs.
"""

import argparse
import contextlib
import dataclasses
import io
import json
import math
import random
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from bench_data import bench_resize, make_coco_like  # bench/ is the script's folder

from captionflow.config import build
from captionflow.data.captions import SplitData
from captionflow.data.labels import prepro_labels
from captionflow.data.store import FeatureStore
from captionflow.decoding.search import beam_search
from captionflow.features.backbones import Backbone
from captionflow.features.extract import FeatureConfig, ImageFiles, extract_features, split_images
from captionflow.metrics.cider import write_training_df
from captionflow.models import create_model
from captionflow.training import xe
from captionflow.training.losses import smoothed_nll
from captionflow.training.recipe import clip_gradients, maybe_compile
from captionflow.training.sampler import bucketed_batches
from captionflow.training.self_critical import Reward, SCSTConfig, policy_loss
from captionflow.training.xe import XEConfig
from captionflow.utils.h5 import commit, create_partial, finish, write_rows
from captionflow.utils.precision import Precision, adamw

ROOT = Path(__file__).resolve().parent.parent
T = 16  # caption length of every synthetic XE batch (words + end token; COCO's mean is ~10 words)

# --------------------------------------------------------------------------- results


@dataclasses.dataclass
class Check:
    name: str
    status: str  # PASS | FAIL | SKIP
    detail: str

    def line(self):
        return f"{self.status} {self.name}: {self.detail}"


def within(name, measured, tolerance, what):
    """PASS when `measured` (a finite number) is at most `tolerance`, else FAIL."""
    ok = math.isfinite(measured) and measured <= tolerance
    return Check(name, "PASS" if ok else "FAIL", f"{what} {measured:.3g} (tolerance {tolerance:g})")


def max_abs_diff(a, b):
    """Largest |a - b| over two equal-length sequences of tensors (inf when shapes differ)."""
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        if x.shape != y.shape:
            return math.inf
        worst = max(worst, (x.double() - y.double()).abs().max().item() if x.numel() else 0.0)
    return worst


def rel_diff(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


def exit_status(checks):
    """1 when any check FAILed, else 0 (SKIP is not a failure)."""
    return 1 if any(c.status == "FAIL" for c in checks) else 0


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, seconds, device, warmup=2, min_calls=3):
    """Calls of fn per second over at least `seconds` (after `warmup` calls) and the peak
    GPU memory in MiB of the timed calls (None on the CPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    calls, start = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < seconds:
        fn()
        calls += 1
        if device.type == "cuda" and calls % 4 == 0:
            sync(device)
    sync(device)
    rate = calls / (time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return rate, peak


# --------------------------------------------------------------------------- workloads


def preset(name):
    with open(ROOT / "presets" / f"{name}.yaml") as f:
        return next(iter(yaml.safe_load(f)["experiments"].values()))


def section(cls, values, **overrides):
    """cls built from a preset's section, less its scheduling keys (gpus, ...)."""
    own = {f.name for f in dataclasses.fields(cls)}
    return build(cls, {k: v for k, v in values.items() if k in own}, **overrides)


@dataclasses.dataclass
class Workload:
    """One captioner at one size: its registry name and model_args, the XE and SCST batch,
    the regions, feature width and vocabulary of its synthetic batches."""

    label: str
    model: str
    args: dict
    batch: int  # XE captions per batch
    scst_images: int
    regions: int
    feat_dim: int
    vocab: int
    xe_cfg: XEConfig
    scst_cfg: SCSTConfig
    compiled: object = None  # (model, compiled net) of the compile check, reused by its throughput row

    def create(self, device, vocab=None):
        torch.manual_seed(0)
        return create_model(self.model, vocab_size=vocab or self.vocab, feat_dim=self.feat_dim, **self.args).to(device)

    def feats(self, n, device, seed=0):
        g = torch.Generator().manual_seed(seed)
        att = torch.randn(n, self.regions, self.feat_dim, generator=g)
        return {"att": att.to(device), "fc": att.mean(1).to(device)}

    def xe_batch(self, device, seed=0):
        """(feats, inputs (B, T), targets (B, T), mask (B, T)): one caption length, as SplitData shapes them."""
        g = torch.Generator().manual_seed(seed)
        targets = torch.randint(1, self.vocab + 1, (self.batch, T), generator=g)
        targets[:, -1] = 0
        inputs = torch.cat([torch.zeros(self.batch, 1, dtype=torch.long), targets[:, :-1]], dim=1)
        mask = torch.ones(self.batch, T)
        return self.feats(self.batch, device, seed), inputs.to(device), targets.to(device), mask.to(device)


def workloads(tiny):
    """ExpansionNet v2 and AoANet at the presets' sizes, or tiny. Dropout 0 throughout: the
    compile check needs it, and every throughput row then runs the same network."""
    exp, aoa = preset("expansionnet_v2_coco"), preset("aoanet_coco")
    exp_args = {**exp["model_args"], "dropout": 0.0}
    aoa_args = {**aoa["model_args"], "dropout": 0.0, "attn_dropout": 0.0, "aoa_dropout": 0.0}
    if tiny:
        exp_args.update(embed_size=32, hidden_size=64, n_enc_layers=1, n_dec_layers=1, n_heads=2)
        exp_args.update(enc_expansions=[4, 8], dec_expansions=4, max_len=T + 4)
        aoa_args.update(embed_size=32, hidden_size=32, n_heads=2, refiner_layers=1)
    small = {"epochs": 2} if tiny else {}
    return [
        Workload(
            "ExpansionNet v2",
            "expansionnet_v2",
            exp_args,
            8 if tiny else exp["xe"]["batch_size"],
            4 if tiny else exp["scst"]["batch_size"],
            16 if tiny else 144,  # Swin-L's 12 x 12 grid
            24 if tiny else 1536,
            40 if tiny else 10000,
            section(XEConfig, exp["xe"], **small),
            section(SCSTConfig, exp["scst"]),
        ),
        Workload(
            "AoANet",
            "aoanet",
            aoa_args,
            8 if tiny else aoa["xe"]["batch_size"],
            4 if tiny else aoa["scst"]["batch_size"],
            10 if tiny else 100,  # bottom-up: 10 to 100 boxes; the most
            24 if tiny else 2048,
            40 if tiny else 9500,
            section(XEConfig, aoa["xe"], **small),
            section(SCSTConfig, aoa["scst"]),
        ),
    ]


def xe_step(model, net, batch, precision, optimizer):
    """One XE optimizer step as train_xe takes it -> the loss (a float)."""
    feats, inputs, targets, mask = batch
    optimizer.zero_grad(set_to_none=True)
    with precision.autocast():
        logprobs, aux = net(feats, inputs)
    loss = smoothed_nll(logprobs.float(), targets, mask, 0.0) + model.aux_loss(aux, mask)
    precision.backward(loss)
    precision.unscale(optimizer)
    clip_gradients(model.parameters(), 1e9, "norm", "xe")
    precision.step(optimizer)
    return loss.item()


def xe_loss_and_grads(model, net, batch, precision):
    """The XE loss of one batch and the gradients it gives (no step)."""
    feats, inputs, targets, mask = batch
    model.zero_grad(set_to_none=True)
    with precision.autocast():
        logprobs, aux = net(feats, inputs)
    loss = smoothed_nll(logprobs.float(), targets, mask, 0.0) + model.aux_loss(aux, mask)
    loss.backward()
    return loss.item(), [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


# --------------------------------------------------------------------------- data


def write_features(path, ids, regions, dim, seed):
    """A features HDF5 of random rows through the library's resumable writer (float16, as extraction writes)."""
    rng = np.random.default_rng(seed)
    datasets = {"att": ((len(ids), regions, dim), np.float16), "fc": ((len(ids), dim), np.float16)}
    f = create_partial(path, datasets, ids, {"backbone": "synthetic", "dtype": "float16"})
    for start in range(0, len(ids), 256):
        att = rng.standard_normal((min(256, len(ids) - start), regions, dim), dtype=np.float32)
        write_rows(f, start, {"att": att.astype(np.float16), "fc": att.mean(1).astype(np.float16)})
    commit(f, path, {"fingerprint": "synthetic", "rows_done": len(ids)})
    finish(f, path)


def labels_of(root, skipped, max_len):
    """prepro_labels of root/captions.json into root/labels.h5, labels.json, references.json
    (every word kept, restval into train)."""
    prepro_labels(
        root / "captions.json",
        skipped,
        root / "labels.h5",
        root / "labels.json",
        root / "references.json",
        max_len,
        0,
        True,
    )


def make_caption_data(root, images, val_images, words, regions, dim):
    """Labels (prepro_labels), training df and float16 features of a synthetic captioned
    corpus: `images` training and `val_images` validation images, 5 captions of 7 to 13
    words each drawn from `words` distinct words."""
    rng = random.Random(0)
    records = []
    for i in range(images + val_images):
        sentences = [{"tokens": [f"w{rng.randrange(words)}" for _ in range(rng.randint(7, 13))]} for _ in range(5)]
        split = "train" if i < images else "val"
        records.append({"filepath": "x", "filename": f"{i}.jpg", "imgid": i, "split": split, "sentences": sentences})
    (root / "captions.json").write_text(json.dumps({"images": records}))
    (root / "skipped.tsv").write_text("id\n")
    with contextlib.redirect_stdout(io.StringIO()):
        labels_of(root, root / "skipped.tsv", T - 1)
        write_training_df(root / "labels.h5", root / "labels.json", root / "df.npz")
    index = json.loads((root / "labels.json").read_text())
    for split in ("train", "val"):
        ids = [img["id"] for img in index["images"] if img["split"] == split]
        write_features(root / f"{split}.h5", ids, regions, dim, seed=len(ids))
    return root


# --------------------------------------------------------------------------- checks


def check_precision(w, device):
    """bf16 and fp16 against fp32: the loss of one batch before and after one optimizer
    step (fp16 through the GradScaler: a step it skips for an inf gradient is redone)."""

    def losses(name):
        model = w.create(device)
        precision = Precision(name, device)
        optimizer = adamw(model.parameters(), device, lr=1e-4)
        batch = w.xe_batch(device)
        skipped = 0
        while True:
            scale = precision.scaler.get_scale() if precision.scaler.is_enabled() else None
            first = xe_step(model, model, batch, precision, optimizer)
            if scale is None or precision.scaler.get_scale() >= scale or skipped >= 8:
                break
            skipped += 1  # inf gradient: the scaler lowered its scale and skipped the step
        with torch.no_grad(), precision.autocast():
            logprobs, _ = model(batch[0], batch[1])
        return [first, smoothed_nll(logprobs.float(), batch[2], batch[3], 0.0).item()], skipped

    ref, _ = losses("fp32")
    out = []
    for name, tol in (("bf16", 2e-2), ("fp16", 1e-2)):
        where = f"{name} vs fp32 XE loss ({w.label})"
        if name == "fp16" and device.type != "cuda":
            out.append(Check(where, "SKIP", f"fp16 needs CUDA (Precision refuses it on {device.type})"))
            continue
        got, skipped = losses(name)
        diff = max(rel_diff(g, r) for g, r in zip(got, ref))
        what = f"max relative difference of the losses before/after one step {diff:.3g}"
        check = within(where, diff, tol, "relative difference")
        check.detail = f"{what}: {got[0]:.4f}/{got[1]:.4f} vs {ref[0]:.4f}/{ref[1]:.4f}" + (
            f", {skipped} steps skipped by the scaler" if skipped else ""
        )
        check.detail += f" (tolerance {tol:g})"
        out.append(check)
    return out


def check_adamw(w, device, steps=10):
    """The project's AdamW (adamw(): fused on CUDA) against torch's single-tensor AdamW after `steps` steps."""
    batch = w.xe_batch(device)
    fp32 = Precision("fp32", device)
    params = []
    for make in (
        lambda p: adamw(p, device, lr=1e-3, weight_decay=0.01),
        lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01, fused=False, foreach=False),
    ):
        model = w.create(device)
        optimizer = make(model.parameters())
        for _ in range(steps):
            xe_step(model, model, batch, fp32, optimizer)
        params.append([p.detach() for p in model.parameters()])
    kind = "fused" if device.type == "cuda" else "torch's default (the CPU is not fused)"
    tol = 1e-4 if device.type == "cuda" else 1e-6
    return [
        within(
            f"AdamW {kind} vs single-tensor, {steps} steps ({w.label})",
            max_abs_diff(*params),
            tol,
            "max abs parameter difference",
        )
    ]


def check_channels_last(backbone, device, images):
    """The backbone forward on channels-last input and weights (extraction's CUDA layout,
    features/extract.py) against contiguous, on the same uint8 images."""
    model = backbone.build().to(device).eval()
    with torch.no_grad():
        plain = model(images.to(device))
        model = model.to(memory_format=torch.channels_last)
        last = model(images.to(device).contiguous(memory_format=torch.channels_last))
    scale = max(x.abs().max().item() for x in plain)
    diff = max_abs_diff([x.float() for x in last], [x.float() for x in plain]) / scale
    tol = 1e-2 if device.type == "cuda" else 1e-4  # CUDA: cuDNN picks other kernels (TF32) per layout
    return [within(f"channels-last vs contiguous {backbone.name} forward", diff, tol, "max abs difference / max |x|")]


class _Crash(Exception):
    pass


def check_resume(w, data, device, tmp):
    """The real xe.train, crashed in its second epoch and resumed, against an uninterrupted
    run: equal weights (exactly on the CPU, as the project promises; a tolerance on CUDA)."""
    cfg = dataclasses.replace(
        w.xe_cfg, epochs=2, checkpoint_every=2, checkpoint_minutes=0.0, device=device.type, precision="fp32"
    )
    cfg = dataclasses.replace(cfg, compile=False, patience=2)
    real = xe.smoothed_nll
    n_batches = len(bucketed_batches(SplitData(*data.labels, data.train, "train").lengths, cfg.batch_size, cfg.seed, 0))

    def run(out, crash_at=None):
        calls = {"n": 0}

        def loss(*args):
            calls["n"] += 1
            if calls["n"] == crash_at:
                raise _Crash
            return real(*args)

        xe.smoothed_nll = loss
        try:
            xe.train(
                data.train,
                data.val,
                *data.labels,
                data.references,
                out / "model.pt",
                out / "history.tsv",
                w.model,
                w.args,
                cfg,
            )
        finally:
            xe.smoothed_nll = real
        return torch.load(out / "model.pt", map_location="cpu", weights_only=False)["model"]

    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(io.StringIO()):  # and the progress bars
        reference = run(tmp / "ref")
        try:
            run(tmp / "run", crash_at=n_batches + 3)  # epoch 1, after its first checkpoint
        except _Crash:
            pass
        resumed = run(tmp / "run")
    name = f"XE crash and resume ({w.label}, {device.type})"
    if "resuming from" not in log.getvalue():
        return [Check(name, "FAIL", "the second run did not resume from a checkpoint")]
    diff = max_abs_diff([resumed[k] for k in reference], [reference[k] for k in reference])
    return [within(name, diff, 1e-4 if device.type == "cuda" else 0.0, "max abs weight difference")]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_ddp(w, device):
    """One DistributedDataParallel step (1 process: nccl on CUDA, gloo on the CPU) against
    the plain model's step. distributed.wrap keeps the plain model at world size 1, so DDP
    wraps it here directly."""
    import torch.distributed as dist

    out = []
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type != "cuda":
        out.append(Check("DDP step, nccl", "SKIP", "nccl needs CUDA: gloo checked instead"))
    batch, fp32 = w.xe_batch(device), Precision("fp32", device)
    plain = w.create(device)
    xe_step(plain, plain, batch, fp32, adamw(plain.parameters(), device, lr=1e-3))
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        model = w.create(device)
        ids = [device.index or 0] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        xe_step(model, net, batch, fp32, adamw(model.parameters(), device, lr=1e-3))
    finally:
        dist.destroy_process_group()
    diff = max_abs_diff(list(model.parameters()), list(plain.parameters()))
    tol = 1e-5 if device.type == "cuda" else 0.0
    out.append(within(f"DDP step, {backend}, 1 process ({w.label})", diff, tol, "max abs parameter difference"))
    return out


def check_caption_batches(data, device, batch_size):
    """caption_batches (reader threads; pinned memory and non_blocking copies on CUDA)
    against caption_batch copied to the device: the same tensors."""
    split = SplitData(*data.labels, data.train, "train")
    batches = bucketed_batches(split.lengths, batch_size, 0, 0)
    worst = 0.0
    for items, got in zip(batches, split.caption_batches(batches, device), strict=True):
        feats, *words = split.caption_batch(items)
        want = [feats["att"], feats["fc"], *words]
        have = [got[0]["att"], got[0]["fc"], *got[1:]]
        worst = max(worst, max_abs_diff([x.cpu() for x in have], want))
        worst = max(worst, 0.0 if all(x.device.type == device.type for x in have) else math.inf)
    pinned = "pinned, non_blocking" if device.type == "cuda" else "no pinning on the CPU"
    return [within(f"caption_batches vs caption_batch ({pinned})", worst, 0.0, "max abs difference")]


def check_compile(w, device):
    """One compiled XE forward/backward against eager, both under bf16 autocast with dropout
    0. The loss within 2e-2 relative; the gradients no further from eager bf16's than eager
    bf16's are from fp32's (bf16's own rounding, measured on the same batch): inductor fuses
    and keeps other intermediates in float32. The compiled net is kept for the bf16+compile row."""
    model = w.create(device)
    model.train()
    precision = Precision("bf16", device)
    batch = w.xe_batch(device)
    _, fp32_grads = xe_loss_and_grads(model, model, batch, Precision("fp32", device))
    eager_loss, eager_grads = xe_loss_and_grads(model, model, batch, precision)
    net = maybe_compile(model, True)
    loss, grads = xe_loss_and_grads(model, net, batch, precision)
    w.compiled = (model, net)
    scale = max(g.abs().max().item() for g in eager_grads)
    name = f"compiled vs eager XE, bf16 ({w.label})"
    return [
        within(f"{name}, loss", rel_diff(loss, eager_loss), 2e-2, "relative difference"),
        within(
            f"{name}, gradients (tolerance: eager bf16 vs fp32)",
            max_abs_diff(grads, eager_grads) / scale,
            max_abs_diff(eager_grads, fp32_grads) / scale,
            "max abs difference / max |grad|",
        ),
    ]


# --------------------------------------------------------------------------- throughput


def xe_rows(w, device, seconds, tiny):
    rows = []
    batch = w.xe_batch(device)
    for name in ("fp32", "bf16", "bf16+compile"):
        precision = Precision(name.split("+")[0], device)
        if name.endswith("compile"):
            if w.compiled is not None:
                model, net = w.compiled
            elif tiny:
                rows.append(
                    (f"XE steps/s, {name}", w.label, None, None, "not run in the tiny version: one compile only")
                )
                continue
            else:
                model = w.create(device)
                net = maybe_compile(model, True)
        else:
            model = net = w.create(device)
        model.train()
        optimizer = adamw(model.parameters(), device, lr=1e-4)
        rate, peak = timed(lambda: xe_step(model, net, batch, precision, optimizer), seconds, device)
        rows.append(
            (f"XE steps/s, {name}", w.label, rate, peak, f"batch {w.batch} x {w.regions} x {w.feat_dim}, T {T}")
        )
    return rows


def scst_row(w, data, device, seconds):
    """One SCST step through self_critical's building blocks: sampling, CIDEr-D reward
    (the training references and df of the synthetic corpus), backward, clip, step."""
    split = SplitData(*data.labels, data.train, "train")
    cfg = w.scst_cfg
    reward = Reward(split, data.df, cfg.bleu_weight, device, cfg.eos_mode)
    model = w.create(device, vocab=split.vocab_size)
    model.train()
    precision = Precision("fp32", device)
    optimizer = adamw(model.parameters(), device, lr=1e-5)
    feats = w.feats(w.scst_images, device)
    rows = np.arange(w.scst_images) % len(split.image_ids)
    generator = torch.Generator(device=device).manual_seed(0)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss, _, _ = policy_loss(model, feats, rows, cfg, reward, generator, precision)
        precision.backward(loss)
        precision.unscale(optimizer)
        clip_gradients(model.parameters(), cfg.grad_clip, cfg.grad_clip_mode, "scst")
        precision.step(optimizer)

    rate, peak = timed(step, seconds, device, warmup=1)
    detail = f"{w.scst_images} images x {cfg.samples} samples, {cfg.baseline}, max_len {cfg.max_len}, vocab {split.vocab_size}"
    return [("SCST steps/s, fp32", w.label, rate, peak, detail)]


def beam_rows(w, device, seconds):
    model = w.create(device).eval()
    feats = w.feats(w.batch, device)
    rows = []
    for name in ("fp32", "bf16"):
        precision = Precision(name, device)

        def decode():
            with torch.no_grad(), precision.autocast():
                beam_search(model, feats, 3, T)

        rate, peak = timed(decode, seconds, device, warmup=1)
        rows.append((f"beam-3 images/s, {name}", w.label, rate * w.batch, peak, f"{w.batch} images, max_len {T}"))
    return rows


def extraction_rows(backbone, root, manifest, device, seconds, batch_size, workers):
    """extract_features (DataLoader + forward + HDF5, as the rule runs it) against the bare
    forward on the same images already in memory (bench/bench_data.py's comparison)."""
    cfg = build(FeatureConfig, batch_size=batch_size, num_workers=workers, device=device.type)
    splits, size = split_images(root / "labels.json", manifest)
    files = ImageFiles(splits["train"][1], size)
    images = torch.stack([files[i] for i in range(len(files))])
    model = backbone.build().to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    n = len(images)

    def bare():
        with torch.no_grad():
            for b in range(0, n, batch_size):
                x = images[b : b + batch_size].to(device)
                if device.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                model(x)

    def full():
        out = root / "features.h5"
        out.unlink(missing_ok=True)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            extract_features(root / "labels.json", manifest, {"train": out}, backbone, cfg)

    detail = f"{backbone.name} at {size} px, batch {batch_size}, {n} images"
    bare_rate, bare_peak = timed(bare, seconds, device, warmup=1, min_calls=2)
    full_rate, full_peak = timed(full, seconds, device, warmup=1, min_calls=2)
    return [
        ("extraction images/s, bare forward", backbone.name, bare_rate * n, bare_peak, detail),
        (
            "extraction images/s, extract_features",
            backbone.name,
            full_rate * n,
            full_peak,
            f"{full_rate / bare_rate:.0%} of the bare forward (bench_data.py's goal >= 90%)",
        ),
    ]


def feed_row(data, device, seconds, batch_size, xe_rate):
    """Batches/s the feature store delivers to the device (SplitData.caption_batches over a
    float16 HDF5, streamed) against the XE steps/s it must feed."""
    split = SplitData(*data.labels, data.train, "train")
    split.features = FeatureStore(data.train, split.image_ids, max_memory_mb=0)  # stream: the COCO-size case
    epoch = [0]

    def one_epoch():
        batches = bucketed_batches(split.lengths, batch_size, 0, epoch[0])
        epoch[0] += 1
        for _ in split.caption_batches(batches, device):
            pass
        return len(batches)

    n = one_epoch()
    rate, peak = timed(one_epoch, seconds, device, warmup=0, min_calls=1)
    detail = f"streamed, batch {batch_size}; {rate * n / xe_rate:.1f}x the fastest ExpansionNet v2 XE steps/s"
    return [("feature store batches/s", "SplitData", rate * n, peak, detail)]


# --------------------------------------------------------------------------- main


@dataclasses.dataclass
class Data:
    """The files make_caption_data writes under `root`."""

    root: Path

    @property
    def labels(self):
        return self.root / "labels.h5", self.root / "labels.json"

    @property
    def train(self):
        return self.root / "train.h5"

    @property
    def val(self):
        return self.root / "val.h5"

    @property
    def references(self):
        return self.root / "references.json"

    @property
    def df(self):
        return self.root / "df.npz"


def run_check(checks, fn, *args):
    """Run one check; an exception is its FAIL line, so the other checks still run."""
    name = fn.__name__.removeprefix("check_")
    try:
        result = fn(*args)
    except Exception as exc:  # noqa: BLE001 - reported as the check's FAIL
        result = [Check(name, "FAIL", f"raised {type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}")]
    for check in result:
        print(check.line(), flush=True)
    checks.extend(result)


def table(rows, device):
    gpu = device.type == "cuda"
    lines = ["| row | model | value | peak GPU MiB | notes |", "| --- | --- | ---: | ---: | --- |"]
    for what, model, value, peak, note in rows:
        v = "-" if value is None else f"{value:.2f}"
        p = "-" if not gpu or peak is None else f"{peak:.0f}"
        lines.append(f"| {what} | {model} | {v} | {p} | {note} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="the tiny version (default: when CUDA is absent)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seconds", type=float, default=10.0, help="timed seconds per throughput row")
    p.add_argument("--out", type=Path, help="also write the check lines and the table here (markdown)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    tiny = args.tiny or device.type != "cuda"
    start = time.perf_counter()
    work = workloads(tiny)
    exp = work[0]
    backbone = (
        Backbone("resnet18", "none", 0, 64, 0)
        if tiny
        else Backbone("swin_large_patch4_window12_384", "none", 0, 384, 0)
    )
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU"
    print(f"gpu_check on {device} ({gpu}), {'tiny' if tiny else 'paper sizes'}, torch {torch.__version__}", flush=True)

    checks, rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = 20 if tiny else 1000
        (tmp / "captions").mkdir()
        words = 40 if tiny else 10000
        data = Data(make_caption_data(tmp / "captions", images, 6 if tiny else 50, words, exp.regions, exp.feat_dim))
        n_images = 16 if tiny else 256
        make_coco_like(tmp / "images", n_images)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            _, resized = bench_resize(tmp / "images", backbone.image_size, 1 if tiny else 8)
            labels_of(tmp / "images", resized / "skipped.tsv", 16)
        manifest = resized / "manifest.json"
        files = ImageFiles(split_images(tmp / "images" / "labels.json", manifest)[0]["train"][1], backbone.image_size)
        sample_images = torch.stack([files[i] for i in range(4)])

        run_check(checks, check_precision, exp, device)
        run_check(checks, check_adamw, exp, device)
        run_check(checks, check_channels_last, backbone, device, sample_images)
        run_check(checks, check_resume, exp, data, device, tmp / "resume")
        run_check(checks, check_ddp, exp, device)
        run_check(checks, check_caption_batches, data, device, exp.batch)
        run_check(checks, check_compile, exp, device)

        for w in work:
            rows += xe_rows(w, device, args.seconds, tiny)
        for w in work:
            rows += scst_row(w, data, device, args.seconds)
        for w in work:
            rows += beam_rows(w, device, args.seconds)
        rows += extraction_rows(
            backbone, tmp / "images", manifest, device, args.seconds, 8 if tiny else 32, 0 if tiny else 8
        )
        fastest = max(r[2] for r in rows if r[1] == exp.label and r[0].startswith("XE") and r[2] is not None)
        rows += feed_row(data, device, args.seconds, exp.batch, fastest)

    text = table(rows, device)
    print("\n" + text, flush=True)
    status = exit_status(checks)
    secs = time.perf_counter() - start
    summary = f"{sum(c.status == 'FAIL' for c in checks)} FAIL, {len(checks)} checks, {secs:.0f} s"
    print(summary, flush=True)
    if args.out:
        head = f"# GPU check: {device} ({gpu}), {'tiny' if tiny else 'paper sizes'}, torch {torch.__version__}\n\n"
        body = "\n".join(f"- {c.line()}" for c in checks)
        args.out.write_text(f"{head}{body}\n\n{text}\n\n{summary}\n")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
