"""The self-critical policy gradient that train_scst and train_scst_e2e share (Rennie et al.
2017): K sampled captions per image, each rewarded with CIDEr-D against the training
references (document frequencies of the training corpus, captionflow.metrics.cider),
optionally mixed with BLEU-4, minus a baseline: the greedy caption's reward (Rennie et al.)
or the mean reward of the other K - 1 samples (ExpansionNet v2, "new SCST").
Loss: -(reward - baseline) * log p(caption), log p summed over the caption's words and its
end token's step (captionflow.decoding.search.sample).

The end token in the reward (`eos_mode`, the two modes of SacreEOS: Hu, Cavicchioli,
Capotondi 2023, "A request for clarity over the End of Sequence token in the Self-Critical
Sequence Training"):
    standard  a sampled caption that ended is scored with the end token as its last word,
              every reference ends with it, and the training df counts it; a caption cut
              off at max_len has none. Stopping early or never stopping costs reward, as in
              ExpansionNet v2 and ruotianluo's self-critical.pytorch.
    no_eos    words only, up to the end token (before issue 27 the only mode): CIDEr-D then
              rewards captions that trail off ("a man riding a horse on a"), which
              captionflow.metrics.endings counts.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from pycocoevalcap.bleu.bleu_scorer import BleuScorer

from captionflow.decoding.search import greedy, sample, until_end
from captionflow.errors import CaptionflowError
from captionflow.metrics.cider import END_TOKEN, CiderD, DocumentFrequencies
from captionflow.training.loop import HISTORY_COLUMNS
from captionflow.training.recipe import RecipeSettings, clip_gradients

BASELINES = ("greedy", "mean_of_others")
EOS_MODES = ("standard", "no_eos")
# the SacreEOS release whose signature format reward_signature follows (its field meanings
# have not changed since 1.0.0, the version its paper's examples show)
SACREEOS_VERSION = "1.0.2"
# + the epoch's mean sampled-caption reward and mean baseline (the report's SCST curves)
HISTORY = [*HISTORY_COLUMNS, "reward", "baseline"]


@dataclass(frozen=True)
class SCSTConfig(RecipeSettings):
    """Settings of train_scst: an experiment's `scst` config section (train_scst_e2e adds
    its own on top; no defaults here: captionflow.config.build fills them from the schema)."""

    SECTION: ClassVar[str] = "scst"

    epochs: int
    batch_size: int  # images per batch (x samples captions)
    samples: int  # K sampled captions per image
    temperature: float
    baseline: str  # greedy | mean_of_others
    bleu_weight: float  # reward = (1 - w) * CIDEr-D + w * BLEU-4
    eos_mode: str  # standard: the end token is a word of the reward | no_eos: words only (SacreEOS's modes)
    max_len: int
    patience: int
    checkpoint_every: int  # optimizer steps between resumable states; 0: by time only
    checkpoint_minutes: float  # minutes of training between resumable states; 0: by steps only
    precision: str  # fp32 | bf16 | fp16 (captionflow.utils.precision)
    seed: int
    device: str


def check_settings(cfg, section):
    if cfg.baseline not in BASELINES:
        raise CaptionflowError(f"{section}.baseline {cfg.baseline!r} is not one of {', '.join(BASELINES)}")
    if cfg.baseline == "mean_of_others" and cfg.samples < 2:
        raise CaptionflowError(f"{section}.baseline mean_of_others needs {section}.samples >= 2")
    if cfg.eos_mode not in EOS_MODES:
        raise CaptionflowError(f"{section}.eos_mode {cfg.eos_mode!r} is not one of {', '.join(EOS_MODES)}")


def sacreeos_signature(cfg, n=4, sigma=6.0):
    """The SacreEOS signature of the reward: mode_init+metric[args]+baseline[nspi K]+version.

    mode STANDARD | NO<EOS> (eos_mode); init wInit: CIDEr-D's df comes from the training
    corpus (always here), w/oInit: no corpus (BLEU alone); metric Cider-D[n<n>,s<sigma>] or
    BLEU[n4]; baseline greedy | average (mean_of_others), nspi: sampled captions per image.
    A mix of both metrics, which SacreEOS has no name for, reads
    Cider-D[n4,s6.0,w<1-w>]&BLEU[n4,w<w>]."""
    mode = "STANDARD" if cfg.eos_mode == "standard" else "NO<EOS>"
    w = cfg.bleu_weight
    cider = f"n{n},s{float(sigma)}"
    if w == 0:
        metric = f"Cider-D[{cider}]"
    elif w == 1:
        metric = "BLEU[n4]"
    else:
        metric = f"Cider-D[{cider},w{1 - w:g}]&BLEU[n4,w{w:g}]"
    init = "w/oInit" if w == 1 else "wInit"
    base = "average" if cfg.baseline == "mean_of_others" else "greedy"
    return f"{mode}_{init}+{metric}+{base}[nspi{cfg.samples}]+{SACREEOS_VERSION}"


def reward_signature(cfg, df_path, df, vocab_hash, max_len):
    """One line that says whether two SCST numbers are comparable: the SacreEOS signature,
    then the rest spelled out."""
    mix = f"{1 - cfg.bleu_weight:g} x CIDEr-D + {cfg.bleu_weight:g} x BLEU-4" if cfg.bleu_weight else "CIDEr-D"
    eos = (
        "end token scored (a word of every reference and of each caption that ended, counted in the df)"
        if cfg.eos_mode == "standard"
        else "words up to the end token (no_eos)"
    )
    return (
        f"{sacreeos_signature(cfg)}; reward={mix}; {eos}; "
        f"cider: n=4 sigma=6 clipped x10, df=training corpus ({df.num_docs} images, {Path(df_path).name}); "
        f"baseline={cfg.baseline}; samples={cfg.samples}; temperature={cfg.temperature:g}; max_len={cfg.max_len}; "
        f"tokens=labels vocabulary {vocab_hash} (UNK, truncated at {max_len})"
    )


def _bleu4(refs, keys, hyps):
    """Sentence BLEU-4 of each hypothesis (pycocoevalcap's scorer) -> (N,)."""
    scores = []
    for key, hyp in zip(keys, hyps):
        scorer = BleuScorer(n=4)
        scorer += (" ".join(map(str, hyp)), [" ".join(map(str, r)) for r in refs[key]])
        scores.append(scorer.compute_score(option="closest", verbose=0)[0][3])
    return np.asarray(scores)


class Reward:
    """CIDEr-D (and BLEU-4) of token sequences against a split's references, by image row.

    eos_mode standard: every reference ends with END_TOKEN, and so does each hypothesis
    that ended before its last column (one cut off at max_len does not)."""

    def __init__(self, train_data, cider_df, bleu_weight, device, eos_mode):
        self.end = eos_mode == "standard"
        # training references as token ids, cooked once: image row -> list of captions
        self.refs = {}
        for item, row in enumerate(train_data.caption_image):
            words = train_data.labels[train_data.caption_rows[item]].tolist()
            words = words[: words.index(0)] if 0 in words else words
            self.refs.setdefault(int(row), []).append(words + [END_TOKEN] if self.end else words)
        self.df = DocumentFrequencies.load(cider_df, end_token=self.end)
        self.cider = CiderD(self.refs, df=self.df)
        self.bleu_weight, self.device = bleu_weight, device

    def __call__(self, keys, seqs):
        """keys (N,) image rows, seqs (N, T) zero-padded after the end -> rewards (N,) float32 on the device."""
        seqs = seqs.cpu()
        hyps = until_end(seqs)
        if self.end:
            ended = (seqs == 0).any(dim=1).tolist()
            hyps = [hyp + [END_TOKEN] if e else hyp for hyp, e in zip(hyps, ended)]
        r = self.cider.score(keys, hyps)
        if self.bleu_weight:
            r = (1 - self.bleu_weight) * r + self.bleu_weight * _bleu4(self.refs, keys, hyps)
        return torch.as_tensor(r, dtype=torch.float32, device=self.device)


def policy_loss(model, feats, rows, cfg, reward, generator, precision, policy=None):
    """The self-critical loss of one batch of images (feats of `rows`) -> (loss, rewards
    (B, K), baseline (B, K) or (B, 1)).

    policy: what sampling decodes with (recipe.maybe_compile_decoding(model, cfg.compile));
    None: model. The greedy baseline decodes with the plain model."""
    K = cfg.samples
    with precision.autocast():
        seqs, token_lp = sample(
            policy or model,
            feats,
            n=K,
            max_len=cfg.max_len,
            temperature=cfg.temperature,
            generator=generator,
            track_grad=True,
        )
    rewards = reward(np.repeat(rows, K), seqs).view(-1, K)  # (B, K)
    if cfg.baseline == "greedy":
        model.eval()
        with precision.autocast(), torch.no_grad():
            greedy_seqs, _ = greedy(model, {k: v.detach() for k, v in feats.items()}, cfg.max_len)
        model.train()
        baseline = reward(np.asarray(rows), greedy_seqs)[:, None]
    else:
        baseline = (rewards.sum(dim=1, keepdim=True) - rewards) / (K - 1)
    advantage = (rewards - baseline).view(-1)
    return -(advantage * token_lp.float().sum(dim=1)).mean(), rewards, baseline


def optimizer_step(run, group, loss_of, model, optimizer, schedule, precision, cfg, where, sync_gradients=None):
    """One self-critical update from the batches of `group` (cfg.accumulate of them, fewer at
    an epoch's end): for each, `loss_of(batch)` -> (loss, rewards, baseline) (`policy_loss`),
    backward of loss / len(group) (scaled under fp16); then `sync_gradients()` (DDP's
    average, where sampling bypassed the wrapper: once per step), clip (cfg.grad_clip,
    cfg.grad_clip_mode), the finiteness check before the step (no NaN weights), the step, and
    the step's mean reward and baseline logged (TensorBoard, and their epoch means in the
    history). where: the config section, for errors."""
    optimizer.zero_grad(set_to_none=True)
    loss_value, rewards, baselines = 0.0, [], []
    for batch in group:
        loss, batch_rewards, batch_baseline = loss_of(batch)
        loss = loss / len(group)  # the step's loss: the mean over its batches
        precision.backward(loss)
        loss_value += loss.item()
        rewards.append(batch_rewards.detach().reshape(-1))
        baselines.append(batch_baseline.detach().reshape(-1))
    if sync_gradients is not None:
        sync_gradients()
    precision.unscale(optimizer)
    grad_norm = clip_gradients(model.parameters(), cfg.grad_clip, cfg.grad_clip_mode, where)
    run.check_finite(loss_value, precision.checked_grad_norm(grad_norm.item()))
    precision.step(optimizer)
    schedule.after_step(run.step + 1)
    mean_reward, mean_baseline = torch.cat(rewards).mean().item(), torch.cat(baselines).mean().item()
    if run.writer:
        run.writer.add_scalar("train/reward", mean_reward, run.step + 1)
        run.writer.add_scalar("train/baseline", mean_baseline, run.step + 1)
    run.step_done(loss_value, {"reward": mean_reward, "baseline": mean_baseline})
