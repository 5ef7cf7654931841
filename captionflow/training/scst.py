"""Stage train_scst: self-critical sequence training (Rennie et al. 2017) from the checkpoint
of the stage before it (finetune_e2e when the experiment runs it, otherwise train_xe).

Per image, K captions are sampled; each is rewarded with CIDEr-D against the training
references, using document frequencies of the training corpus (a DAG input, see
captionflow.metrics.cider), optionally mixed with BLEU-4. The baseline is the greedy
caption's reward (Rennie et al.) or the mean reward of the other K - 1 samples (as
ExpansionNet v2 and "new SCST" use). Loss: -(reward - baseline) * log p(caption).
Resumable exactly, like train_xe (captionflow.training.loop).
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from pycocoevalcap.bleu.bleu_scorer import BleuScorer

from captionflow.data.captions import SplitData, read_index
from captionflow.errors import CaptionflowError
from captionflow.decoding.search import greedy, sample, until_end
from captionflow.metrics.cider import CiderD, DocumentFrequencies
from captionflow.training import checkpoint
from captionflow.training import distributed
from captionflow.training.loop import HISTORY_COLUMNS, TrainingRun, file_id, fingerprint, nonfinite_hint
from captionflow.training.sampler import image_batches
from captionflow.training.validation import caption_split, cider_d
from captionflow.training.schedule import LRSchedule, ScheduleConfig
from captionflow.utils.device import resolve_device
from captionflow.utils.io import write_text
from captionflow.utils.threads import use_threads

BASELINES = ("greedy", "mean_of_others")
# + the epoch's mean sampled-caption reward and mean baseline (the report's SCST curves)
HISTORY = [*HISTORY_COLUMNS, "reward", "baseline"]


@dataclass(frozen=True)
class SCSTConfig:
    """Settings of train_scst (an experiment's `scst` config section); defaults = the schema's."""

    epochs: int = 5
    batch_size: int = 25  # images per batch (x samples captions)
    samples: int = 5  # K sampled captions per image
    temperature: float = 1.0
    baseline: str = "mean_of_others"  # greedy | mean_of_others
    bleu_weight: float = 0.0  # reward = (1 - w) * CIDEr-D + w * BLEU-4
    max_len: int = 16
    lr: float = 5e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 1.0  # 1.0: constant learning rate after warmup
    plateau_factor: float = 0.5
    plateau_patience: int = 1
    grad_clip: float = 2.0
    patience: int = 3
    checkpoint_every: int = 20
    seed: int = 0
    device: str = "auto"


def reward_signature(cfg, df_path, df, vocab_hash, max_length):
    """One line that says whether two SCST numbers are comparable."""
    mix = f"{1 - cfg.bleu_weight:g} x CIDEr-D + {cfg.bleu_weight:g} x BLEU-4" if cfg.bleu_weight else "CIDEr-D"
    return (
        f"reward={mix}; cider: n=4 sigma=6 clipped x10, df=training corpus ({df.num_docs} images, {Path(df_path).name}); "
        f"baseline={cfg.baseline}; samples={cfg.samples}; temperature={cfg.temperature:g}; max_len={cfg.max_len}; "
        f"tokens=labels vocabulary {vocab_hash} (UNK, truncated at {max_length})"
    )


def _bleu4(refs, keys, hyps):
    """Sentence BLEU-4 of each hypothesis (pycocoevalcap's scorer) -> (N,)."""
    scores = []
    for key, hyp in zip(keys, hyps):
        scorer = BleuScorer(n=4)
        scorer += (" ".join(map(str, hyp)), [" ".join(map(str, r)) for r in refs[key]])
        scores.append(scorer.compute_score(option="closest", verbose=0)[0][3])
    return np.asarray(scores)


def train(features_train, features_val, labels_h5, labels_json, references, cider_df, init_checkpoint, out_checkpoint, out_history, out_signature, cfg, threads=1):
    """Fine-tune `init_checkpoint` (XE or e2e) with SCST; write the best checkpoint, history and reward signature.

    Under torchrun (`distributed.launch`) each rank samples and rewards its share of every
    batch of images; gradients are averaged over the ranks."""
    device = distributed.device_for(resolve_device(cfg.device))
    if device.type == "cpu":
        threads //= distributed.world_size()  # the job's CPUs are shared by its processes
    use_threads(threads)
    if cfg.baseline not in BASELINES:
        raise CaptionflowError(f"scst.baseline {cfg.baseline!r} is not one of {', '.join(BASELINES)}")
    if cfg.baseline == "mean_of_others" and cfg.samples < 2:
        raise CaptionflowError("scst.baseline mean_of_others needs scst.samples >= 2")
    index = read_index(labels_json)
    model, init = checkpoint.load_model(init_checkpoint, index["vocab_hash"])
    model.to(device)
    blind = init.get("blind", False)
    train_data = SplitData(labels_h5, labels_json, features_train, "train", blind)
    val_data = SplitData(labels_h5, labels_json, features_val, "val", blind)
    for path, data in ((features_train, train_data), (features_val, val_data)):
        checkpoint.check_feature_dim(
            init, init_checkpoint, data.features.feat_dim, f"features {path}",
            "train SCST on the features its XE stage was trained on (the same features.backbone), or retrain XE",
        )  # fmt: skip
    with open(references) as f:
        val_refs = json.load(f)["val"]

    # Training references as token ids, cooked once: feature row -> list of captions.
    refs = {}
    for item, row in enumerate(train_data.caption_image):
        words = train_data.labels[train_data.caption_rows[item]].tolist()
        refs.setdefault(int(row), []).append(words[: words.index(0)] if 0 in words else words)
    df = DocumentFrequencies.load(cider_df)
    cider = CiderD(refs, df=df)
    signature = reward_signature(cfg, cider_df, df, index["vocab_hash"], index["max_length"])
    if distributed.is_main():
        print(signature, flush=True)

    torch.manual_seed(cfg.seed)  # dropout
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n_batches = len(image_batches(len(train_data.features), cfg.batch_size, cfg.seed, 0))
    schedule = LRSchedule(optimizer, ScheduleConfig.of(cfg, "scst"), total_steps=cfg.epochs * n_batches)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 2)
    record = {"model_name": init["model_name"], "model_args": init["model_args"], "xe": init.get("xe"), "scst": asdict(cfg), "blind": blind}
    key = fingerprint(record, file_id(init_checkpoint), file_id(cider_df), file_id(features_train), file_id(features_val))
    meta = {**record, "vocab_hash": index["vocab_hash"], "stage": "scst", "reward_signature": signature}
    run = TrainingRun(
        out_checkpoint, out_history, key, meta, model, optimizer, schedule, gen, cfg.epochs, cfg.patience, cfg.checkpoint_every, "train_scst",
        history_columns=HISTORY,
        hint=nonfinite_hint("scst", cfg, f"features with extreme values ({features_train})"),
    )  # fmt: skip

    def reward(keys, seqs):
        hyps = until_end(seqs.cpu())
        r = cider.score(keys, hyps)
        if cfg.bleu_weight:
            r = (1 - cfg.bleu_weight) * r + cfg.bleu_weight * _bleu4(refs, keys, hyps)
        return torch.as_tensor(r, dtype=torch.float32, device=device)

    K = cfg.samples
    while run.running():
        for rows in run.remaining(image_batches(len(train_data.features), cfg.batch_size, cfg.seed, run.epoch)):
            rows = distributed.shard(rows)
            feats = {k: v.to(device) for k, v in train_data.features.get(rows).items()}
            model.train()
            seqs, token_lp = sample(model, feats, n=K, max_len=cfg.max_len, temperature=cfg.temperature, generator=gen, track_grad=True)
            rewards = reward(np.repeat(rows, K), seqs).view(-1, K)  # (B, K)
            if cfg.baseline == "greedy":
                model.eval()
                greedy_seqs, _ = greedy(model, feats, cfg.max_len)
                model.train()
                baseline = reward(np.asarray(rows), greedy_seqs)[:, None]
            else:
                baseline = (rewards.sum(dim=1, keepdim=True) - rewards) / (K - 1)
            advantage = (rewards - baseline).view(-1)
            loss = -(advantage * token_lp.sum(dim=1)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            distributed.average_gradients(model)  # sampling bypasses forward(), so no DDP wrapper
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            loss_value = loss.item()
            run.check_finite(loss_value, grad_norm.item())  # before the step: no NaN weights
            optimizer.step()
            schedule.after_step(run.step + 1)
            mean_reward, mean_baseline = rewards.mean().item(), baseline.mean().item()
            if run.writer:
                run.writer.add_scalar("train/reward", mean_reward, run.step + 1)
                run.writer.add_scalar("train/baseline", mean_baseline, run.step + 1)
            run.step_done(loss_value, {"reward": mean_reward, "baseline": mean_baseline})
        score = run.validate(lambda: cider_d(val_refs, caption_split(model, val_data.features.get, val_data.image_ids, val_data.ix_to_word, device, method="greedy", max_len=cfg.max_len)))
        schedule.after_epoch(score)
        run.end_epoch(score)
    if distributed.is_main():
        write_text(out_signature, signature + "\n")
    run.finish()
