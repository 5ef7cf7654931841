"""Stage train_scst: self-critical sequence training (Rennie et al. 2017) from the checkpoint
of the stage before it (finetune_e2e when the experiment runs it, otherwise train_xe).

Per image, K captions are sampled and rewarded with CIDEr-D against the training
references, minus a baseline (captionflow.training.self_critical, shared with
train_scst_e2e). Resumable exactly, like train_xe (captionflow.training.loop).
"""

import json
from dataclasses import asdict

import torch

from captionflow.data.captions import SplitData, read_labels_json
from captionflow.evaluation.split_captions import greedy_cider_d
from captionflow.models import checkpoint
from captionflow.training import distributed
from captionflow.training.loop import TrainingRun, fingerprint, nonfinite_hint
from captionflow.training.recipe import maybe_compile_decoding, set_dropout, step_groups
from captionflow.training.sampler import image_batches
from captionflow.training.schedule import LRSchedule, ScheduleConfig
from captionflow.training.self_critical import (  # noqa: F401 - SCSTConfig: the stage's settings
    HISTORY,
    Reward,
    SCSTConfig,
    check_settings,
    optimizer_step,
    policy_loss,
    reward_signature,
)
from captionflow.utils.device import resolve_device
from captionflow.utils.io import file_stamp, write_text
from captionflow.utils.precision import Precision, make_optimizer
from captionflow.utils.threads import use_threads


def train(
    features_train,
    features_val,
    labels_h5,
    labels_json,
    references,
    cider_df,
    init_checkpoint,
    out_checkpoint,
    out_history,
    out_signature,
    cfg,
    threads=1,
):
    """Fine-tune `init_checkpoint` (XE or e2e) with SCST; write the best checkpoint, history and reward signature.

    Under torchrun (`distributed.launch`) each rank samples and rewards its share of every
    batch of images; gradients are averaged over the ranks."""
    device = distributed.device_for(resolve_device(cfg.device))
    if device.type == "cpu":
        threads //= distributed.world_size()  # the job's CPUs are shared by its processes
    use_threads(threads)
    check_settings(cfg, "scst")
    index = read_labels_json(labels_json)
    model, init = checkpoint.load_model(init_checkpoint, index["vocab_hash"])
    model.to(device)
    blind = init.get("blind", False)
    train_data = SplitData(labels_h5, labels_json, features_train, "train", blind)
    val_data = SplitData(labels_h5, labels_json, features_val, "val", blind)
    for path, data in ((features_train, train_data), (features_val, val_data)):
        checkpoint.check_feature_dim(
            init,
            init_checkpoint,
            data.features.feat_dim,
            f"features {path}",
            "train SCST on the features its XE stage was trained on (the same features.backbone), or retrain XE",
        )
    with open(references) as f:
        val_refs = json.load(f)["val"]

    reward = Reward(train_data, cider_df, cfg.bleu_weight, device, cfg.eos_mode)
    signature = reward_signature(cfg, cider_df, reward.df, index["vocab_hash"], index["max_len"])
    if distributed.is_main():
        print(signature, flush=True)

    torch.manual_seed(cfg.seed)  # dropout
    precision = Precision(cfg.precision, device, "scst.precision")
    set_dropout(model, cfg.dropout)  # the checkpoint keeps model_args; meta["scst"] records this
    optimizer = make_optimizer(model.parameters(), device, cfg, "scst")
    n_batches = len(image_batches(len(train_data.features), cfg.batch_size, cfg.seed, 0))
    n_steps = -(-n_batches // cfg.accumulate)  # optimizer steps per epoch
    schedule = LRSchedule(optimizer, ScheduleConfig.of(cfg, "scst"), total_steps=cfg.epochs * n_steps)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 2)
    record = {
        "model_name": init["model_name"],
        "model_args": init["model_args"],
        "xe": init.get("xe"),
        "scst": asdict(cfg),
        "blind": blind,
    }
    key = fingerprint(
        record, file_stamp(init_checkpoint), file_stamp(cider_df), file_stamp(features_train), file_stamp(features_val)
    )
    meta = {**record, "vocab_hash": index["vocab_hash"], "stage": "scst", "reward_signature": signature}
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
        "train_scst",
        history_columns=HISTORY,
        hint=nonfinite_hint("scst", cfg, f"features with extreme values ({features_train})"),
        checkpoint_minutes=cfg.checkpoint_minutes,
        scaler=precision.scaler,
    )

    policy = maybe_compile_decoding(model, cfg.compile)  # sampling's steps; `model` is saved and validated
    while run.running():
        batches = image_batches(len(train_data.features), cfg.batch_size, cfg.seed, run.epoch)
        for group in run.remaining(step_groups(batches, cfg.accumulate)):  # one optimizer step each

            def loss_of(rows):
                rows = distributed.shard(rows)
                feats = {k: v.to(device) for k, v in train_data.features.get(rows).items()}
                model.train()
                return policy_loss(model, feats, rows, cfg, reward, gen, precision, policy)

            # sampling bypasses forward(), so no DDP wrapper: the ranks average gradients once a step
            optimizer_step(
                run,
                group,
                loss_of,
                model,
                optimizer,
                schedule,
                precision,
                cfg,
                "scst",
                lambda: distributed.average_gradients(model),
            )
        with precision.autocast():
            score = run.validate(lambda: greedy_cider_d(model, val_data, val_refs, device, cfg.max_len))
        schedule.after_epoch(score)
        run.end_epoch(score)
    if distributed.is_main():
        write_text(out_signature, signature + "\n")
    run.finish()
