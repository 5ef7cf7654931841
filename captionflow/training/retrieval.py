"""Stage train_retrieval: an image-text retrieval model (GNA-RNN or the dual encoder) trained
with binary cross-entropy on matched (caption, image) pairs and `neg_time` non-matching
images per caption: random ones, or with `hard_negatives` the highest-scoring non-matching
image of the batch. Adam or SGD, gradient clipping, step learning-rate decay; the best
checkpoint by validation text-to-image R@1; resumable exactly and preemptible like every
training stage (captionflow.training.loop). Trains on the frozen features of the feature
files; end-to-end backbone fine-tuning is not built yet.
"""

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch.nn import functional as F

from captionflow.data.captions import SplitData
from captionflow.errors import CaptionflowError
from captionflow.metrics.retrieval import both_directions
from captionflow.models.retrieval import create_retrieval_model
from captionflow.training import checkpoint
from captionflow.training.loop import TrainingRun, file_id, fingerprint
from captionflow.utils.device import resolve_device
from captionflow.utils.state import load_checked
from captionflow.utils.threads import use_threads

HISTORY = ["epoch", "step", "train_loss", "val_r1", "lr"]


@dataclass(frozen=True)
class RetrievalConfig:
    """Settings of train_retrieval (an experiment's `retrieval` section)."""

    model: str = "gna_rnn"
    model_args: tuple = ()  # (key, value) pairs
    epochs: int = 10
    batch_size: int = 64  # captions per batch
    neg_time: int = 3  # non-matching images per matched pair
    hard_negatives: bool = False
    optimizer: str = "adam"
    lr: float = 1e-3
    lr_decay: float = 0.5
    lr_decay_every: int = 5  # epochs
    grad_clip: float = 5.0
    patience: int = 5
    checkpoint_every: int = 50
    seed: int = 0
    device: str = "auto"


class _StepDecay:
    """lr x lr_decay every lr_decay_every epochs, with a state for exact resume."""

    def __init__(self, optimizer, cfg):
        self.scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_decay_every, gamma=cfg.lr_decay)

    def state_dict(self):
        return self.scheduler.state_dict()

    def load_state_dict(self, state):
        self.scheduler.load_state_dict(state)


def caption_tensors(data, items):
    """Caption items of a split -> tokens (N, T), lengths (N,), image rows (N,)."""
    lengths = torch.from_numpy(data.lengths[items].astype(np.int64))
    tokens = data.labels[torch.from_numpy(data.caption_rows[items])][:, : int(lengths.max())]
    return tokens, lengths, data.caption_image[items]


@torch.no_grad()
def score_split(model, data, device, batch=256):
    """Every caption of a split against every image -> logits (captions, images), the
    captions' image rows."""
    model.eval()
    images = model.encode_image(data.features.get(range(len(data.features)))["fc"].to(device))
    texts, rows = [], []
    for b in range(0, len(data.caption_rows), batch):
        tokens, lengths, image_rows = caption_tensors(data, np.arange(b, min(b + batch, len(data.caption_rows))))
        texts.append(model.encode_text(tokens.to(device), lengths.to(device)))
        rows.append(torch.from_numpy(np.asarray(image_rows)))
    return model.pair_logits(torch.cat(texts), images).cpu(), torch.cat(rows)


def load_retrieval(path):
    ckpt = checkpoint.load(path)
    if ckpt.get("stage") != "retrieval":
        raise CaptionflowError(f"checkpoint {path} is not a retrieval model's (stage {ckpt.get('stage')!r}); give results/<experiment>/retrieval/model.pt")
    model = create_retrieval_model(ckpt["model_name"], **ckpt["model_args"])
    load_checked(model, ckpt["model"], path, f"retrieval model {ckpt['model_name']}")
    return model.eval(), ckpt


def train(features_train, features_val, labels_h5, labels_json, out_checkpoint, out_history, cfg, blind=False, threads=1):
    """Train a retrieval model; keep the best by val text-to-image R@1."""
    use_threads(threads)
    device = resolve_device(cfg.device)
    if cfg.optimizer not in ("adam", "sgd"):
        raise CaptionflowError(f"retrieval.optimizer {cfg.optimizer!r} is not one of adam, sgd")
    train_data = SplitData(labels_h5, labels_json, features_train, "train", blind)
    val_data = SplitData(labels_h5, labels_json, features_val, "val", blind)
    args = {**dict(cfg.model_args), "vocab_size": train_data.vocab_size, "feat_dim": train_data.features.feat_dim}
    torch.manual_seed(cfg.seed)
    model = create_retrieval_model(cfg.model, **args)
    model.fc_norm.fit(train_data.features.get(range(len(train_data.features)))["fc"])
    model.to(device)
    params = model.parameters()
    optimizer = torch.optim.Adam(params, lr=cfg.lr) if cfg.optimizer == "adam" else torch.optim.SGD(params, lr=cfg.lr, momentum=0.9)
    schedule = _StepDecay(optimizer, cfg)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    record = {"model_name": cfg.model, "model_args": args, "retrieval": asdict(cfg), "blind": blind}
    key = fingerprint(record, train_data.vocab_hash, file_id(features_train), file_id(features_val))
    meta = {**record, "vocab_hash": train_data.vocab_hash, "stage": "retrieval"}
    run = TrainingRun(
        out_checkpoint, out_history, key, meta, model, optimizer, schedule, gen, cfg.epochs, cfg.patience, cfg.checkpoint_every,
        "train_retrieval", hint=f"retrieval.lr = {cfg.lr:g} too high", history_columns=HISTORY,
    )  # fmt: skip
    n_items, n_images = len(train_data.caption_rows), len(train_data.features)
    all_fc = train_data.features.get(range(n_images))["fc"].to(device)
    while run.running():
        order = torch.randperm(n_items, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + run.epoch)).numpy()
        batches = [order[b : b + cfg.batch_size] for b in range(0, n_items, cfg.batch_size)]
        for items in run.remaining(batches):
            model.train()
            tokens, lengths, rows = caption_tensors(train_data, items)
            rows = torch.as_tensor(np.asarray(rows))
            texts = model.encode_text(tokens.to(device), lengths.to(device))
            images = model.encode_image(all_fc)
            if cfg.hard_negatives:  # the highest-scoring non-matching images of all
                logits = model.pair_logits(texts, images).masked_fill(F.one_hot(rows, n_images).bool().to(device), -math.inf)
                negatives = logits.topk(cfg.neg_time, dim=1).indices.cpu()
            else:  # random other images (shifted off the caption's own)
                negatives = torch.randint(n_images - 1, (len(items), cfg.neg_time), generator=gen)
                negatives = negatives + (negatives >= rows[:, None]).long()
            pos = (texts * images[rows.to(device)]).sum(dim=1) + model.bias
            neg = (texts[:, None] * images[negatives.to(device)]).sum(dim=2) + model.bias
            loss = F.binary_cross_entropy_with_logits(torch.cat([pos, neg.flatten()]), torch.cat([torch.ones_like(pos), torch.zeros(neg.numel(), device=device)]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            run.check_finite(loss.item(), grad_norm.item())
            optimizer.step()
            run.step_done(loss.item())
        schedule.scheduler.step()
        scores, text_rows = score_split(model, val_data, device)
        r1 = both_directions(scores, text_rows, torch.arange(len(val_data.features)), ks=(1,))["text_to_image"]["R@1"] / 100
        run.end_epoch(r1, extra={"val_r1": round(r1, 6)})
    run.finish()
