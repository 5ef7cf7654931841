"""Stage train_scst_e2e: self-critical training with the backbone unfrozen, from the resized
images: ExpansionNet v2's optional last phase, after [xe, e2e, scst].

Starts from the SCST checkpoint and the backbone finetune_e2e fine-tuned (the one whose
regenerated features SCST trained on). The policy gradient is train_scst's
(captionflow.training.self_critical); the image side is computed by the backbone from the
images for every batch, like finetune_e2e, with its own learning rates (`lr` for the
captioner, `backbone_lr` for the backbone, much lower), its first `freeze_stages` stages
and its BatchNorm statistics frozen. No augmentation: the reward scores the caption of
the image as it is. Validation computes the val features from the images with the current
backbone. Outputs: the captioner checkpoint, the fine-tuned backbone (which
regenerate_features turns into this stage's test features) and the reward signature.
Resumable exactly and preemptible like every regime (captionflow.training.loop).
"""

import json
from dataclasses import asdict, dataclass, replace
from typing import ClassVar

import torch

from captionflow.data.captions import SplitData, read_labels_json
from captionflow.features.extract import images_of
from captionflow.models import checkpoint
from captionflow.training.from_images import end_to_end_images, end_to_end_model, end_to_end_optimizer, val_cider_d
from captionflow.training.loop import TrainingRun, fingerprint, nonfinite_hint
from captionflow.training.recipe import maybe_compile, maybe_compile_decoding, set_dropout, step_groups
from captionflow.training.sampler import image_batches
from captionflow.training.schedule import LRSchedule, ScheduleConfig
from captionflow.training.self_critical import (
    HISTORY,
    Reward,
    SCSTConfig,
    check_settings,
    optimizer_step,
    policy_loss,
    reward_signature,
)
from captionflow.utils.device import resolve_device
from captionflow.utils.io import atomic_path, file_stamp, write_text
from captionflow.utils.precision import Precision
from captionflow.utils.threads import use_threads


@dataclass(frozen=True)
class SCSTE2EConfig(SCSTConfig):
    """Settings of train_scst_e2e: the experiment's `scst` section with its `scst_e2e`
    section on top (epochs, batch_size, lr, backbone_lr, freeze_stages, ...)."""

    SECTION: ClassVar[str] = "scst_e2e"

    backbone_lr: float
    freeze_stages: int


def train(
    labels_h5,
    labels_json,
    references,
    cider_df,
    manifest,
    init_checkpoint,
    init_backbone,
    out_checkpoint,
    out_backbone,
    out_history,
    out_signature,
    backbone,
    cfg,
    threads=1,
):
    """SCST of `init_checkpoint` (the SCST stage's) with `init_backbone` (finetune_e2e's)
    unfrozen; write the best checkpoint, its backbone, the history and the reward signature.

    backbone: the Backbone of the features (extraction's); its network is built with
    `init_backbone`'s weights."""
    device = resolve_device(cfg.device)
    use_threads(threads)
    check_settings(cfg, "scst_e2e")
    precision = Precision(cfg.precision, device, "scst_e2e.precision")
    index = read_labels_json(labels_json)
    backbone = replace(backbone, weights=str(init_backbone))
    splits, files = end_to_end_images(backbone, labels_json, manifest)
    model, init = end_to_end_model(
        backbone,
        init_checkpoint,
        index["vocab_hash"],
        cfg,
        device,
        "end-to-end SCST",
        "fine-tune the backbone whose features the SCST stage was trained on",
    )
    features, captioner = model.features, model.captioner
    # the training forward through torch.compile; checkpoints and validation use the plain modules
    train_features, policy = maybe_compile(features, cfg.compile), maybe_compile_decoding(captioner, cfg.compile)

    train_data = SplitData(labels_h5, labels_json, None, "train")  # references only: images come from files
    with open(references) as f:
        val_refs = json.load(f)["val"]
    reward = Reward(train_data, cider_df, cfg.bleu_weight, device, cfg.eos_mode)
    signature = (
        reward_signature(cfg, cider_df, reward.df, index["vocab_hash"], index["max_len"])
        + "; end to end (backbone unfrozen)"
    )
    print(signature, flush=True)

    set_dropout(captioner, cfg.dropout)  # the checkpoint keeps model_args; meta["scst_e2e"] records this
    optimizer = end_to_end_optimizer(model, cfg, device, "scst_e2e")
    n_images = len(files["train"])
    n_steps = -(-len(image_batches(n_images, cfg.batch_size, cfg.seed, 0)) // cfg.accumulate)
    schedule = LRSchedule(optimizer, ScheduleConfig.of(cfg, "scst_e2e"), total_steps=cfg.epochs * n_steps)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 4)
    record = {
        "model_name": init["model_name"],
        "model_args": init["model_args"],
        "xe": init.get("xe"),
        "scst_e2e": asdict(cfg),
        "blind": False,
    }
    record["backbone"] = asdict(backbone)
    key = fingerprint(
        record,
        file_stamp(init_checkpoint),
        file_stamp(init_backbone),
        file_stamp(cider_df),
        file_stamp(manifest),
        file_stamp(labels_h5),
    )
    meta = {**record, "vocab_hash": index["vocab_hash"], "stage": "scst_e2e", "reward_signature": signature}
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
        "train_scst_e2e",
        history_columns=HISTORY,
        export=lambda m: {"model": m.captioner.state_dict(), "backbone": m.features.backbone.state_dict()},
        hint=nonfinite_hint("scst_e2e", cfg, f"the backbone {init_backbone}"),
        checkpoint_minutes=cfg.checkpoint_minutes,
        scaler=precision.scaler,
    )

    while run.running():
        batches = image_batches(n_images, cfg.batch_size, cfg.seed, run.epoch)
        for group in run.remaining(step_groups(batches, cfg.accumulate)):  # one optimizer step each

            def loss_of(rows):
                model.train()
                with precision.autocast():
                    att, fc = train_features(images_of(files["train"], rows).to(device))
                return policy_loss(
                    captioner, {"att": att.float(), "fc": fc.float()}, rows, cfg, reward, gen, precision, policy
                )

            optimizer_step(run, group, loss_of, model, optimizer, schedule, precision, cfg, "scst_e2e")
        with precision.autocast():
            score = run.validate(
                lambda: val_cider_d(
                    model, files["val"], splits["val"][0], index["ix_to_word"], val_refs, device, cfg.max_len
                )
            )
        schedule.after_epoch(score)
        run.end_epoch(score)
    write_text(out_signature, signature + "\n")
    best = checkpoint.load(run.best)
    with atomic_path(out_backbone) as tmp:
        torch.save(best["backbone"], tmp)
    run.finish()
