"""Stage finetune_e2e: backbone and captioner trained jointly from the resized images.

Starts from the XE checkpoint and the backbone weights used for feature extraction
(ExpansionNet v2's second phase). The backbone gets its own, much lower learning rate and
its first stages can stay frozen; BatchNorm statistics stay frozen (small batches).
Augmentation is light and never contradicts a caption: a few pixels of shift and a little
brightness, no horizontal flip ("to the left of" would become a lie) and no hue change
("red" must stay red). Gradient accumulation; bf16/fp16 autocast on CUDA; XE loss.

Outputs: the fine-tuned backbone (a state dict that `features.weights` / the
regenerate_features stage loads) and the captioner checkpoint. Resumable exactly, and
preemption-safe, like every regime (captionflow.training.loop).
"""

import json
from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np
import torch
from torch.nn import functional as F

from captionflow.data.captions import SplitData, read_labels_json
from captionflow.errors import CaptionflowError
from captionflow.features.extract import images_of
from captionflow.models import checkpoint
from captionflow.training.from_images import end_to_end_images, end_to_end_model, end_to_end_optimizer, val_cider_d
from captionflow.training.loop import TrainingRun, fingerprint, nonfinite_hint
from captionflow.training.losses import smoothed_nll
from captionflow.training.recipe import RecipeSettings, clip_gradients, maybe_compile, set_dropout, step_groups
from captionflow.training.sampler import image_batches
from captionflow.training.schedule import LRSchedule, ScheduleConfig
from captionflow.utils.device import resolve_device
from captionflow.utils.io import atomic_path, file_stamp
from captionflow.utils.precision import DTYPES, Precision
from captionflow.utils.threads import use_threads


@dataclass(frozen=True)
class E2EConfig(RecipeSettings):
    """Settings of finetune_e2e: an experiment's `e2e` config section (no defaults here:
    captionflow.config.build fills them from the schema)."""

    SECTION: ClassVar[str] = "e2e"

    epochs: int
    batch_size: int  # images per batch; each brings all its captions
    backbone_lr: float
    freeze_stages: int  # leading backbone stages kept frozen (ResNet: stem, layer1, ...)
    label_smoothing: float
    augment: bool
    precision: str  # fp32 | bf16 | fp16 on CUDA (captionflow.utils.precision); the CPU trains in fp32
    patience: int
    checkpoint_every: int  # optimizer steps between resumable states; 0: by time only
    checkpoint_minutes: float  # minutes of training between resumable states; 0: by steps only
    max_len: int
    seed: int
    device: str


def augment(images, generator):
    """Light, caption-preserving augmentation of uint8 images (B, 3, S, S) -> float (B, 3, S, S)."""
    x = images.float()
    b, _, s, _ = x.shape
    pad = max(1, s // 32)  # a few pixels of shift
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dx, dy = torch.randint(0, 2 * pad + 1, (2, b), generator=generator).tolist()
    x = torch.stack([padded[i, :, dy[i] : dy[i] + s, dx[i] : dx[i] + s] for i in range(b)])
    brightness = 1 + (torch.rand(b, 1, 1, 1, generator=generator) - 0.5) * 0.2  # +-10 %
    return (x * brightness).clamp(0, 255)


def train(
    labels_h5,
    labels_json,
    references,
    manifest,
    init_checkpoint,
    out_checkpoint,
    out_backbone,
    out_history,
    backbone,
    cfg,
    threads=1,
):
    """Fine-tune backbone + captioner from the XE checkpoint; write both and the history.

    backbone: the Backbone that extracted the features XE trained on; fine-tuning starts
    from the very network it builds (same weights, same random init and seed)."""
    use_threads(threads)
    device = resolve_device(cfg.device)
    if cfg.precision not in DTYPES:  # checked on the CPU too, which trains in float32 whatever it says
        raise CaptionflowError(f"e2e.precision {cfg.precision!r} is not one of {', '.join(DTYPES)}")
    precision = Precision(cfg.precision if device.type == "cuda" else "fp32", device, "e2e.precision")
    index = read_labels_json(labels_json)
    splits, files = end_to_end_images(backbone, labels_json, manifest)
    model, init = end_to_end_model(
        backbone,
        init_checkpoint,
        index["vocab_hash"],
        cfg,
        device,
        "end-to-end fine-tuning",
        "fine-tune the backbone whose features the XE stage was trained on, or retrain XE",
    )
    features, captioner = model.features, model.captioner
    # the training forward through torch.compile; checkpoints and validation use the plain modules
    train_features, train_captioner = maybe_compile(features, cfg.compile), maybe_compile(captioner, cfg.compile)

    # Caption rows come from SplitData (labels of the train split, in labels-JSON order);
    # the images from the resize manifest, in the same order, decoded batch by batch.
    train_data = SplitData(labels_h5, labels_json, None, "train")
    captions_of = {}
    for item, row in enumerate(train_data.caption_image):
        captions_of.setdefault(int(row), []).append(item)
    with open(references) as f:
        val_refs = json.load(f)["val"]

    set_dropout(captioner, cfg.dropout)  # the checkpoint keeps model_args; meta["e2e"] records this
    optimizer = end_to_end_optimizer(model, cfg, device, "e2e")
    n_images = len(files["train"])
    steps = cfg.epochs * -(-len(image_batches(n_images, cfg.batch_size, cfg.seed, 0)) // cfg.accumulate)
    schedule = LRSchedule(optimizer, ScheduleConfig.of(cfg, "e2e"), total_steps=steps)
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    record = {
        "model_name": init["model_name"],
        "model_args": init["model_args"],
        "xe": init.get("xe"),
        "e2e": asdict(cfg),
        "blind": False,
    }
    record["backbone"] = asdict(backbone)
    key = fingerprint(record, file_stamp(init_checkpoint), file_stamp(manifest), file_stamp(labels_h5))
    meta = {**record, "vocab_hash": index["vocab_hash"], "stage": "e2e"}
    run = TrainingRun(
        out_checkpoint,
        out_history,
        key,
        meta,
        model,
        optimizer,
        schedule,
        gen,
        cfg.epochs,
        cfg.patience,
        cfg.checkpoint_every,
        "finetune_e2e",
        export=lambda m: {"model": m.captioner.state_dict(), "backbone": m.features.backbone.state_dict()},
        hint=nonfinite_hint(
            "e2e", cfg, f"backbone weights {backbone.weights} that give extreme features (features.weights)"
        ),
        checkpoint_minutes=cfg.checkpoint_minutes,
        scaler=precision.scaler,
    )

    def val_score():
        return val_cider_d(model, files["val"], splits["val"][0], index["ix_to_word"], val_refs, device, cfg.max_len)

    while run.running():
        model.train()
        batches = image_batches(n_images, cfg.batch_size, cfg.seed, run.epoch)
        for group in run.remaining(step_groups(batches, cfg.accumulate)):  # one optimizer step each
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for rows in group:
                items = np.concatenate([captions_of[r] for r in rows])
                _, inputs, targets, mask = train_data.caption_batch(items)
                batch = images_of(files["train"], rows)
                x = augment(batch, gen) if cfg.augment else batch.float()
                per_image = torch.as_tensor([len(captions_of[r]) for r in rows])
                with precision.autocast():
                    att, fc = train_features(x.to(device))
                    feats = {
                        "att": att.float().repeat_interleave(per_image.to(device), 0),
                        "fc": fc.float().repeat_interleave(per_image.to(device), 0),
                    }
                    logprobs, aux = train_captioner(feats, inputs.to(device))  # = teacher_forcing
                mask = mask.to(device)
                loss = (
                    smoothed_nll(logprobs.float(), targets.to(device), mask, cfg.label_smoothing)
                    + captioner.aux_loss(aux, mask)
                ) / len(group)
                precision.backward(loss)
                total += loss.item()
            precision.unscale(optimizer)
            grad_norm = clip_gradients(model.parameters(), cfg.grad_clip, cfg.grad_clip_mode, "e2e")
            run.check_finite(total, precision.checked_grad_norm(grad_norm.item()))
            precision.step(optimizer)
            schedule.after_step(run.step + 1)
            run.step_done(total)
        score = val_score()
        schedule.after_epoch(score)
        run.end_epoch(score)
    best = checkpoint.load(run.best)
    with atomic_path(out_backbone) as tmp:
        torch.save(best["backbone"], tmp)
    run.finish()
