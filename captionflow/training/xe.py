"""Stage train_xe: cross-entropy training with teacher forcing.

Label smoothing, scheduled sampling (Bengio et al. 2015: an inverse-sigmoid schedule per step,
or AoANet's linear steps per epoch), AdamW / Adam / RAdam / SGD, gradient clipping by norm or
value, gradient accumulation, warmup then cosine, plateau, step or multistep learning rate,
a dropout override, length-bucketed batches, greedy validation scored with CIDEr-D every
epoch, best checkpoint, early stopping (docs/recipes.md).

Resumable exactly (captionflow.training.loop): a killed run continues from its last
checkpoint and ends with the same weights as an uninterrupted one on the CPU.
"""

import json
import math
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch

from captionflow.data.captions import SplitData
from captionflow.errors import CaptionflowError
from captionflow.evaluation.split_captions import greedy_cider_d
from captionflow.models import create_model
from captionflow.training import distributed
from captionflow.training.loop import TrainingRun, fingerprint, nonfinite_hint
from captionflow.training.losses import smoothed_nll
from captionflow.training.recipe import (
    RecipeSettings,
    clip_gradients,
    maybe_compile,
    no_sync_unless_last,
    set_dropout,
    step_groups,
)
from captionflow.training.sampler import bucketed_batches
from captionflow.training.schedule import LRSchedule, ScheduleConfig
from captionflow.utils.device import resolve_device
from captionflow.utils.io import file_stamp  # a regenerated input starts training over
from captionflow.utils.precision import Precision, make_optimizer
from captionflow.utils.threads import use_threads


@dataclass(frozen=True)
class XEConfig(RecipeSettings):
    """Settings of train_xe: an experiment's `xe` config section (no defaults here:
    captionflow.config.build fills them from the schema)."""

    SECTION: ClassVar[str] = "xe"

    epochs: int
    batch_size: int
    ss_schedule: str  # inverse_sigmoid (per step, ss_k) | linear_step (per epoch, AoANet)
    ss_start: int  # linear_step: epoch the probability counts from
    ss_every: int  # linear_step: epochs between increases
    ss_increase: float  # linear_step: probability added per increase
    label_smoothing: float
    ss_k: float  # inverse-sigmoid scheduled sampling constant in steps; 0 = off
    ss_max: float  # cap on the probability of feeding the model's own word
    patience: int  # early stopping: epochs without a better val CIDEr-D
    checkpoint_every: int  # optimizer steps between resumable states; 0: by time only
    checkpoint_minutes: float  # minutes of training between resumable states; 0: by steps only
    bucket_factor: int
    max_len: int  # validation decoding
    precision: str  # fp32 | bf16 | fp16 (captionflow.utils.precision)
    seed: int
    device: str


def scheduled_sampling_prob(step, k, cap):
    """1 - k / (k + exp(step / k)): the chance of feeding the model's own word."""
    if k <= 0:
        return 0.0
    return min(cap, 1.0 - k / (k + math.exp(min(step / k, 50.0))))


def linear_step_prob(epoch, start, every, increase, cap):
    """AoANet's schedule, set at the start of each epoch (0-based): 0 up to epoch `start`,
    then increase x floor((epoch - start) / every), at most cap."""
    if epoch <= start:
        return 0.0
    return min(increase * ((epoch - start) // every), cap)


SS_SCHEDULES = ("inverse_sigmoid", "linear_step")


def ss_prob_of(cfg, step, epoch):
    """The chance of feeding the model's own word at optimizer step `step` of epoch `epoch`."""
    if cfg.ss_schedule == "inverse_sigmoid":
        return scheduled_sampling_prob(step, cfg.ss_k, cfg.ss_max)
    if cfg.ss_schedule == "linear_step":
        return linear_step_prob(epoch, cfg.ss_start, cfg.ss_every, cfg.ss_increase, cfg.ss_max)
    raise CaptionflowError(f"xe.ss_schedule {cfg.ss_schedule!r} is not one of {', '.join(SS_SCHEDULES)}")


def train(
    features_train,
    features_val,
    labels_h5,
    labels_json,
    references,
    out_checkpoint,
    out_history,
    model_name,
    model_args,
    cfg,
    blind=False,
    threads=1,
):
    """Train `model_name` with cross-entropy; write the best checkpoint and the history TSV.

    Under torchrun (`distributed.launch`) each rank trains on its share of every batch."""
    device = distributed.device_for(resolve_device(cfg.device))
    if device.type == "cpu":
        threads //= distributed.world_size()  # the job's CPUs are shared by its processes
    use_threads(threads)
    precision = Precision(cfg.precision, device, "xe.precision")
    train_data = SplitData(labels_h5, labels_json, features_train, "train", blind)
    val_data = SplitData(labels_h5, labels_json, features_val, "val", blind)
    if val_data.features.feat_dim != train_data.features.feat_dim:
        raise CaptionflowError(
            f"features {features_val} are {val_data.features.feat_dim}-d but {features_train} are "
            f"{train_data.features.feat_dim}-d; extract both with the same features.backbone"
        )
    with open(references) as f:
        val_refs = json.load(f)["val"]
    full_args = {**model_args, "vocab_size": train_data.vocab_size, "feat_dim": train_data.features.feat_dim}

    torch.manual_seed(cfg.seed)
    model = create_model(model_name, **full_args)
    set_dropout(model, cfg.dropout)  # the checkpoint keeps model_args; meta["xe"] records this
    if distributed.is_main():
        print(
            f"{model_name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters {full_args}", flush=True
        )
    model.fit_feature_norms(train_data.features.get(range(train_data.features.fit_rows())))
    model.to(device)
    net = distributed.wrap(model)  # DDP when several processes: gradients averaged over ranks
    net = maybe_compile(net, cfg.compile)  # the training forward only: `model` is saved and validated
    optimizer = make_optimizer(model.parameters(), device, cfg, "xe")
    n_batches = len(bucketed_batches(train_data.lengths, cfg.batch_size, cfg.seed, 0, cfg.bucket_factor))
    n_steps = -(-n_batches // cfg.accumulate)  # optimizer steps per epoch
    schedule = LRSchedule(optimizer, ScheduleConfig.of(cfg, "xe"), total_steps=cfg.epochs * n_steps)
    ss_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)

    record = {"model_name": model_name, "model_args": full_args, "xe": asdict(cfg), "blind": blind}
    key = fingerprint(record, train_data.vocab_hash, file_stamp(features_train), file_stamp(features_val))
    meta = {**record, "vocab_hash": train_data.vocab_hash, "stage": "xe"}
    run = TrainingRun(
        out_checkpoint,
        out_history,
        key,
        meta,
        model,
        optimizer,
        schedule,
        ss_gen,
        cfg.epochs,
        cfg.patience,
        cfg.checkpoint_every,
        "train_xe",
        hint=nonfinite_hint("xe", cfg, f"features with extreme values ({features_train})"),
        checkpoint_minutes=cfg.checkpoint_minutes,
        scaler=precision.scaler,
    )
    while run.running():
        model.train()
        batches = bucketed_batches(train_data.lengths, cfg.batch_size, cfg.seed, run.epoch, cfg.bucket_factor)
        groups = list(run.remaining(step_groups(batches, cfg.accumulate)))  # one optimizer step each
        shards = (distributed.shard(batch) for group in groups for batch in group)
        read = iter(train_data.caption_batches(shards, device))  # read ahead, fp16 until the device
        for group in groups:
            optimizer.zero_grad(set_to_none=True)
            ss_prob = ss_prob_of(cfg, run.step, run.epoch)
            loss_value = 0.0
            for i in range(len(group)):
                feats, inputs, targets, mask = next(read)
                with no_sync_unless_last(net, i == len(group) - 1):  # DDP averages at the last one
                    with precision.autocast():
                        logprobs, aux = net(feats, inputs, ss_prob, ss_gen)  # = model.teacher_forcing
                    loss = smoothed_nll(logprobs.float(), targets, mask, cfg.label_smoothing)
                    loss = (loss + model.aux_loss(aux, mask)) / len(group)  # the step's: mean over its batches
                    precision.backward(loss)
                loss_value += loss.item()
            precision.unscale(optimizer)
            grad_norm = clip_gradients(model.parameters(), cfg.grad_clip, cfg.grad_clip_mode, "xe")
            run.check_finite(
                loss_value, precision.checked_grad_norm(grad_norm.item())
            )  # before the step: no NaN weights
            precision.step(optimizer)
            schedule.after_step(run.step + 1)
            run.step_done(loss_value)
        with precision.autocast():
            score = run.validate(lambda: greedy_cider_d(model, val_data, val_refs, device, cfg.max_len))
        schedule.after_epoch(score)
        run.end_epoch(score)
    run.finish()
