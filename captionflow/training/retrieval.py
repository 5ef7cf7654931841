"""Stage train_retrieval: an image-text retrieval model (GNA-RNN or the dual encoder) trained
with binary cross-entropy on matched (caption, image) pairs and `neg_time` non-matching
images per caption: random ones, or with `hard_negatives` the highest-scoring non-matching
images of all. Adam (its `betas`) or SGD, gradient clipping by norm or by value, step
learning-rate decay (`lr_decay` 1: none), an optional stop when the loss explodes
(`loss_explode`, GNA-RNN's train.lua's); the best
checkpoint by validation text-to-image R@1; resumable exactly and preemptible like every
training stage (captionflow.training.loop).

Person search (a caption file with `person_id`s, e.g. CUHK-PEDES): an image of the
caption's own person is never drawn as its negative, and validation counts every image of
the person as a match.

End to end (GNA-RNN's CNN fine-tuning): with `finetune_backbone_after` N >= 0 the first N
steps train on the frozen features of the feature files, and from step N on the image
side is computed from the resized images by the backbone that extracted them (same code
path as extract_features), which trains at its own `backbone_lr`, its first
`freeze_stages` stages and its BatchNorm statistics frozen. Each step runs the backbone on
the batch's distinct positive and negative images only; hard negatives are still mined on
the frozen features (the whole gallery through the backbone every step would cost an
extraction per step). The checkpoint then carries the backbone, and evaluation computes
the gallery's features from the images with it
(captionflow.evaluation.retrieval.gallery_fc). With `augment` each such step reads one
random square crop of the batch's resized images, as GNA-RNN's training does (validation,
evaluation and the frozen-feature steps read whole images).
"""

import math
from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from captionflow.data.captions import SplitData
from captionflow.errors import CaptionflowError
from captionflow.evaluation.retrieval import caption_tensors, person_ids, score_split
from captionflow.features.backbones import freeze_batchnorm_statistics, freeze_leading_stages
from captionflow.features.extract import ImageFiles, backbone_images, image_features
from captionflow.metrics.retrieval import both_directions
from captionflow.models.retrieval import create_retrieval_model
from captionflow.training.loop import TrainingRun, fingerprint
from captionflow.utils.device import resolve_device
from captionflow.utils.io import file_stamp  # a regenerated input starts training over
from captionflow.utils.threads import use_threads

HISTORY = ["epoch", "step", "train_loss", "val_r1", "lr"]


@dataclass(frozen=True)
class RetrievalConfig:
    """Settings of train_retrieval: an experiment's `retrieval` config section (no defaults
    here: captionflow.config.build fills them from the schema)."""

    SECTION: ClassVar[str] = "retrieval"

    model: str
    model_args: dict  # constructor options of the model
    epochs: int
    batch_size: int  # captions per batch
    neg_time: int  # non-matching images per matched pair
    hard_negatives: bool
    optimizer: str
    lr: float
    lr_decay: float
    lr_decay_every: int  # epochs
    grad_clip: float
    patience: int
    checkpoint_every: int  # optimizer steps between resumable states; 0: by time only
    checkpoint_minutes: float  # minutes of training between resumable states; 0: by steps only
    seed: int
    device: str
    finetune_backbone_after: int  # steps on frozen features before the backbone trains; -1: never
    backbone_lr: float
    freeze_stages: int  # leading backbone stages kept frozen when fine-tuning
    betas: list  # Adam's (beta1, beta2), both parameter groups
    grad_clip_mode: str  # norm: clip the gradient norm of everything trained; value: clamp the model's elements
    augment: int  # side of the random crop (pixels) of the backbone's training images; 0: off
    loss_explode: float  # stop when a step's loss exceeds this x the first loss; 0: off


class _StepDecay:
    """lr x lr_decay every lr_decay_every epochs, with a state for exact resume."""

    def __init__(self, optimizer, cfg):
        self.scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_decay_every, gamma=cfg.lr_decay)

    def state_dict(self):
        return self.scheduler.state_dict()

    def load_state_dict(self, state):
        self.scheduler.load_state_dict(state)


class ImageSide(nn.Module):
    """Resized images (B, 3, S, S) uint8 -> the backbone's pooled feature fc (B, D), by the
    extraction code path (GridFeatures `grid`); BatchNorm statistics stay frozen in training."""

    def __init__(self, grid):
        super().__init__()
        self.grid = grid

    def forward(self, images):
        return self.grid(images)[1]

    def train(self, mode=True):
        super().train(mode)
        freeze_batchnorm_statistics(self)
        return self


class EndToEndRetrieval(nn.Module):
    """What train_retrieval trains end to end: the retrieval model and the image side."""

    def __init__(self, model, image_side):
        super().__init__()
        self.model = model
        self.image_side = image_side


def _export_end_to_end(m):
    """What an end-to-end retrieval checkpoint holds: the model and the backbone."""
    return {"model": m.model.state_dict(), "backbone": m.image_side.grid.backbone.state_dict()}


def random_crop(images, side, gen):
    """(B, 3, S, S) -> (B, 3, side, side): one random window for the whole batch, its corner
    uniform on 0 .. S - side - 1 in each axis (GNA-RNN's training crop: net_utils.prepro draws
    one offset per batch with torch.random(S - side), 1-based; no flips)."""
    room = images.shape[-1] - side
    top, left = (int(v) for v in torch.randint(0, room, (2,), generator=gen))
    return images[..., top : top + side, left : left + side]


def _exploded(cfg, run, loss):
    """Stop at a loss above loss_explode x the run's first loss (GNA-RNN's train.lua quits when
    the loss exceeds 20 x the first iteration's): one line, before the optimizer step, nothing written."""
    first = run.progress.setdefault("first_loss", loss)  # in the state: a resumed run keeps it
    if cfg.loss_explode and loss > cfg.loss_explode * first:
        run.stop(
            f"the loss {loss:.4g} exceeds retrieval.loss_explode = {cfg.loss_explode:g} x the first loss {first:.4g}",
            f"lower retrieval.lr (now {cfg.lr:g}) or raise retrieval.loss_explode (0: off), then rerun",
        )


def _negatives(cfg, logits_fn, ids, rows, gen):
    """(N, neg_time) image rows not of the captions' persons: random ones, or the
    highest-scoring by logits_fn() (N, M) with hard_negatives."""
    same = ids[rows][:, None] == ids[None, :]  # (N, M): images of the caption's own person
    if cfg.hard_negatives:
        with torch.no_grad():
            return logits_fn().cpu().masked_fill(same, -math.inf).topk(cfg.neg_time, dim=1).indices
    return torch.multinomial((~same).float(), cfg.neg_time, replacement=True, generator=gen)


def train(
    features_train,
    features_val,
    labels_h5,
    labels_json,
    out_checkpoint,
    out_history,
    cfg,
    blind=False,
    threads=1,
    manifest=None,
    backbone=None,
):
    """Train a retrieval model; keep the best by val text-to-image R@1.

    End to end (cfg.finetune_backbone_after >= 0) also needs the resize `manifest` and the
    `backbone` (a Backbone) that extracted the feature files, so that fine-tuning starts
    from the very network the features came from."""
    use_threads(threads)
    device = resolve_device(cfg.device)
    if cfg.optimizer not in ("adam", "sgd"):
        raise CaptionflowError(f"retrieval.optimizer {cfg.optimizer!r} is not one of adam, sgd")
    end_to_end = cfg.finetune_backbone_after >= 0
    if cfg.augment and end_to_end and cfg.augment >= backbone.image_size:
        raise CaptionflowError(
            f"retrieval.augment = {cfg.augment} crops {backbone.image_size}-px images (resize.size): set it below {backbone.image_size}, or 0"
        )
    if end_to_end and blind:
        raise CaptionflowError(
            "retrieval.finetune_backbone_after: an image-blind experiment has no image to fine-tune the backbone on; set it to -1"
        )
    train_data = SplitData(labels_h5, labels_json, features_train, "train", blind)
    val_data = SplitData(labels_h5, labels_json, features_val, "val", blind)
    ids = person_ids(train_data)
    if len(set(ids.tolist())) < 2:
        raise CaptionflowError(
            f"the train split of {labels_json} has one person only: retrieval needs non-matching images to learn from"
        )
    args = {**dict(cfg.model_args), "vocab_size": train_data.vocab_size, "feat_dim": train_data.features.feat_dim}
    torch.manual_seed(cfg.seed)
    model = create_retrieval_model(cfg.model, **args)
    all_fc = train_data.features.pooled()  # (images, D): read once, for the norms and every step
    model.fc_norm.fit(all_fc)
    record = {
        "model_name": cfg.model,
        "model_args": args,
        "retrieval": asdict(cfg),
        "blind": blind,
        **model.CHECKPOINT_TAG,
    }
    inputs = [train_data.vocab_hash, file_stamp(features_train), file_stamp(features_val)]
    groups = [{"params": list(model.parameters()), "lr": cfg.lr}]
    trained, export = model, None
    if end_to_end:
        splits = backbone_images(backbone, labels_json, manifest)
        files = {s: ImageFiles(splits[s][1], backbone.image_size) for s in ("train", "val")}
        image_side = ImageSide(backbone.build())
        if image_side.grid.backbone.out_dim != args["feat_dim"]:
            raise CaptionflowError(
                f"backbone {backbone.name} gives {image_side.grid.backbone.out_dim}-d features but {features_train} holds {args['feat_dim']}-d ones: fine-tune the backbone that extracted them"
            )
        freeze_leading_stages(image_side.grid.backbone, cfg.freeze_stages)
        trained = EndToEndRetrieval(model, image_side)
        groups.append({"params": [p for p in image_side.parameters() if p.requires_grad], "lr": cfg.backbone_lr})
        record["backbone_spec"] = asdict(backbone)
        inputs.append(file_stamp(manifest))

        export = _export_end_to_end

    trained.to(device)
    if cfg.optimizer == "adam":
        optimizer = torch.optim.Adam(groups, betas=tuple(cfg.betas))
    else:
        optimizer = torch.optim.SGD(groups, momentum=0.9)
    schedule = _StepDecay(optimizer, cfg)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    meta = {**record, "vocab_hash": train_data.vocab_hash, "stage": "retrieval"}
    run = TrainingRun(
        out_checkpoint,
        out_history,
        fingerprint(record, *inputs),
        meta,
        trained,
        optimizer,
        schedule,
        gen,
        cfg.epochs,
        cfg.patience,
        cfg.checkpoint_every,
        "train_retrieval",
        export=export,
        hint=f"retrieval.lr = {cfg.lr:g} too high",
        history_columns=HISTORY,
        score_name="val text-to-image R@1",
        checkpoint_minutes=cfg.checkpoint_minutes,
    )
    n_items = len(train_data.caption_rows)
    all_fc, frozen_val_fc = all_fc.to(device), val_data.features.pooled()
    val_ids = person_ids(val_data)
    while run.running():
        order = torch.randperm(
            n_items, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + run.epoch)
        ).numpy()
        batches = [order[b : b + cfg.batch_size] for b in range(0, n_items, cfg.batch_size)]
        for items in run.remaining(batches):
            trained.train()
            tokens, lengths, rows = caption_tensors(train_data, items)
            rows = torch.as_tensor(np.asarray(rows))
            tokens, lengths = tokens.to(device), lengths.to(device)
            negatives = _negatives(cfg, lambda: model.score_gallery(tokens, lengths, all_fc), ids, rows, gen)
            pairs = torch.cat([rows[:, None], negatives], dim=1)  # (N, 1 + neg_time): positive, negatives
            if end_to_end and run.step >= cfg.finetune_backbone_after:  # the image side from the images
                needed, where = torch.unique(pairs, return_inverse=True)
                batch = torch.stack([files["train"][int(i)] for i in needed])
                if cfg.augment:  # its own stream, from the seed and step: resume stays exact
                    batch = random_crop(
                        batch, cfg.augment, torch.Generator().manual_seed(cfg.seed * 1_000_003 + run.step)
                    )
                fc = image_side(batch.to(device))
                logits = model.score_pairs(tokens, lengths, fc, where.to(device))
            else:
                logits = model.score_pairs(tokens, lengths, all_fc, pairs.to(device))
            pos, neg = logits[:, 0], logits[:, 1:]
            loss = F.binary_cross_entropy_with_logits(
                torch.cat([pos, neg.flatten()]),
                torch.cat([torch.ones_like(pos), torch.zeros(neg.numel(), device=device)]),
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip_mode == "value":  # GNA-RNN's grad_params:clamp (its CNN's are not clipped)
                grad_norm = torch.nn.utils.clip_grad_norm_(trained.parameters(), math.inf)  # measured only
                torch.nn.utils.clip_grad_value_(model.parameters(), cfg.grad_clip)
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(trained.parameters(), cfg.grad_clip)
            run.check_finite(loss.item(), grad_norm.item())
            _exploded(cfg, run, loss.item())
            optimizer.step()
            run.step_done(loss.item())
        schedule.scheduler.step()
        val_fc = (
            image_features(image_side.grid, files["val"], device)["fc"]
            if end_to_end and run.step > cfg.finetune_backbone_after
            else frozen_val_fc
        )
        scores, text_rows = score_split(model, val_data, device, fc=val_fc)
        r1 = both_directions(scores, val_ids[text_rows], val_ids, ks=(1,))["text_to_image"]["R@1"] / 100
        run.end_epoch(r1, extra={"val_r1": round(r1, 6)})
    run.finish()
