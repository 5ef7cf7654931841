"""Stage train_es: evolution strategies train a captioner without backpropagation through
the sampler (NIC-ES and NIC-NES, "Neural image captioning with (natural) evolution
strategies"; Salimans et al. 2017; Such et al. 2017; Lehman et al. 2018).

    nes (NIC-NES)  a centre theta; lambda offspring theta + sigma * eps_i (mirrored pairs
                   +eps, -eps); fitnesses shaped to centred ranks w_i; the NES gradient
                   g = sum_i w_i eps_i / (lambda sigma), minus an L2 term, goes to Adam or
                   SGD (`stepsize`); `single_batch` scores every offspring on one batch
    ga  (NIC-ES)   mu parents; lambda offspring, each a parent chosen `uniform`ly or by
                   `tournament` plus Gaussian noise sigma * eps_i; the C best offspring and
                   the elite are re-scored on `elite_batch_size` more images, and the E
                   best of that become the elites, kept unmutated; parents = elites + the
                   best offspring
Fitness (`fitness`) on a batch of training images: `greedy` (CIDEr-D of greedy captions),
`sample` (of sampled captions), `self_critical` (sampled minus greedy) or `greedy_logprob`
(the mean log-probability of the reference captions, the XE objective as a fitness);
CIDEr-D is captionflow's vectorized scorer with the training document frequencies.
`safe_mutations` scale each weight's noise (captionflow.training.mutation).

Distributed by shared seeds: every process holds the centre (or the parents), regenerates
each offspring from (seed, iteration, index) and scores its share of them; the fitnesses
are summed over the processes (lambda numbers, plus the elite candidates' for ga), and
every process applies the same update. Nothing is written per offspring.

Annealing (`annealing`): `patience` divides the noise stdev (`stdev_divisor`) and the
stepsize (`stepsize_divisor`) and multiplies the batch size (`bs_multiplier`) after
`patience_iterations` iterations without a better best fitness (nes) or a new elite (ga);
`schedule` does so at iterations schedule_start, 2 x schedule_start, ...; both at most
`schedule_limit` times. Greedy val CIDEr-D on `num_val_items` images every `val_every`
iterations picks the best model. Resumable exactly: the iteration is the data position
(each iteration's batches and noise follow from the seed and the iteration number), and the
state holds the centre or parents, the optimizer, annealing and patience.
"""

import json
import time
from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np
import torch

from captionflow.data.captions import SplitData, read_labels_json
from captionflow.decoding.search import greedy, sample, until_end
from captionflow.errors import CaptionflowError
from captionflow.evaluation.split_captions import greedy_cider_d
from captionflow.metrics.cider import CiderD, DocumentFrequencies
from captionflow.models import checkpoint, create_model
from captionflow.training import distributed
from captionflow.training.loop import TrainingRun, fingerprint
from captionflow.training.mutation import (
    SAFE_MUTATIONS,
    caption_outputs,
    flat_params,
    generator_for,
    mutation_scale,
    perturbation,
    set_flat_params,
)
from captionflow.utils.device import resolve_device
from captionflow.utils.io import file_stamp  # a regenerated input starts training over
from captionflow.utils.threads import use_threads

ALGORITHMS = ("nes", "ga")
FITNESS = ("greedy", "sample", "self_critical", "greedy_logprob")
SELECTION = ("uniform", "tournament")
ANNEALING = ("none", "patience", "schedule")
OPTIMIZERS = ("adam", "sgd")
HISTORY = [
    "epoch",
    "step",
    "val_cider_d",
    "best_fitness",
    "mean_fitness",
    "elite_fitness",
    "noise_stdev",
    "batch_size",
    "stepsize",
    "offspring_per_s",
    "bytes_exchanged",
]


@dataclass(frozen=True)
class ESConfig:
    """Settings of train_es: an experiment's `es` config section (no defaults here:
    captionflow.config.build fills them from the schema)."""

    SECTION: ClassVar[str] = "es"

    algorithm: str
    iterations: int
    offspring: int  # lambda
    population: int  # mu (ga)
    elites: int  # E (ga)
    elite_candidates: int  # C (ga)
    elite_batch_size: int  # images the candidates are re-scored on (ga)
    selection: str
    tournament_size: int
    noise_stdev: float
    mirrored: bool  # nes
    optimizer: str  # nes
    stepsize: float  # nes
    l2coeff: float  # nes
    single_batch: bool
    batch_size: int  # images per fitness evaluation
    fitness: str
    safe_mutations: str
    safe_mutation_batch: int  # reference captions
    safe_mutation_underflow: float
    safe_mutation_every: int  # iterations between sensitivity updates
    annealing: str
    patience_iterations: int
    schedule_start: int
    schedule_limit: int
    stdev_divisor: float
    bs_multiplier: float
    stepsize_divisor: float
    val_every: int
    num_val_items: int
    patience: int  # validations without a better val CIDEr-D before stopping
    max_len: int
    seed: int
    device: str


def check_config(cfg):
    for name, value, allowed in (
        ("algorithm", cfg.algorithm, ALGORITHMS),
        ("fitness", cfg.fitness, FITNESS),
        ("selection", cfg.selection, SELECTION),
        ("annealing", cfg.annealing, ANNEALING),
        ("optimizer", cfg.optimizer, OPTIMIZERS),
        ("safe_mutations", cfg.safe_mutations, SAFE_MUTATIONS),
    ):
        if value not in allowed:
            raise CaptionflowError(f"es.{name} {value!r} is not one of {', '.join(allowed)}")
    if cfg.algorithm == "nes" and cfg.mirrored and cfg.offspring % 2:
        raise CaptionflowError(f"es.offspring {cfg.offspring} must be even with mirrored sampling (es.mirrored: true)")
    if cfg.algorithm == "ga" and not cfg.elites <= cfg.population:
        raise CaptionflowError(f"es.elites {cfg.elites} must be at most es.population {cfg.population}")


def centred_ranks(values):
    """Fitness shaping: ranks scaled to [-0.5, 0.5] (ties broken by index)."""
    ranks = torch.empty(len(values))
    ranks[torch.argsort(values)] = torch.arange(len(values), dtype=torch.float32)
    return ranks / max(1, len(values) - 1) - 0.5


def _sample_seed(seed, t, i):
    """The seed of offspring i's sampled captions at iteration t (fitness sample, self_critical)."""
    return (seed * 1_000_003 + t) * 10_007 + i


class Fitness:
    """Scores of parameter vectors on batches of training images."""

    def __init__(self, model, data, cider, cfg, device):
        self.model, self.data, self.cider, self.cfg, self.device = model, data, cider, cfg, device
        self.items_of = {}
        for item, row in enumerate(data.caption_image):
            self.items_of.setdefault(int(row), []).append(item)

    @torch.no_grad()
    def __call__(self, params, rows, seed):
        set_flat_params(self.model, params)
        self.model.eval()
        kind, max_len = self.cfg.fitness, self.cfg.max_len
        if kind == "greedy_logprob":
            items = np.asarray([i for r in rows for i in self.items_of[r]])
            feats, inputs, targets, mask = self.data.caption_batch(items)
            feats = {k: v.to(self.device) for k, v in feats.items()}
            logprobs, _ = self.model.teacher_forcing(feats, inputs.to(self.device))
            picked = logprobs.gather(2, targets.to(self.device)[..., None])[..., 0].cpu()
            return float((picked * mask).sum() / mask.sum())
        feats = {k: v.to(self.device) for k, v in self.data.features.get(rows).items()}
        keys = np.asarray(rows)
        score = 0.0
        if kind in ("sample", "self_critical"):
            gen = torch.Generator(device=self.device).manual_seed(seed)
            seqs, _ = sample(self.model, feats, n=1, max_len=max_len, generator=gen)
            score += float(np.mean(self.cider.score(keys, until_end(seqs.cpu()))))
        if kind in ("greedy", "self_critical"):
            seqs, _ = greedy(self.model, feats, max_len)
            value = float(np.mean(self.cider.score(keys, until_end(seqs.cpu()))))
            score += value if kind == "greedy" else -value
        return score


def _score_all(fn, count):
    """fn(i) for i in range(count), this process's share; summed over the processes."""
    values = torch.zeros(count, dtype=torch.float64)
    for i in range(distributed.rank(), count, distributed.world_size()):
        values[i] = fn(i)
    return distributed.sum_over_ranks(values)


class Evolution:
    """NES or GA state and one iteration of it; TrainingRun saves it as the 'optimizer'."""

    def __init__(self, model, fitness, reference, n_train, cfg):
        self.model, self.fitness, self.reference, self.n_train, self.cfg = model, fitness, reference, n_train, cfg
        theta = flat_params(model)
        self.n = theta.numel()
        self.state = {
            "sigma": cfg.noise_stdev,
            "batch_size": min(cfg.batch_size, n_train),
            "stepsize": cfg.stepsize,
            "annealings": 0,
            "since_best": 0,
            "best_fitness": -float("inf"),
            "scale": None,
            "last": {},
        }
        if cfg.algorithm == "nes":
            self.theta = torch.nn.Parameter(theta)
            if cfg.optimizer == "adam":
                self.optimizer = torch.optim.Adam([self.theta], lr=cfg.stepsize)
            else:
                self.optimizer = torch.optim.SGD([self.theta], lr=cfg.stepsize, momentum=0.9)
        else:
            self.parents = theta.repeat(cfg.population, 1)  # (mu, n): the start, mu times
            self.parent_fitness = torch.zeros(cfg.population, dtype=torch.float64)
            self.elite = theta.clone()

    # -- saved with the run ------------------------------------------------------------
    def state_dict(self):
        out = {"state": dict(self.state)}
        if self.cfg.algorithm == "nes":
            out.update(theta=self.theta.detach().clone(), optimizer=self.optimizer.state_dict())
        else:
            out.update(
                parents=self.parents.clone(), parent_fitness=self.parent_fitness.clone(), elite=self.elite.clone()
            )
        return out

    def load_state_dict(self, saved):
        self.state = dict(saved["state"])
        if self.cfg.algorithm == "nes":
            with torch.no_grad():
                self.theta.copy_(saved["theta"])
            self.optimizer.load_state_dict(saved["optimizer"])
        else:
            self.parents, self.parent_fitness, self.elite = saved["parents"], saved["parent_fitness"], saved["elite"]
        set_flat_params(self.model, self.current())

    def current(self):
        """The model this run would keep now: the NES centre or the GA elite."""
        return self.theta.detach() if self.cfg.algorithm == "nes" else self.elite

    # -- one iteration -------------------------------------------------------------------
    def _batch(self, t, index):
        gen = generator_for(self.cfg.seed, t, ("batch", index))
        return torch.randperm(self.n_train, generator=gen)[: int(self.state["batch_size"])].tolist()

    def _noise(self, t, index):
        eps = perturbation(self.cfg.seed, t, index, self.n)
        return eps if self.state["scale"] is None else eps * self.state["scale"]

    def _update_scale(self, t):
        cfg = self.cfg
        if cfg.safe_mutations == "none" or t % cfg.safe_mutation_every:
            return
        set_flat_params(self.model, self.current())
        feats, inputs, mask = self.reference
        self.model.eval()
        self.state["scale"] = mutation_scale(
            self.model,
            caption_outputs(self.model, feats, inputs, mask),
            cfg.safe_mutations,
            cfg.safe_mutation_underflow,
        )

    def iteration(self, t):
        """Score lambda offspring of iteration t and update -> statistics of the iteration."""
        self._update_scale(t)
        start = time.perf_counter()
        stats = self._nes(t) if self.cfg.algorithm == "nes" else self._ga(t)
        improved = (
            stats["best_fitness"] > self.state["best_fitness"]
            if self.cfg.algorithm == "nes"
            else stats.pop("new_elite")
        )
        self.state["best_fitness"] = max(self.state["best_fitness"], stats["best_fitness"])
        self.state["since_best"] = 0 if improved else self.state["since_best"] + 1
        self._anneal(t)
        set_flat_params(self.model, self.current())
        stats.update(
            noise_stdev=self.state["sigma"],
            batch_size=int(self.state["batch_size"]),
            stepsize=self.state["stepsize"] if self.cfg.algorithm == "nes" else "",
            offspring_per_s=round(self.cfg.offspring / (time.perf_counter() - start), 2),
        )
        self.state["last"] = stats
        return stats

    def _nes(self, t):
        cfg, sigma, lam = self.cfg, self.state["sigma"], self.cfg.offspring
        theta = self.theta.detach()

        def offspring(i):
            index, sign = (i // 2, 1.0 - 2.0 * (i % 2)) if cfg.mirrored else (i, 1.0)
            rows = self._batch(t, 0 if cfg.single_batch else index)
            return self.fitness(theta + sign * sigma * self._noise(t, index), rows, seed=_sample_seed(cfg.seed, t, i))

        fitness, sent = _score_all(offspring, lam)
        weights = centred_ranks(fitness.float())
        grad = torch.zeros(self.n)
        if cfg.mirrored:
            for j in range(lam // 2):
                grad += (weights[2 * j] - weights[2 * j + 1]) * self._noise(t, j)
        else:
            for i in range(lam):
                grad += weights[i] * self._noise(t, i)
        grad /= lam * sigma
        self.optimizer.zero_grad(set_to_none=True)
        self.theta.grad = -grad + cfg.l2coeff * theta  # the optimizers minimise
        self.optimizer.step()
        return {
            "best_fitness": float(fitness.max()),
            "mean_fitness": float(fitness.mean()),
            "elite_fitness": "",
            "bytes_exchanged": sent,
        }

    def _ga(self, t):
        cfg, sigma, lam = self.cfg, self.state["sigma"], self.cfg.offspring
        gen = generator_for(cfg.seed, t, "select")
        if cfg.selection == "uniform":
            chosen = torch.randint(cfg.population, (lam,), generator=gen)
        else:
            entrants = torch.randint(cfg.population, (lam, cfg.tournament_size), generator=gen)
            chosen = entrants.gather(1, self.parent_fitness[entrants].argmax(dim=1, keepdim=True))[:, 0]

        def child(i):
            return self.parents[chosen[i]] + sigma * self._noise(t, i)

        fitness, sent = _score_all(
            lambda i: self.fitness(
                child(i), self._batch(t, 0 if cfg.single_batch else i), seed=_sample_seed(cfg.seed, t, i)
            ),
            lam,
        )
        order = torch.argsort(fitness, descending=True).tolist()
        # the C best offspring and the current elite, re-scored on more images
        candidates = order[: cfg.elite_candidates]
        rows = torch.randperm(self.n_train, generator=generator_for(cfg.seed, t, "elite"))[
            : cfg.elite_batch_size
        ].tolist()
        vectors = [child(i) for i in candidates] + [self.elite]
        rescored, sent_more = _score_all(lambda k: self.fitness(vectors[k], rows, seed=0), len(vectors))
        ranking = torch.argsort(rescored, descending=True).tolist()
        elites = ranking[: cfg.elites]
        new_elite = ranking[0] != len(vectors) - 1  # an offspring beat the elite
        kept = [vectors[k] for k in elites]
        kept_fitness = [float(rescored[k]) for k in elites]
        taken = {candidates[k] for k in elites if k < len(candidates)}
        rest = [i for i in order if i not in taken][: cfg.population - len(kept)]
        self.parents = torch.stack(kept + [child(i) for i in rest])
        self.parent_fitness = torch.tensor(kept_fitness + [float(fitness[i]) for i in rest], dtype=torch.float64)
        self.elite = kept[0].clone()
        return {
            "best_fitness": float(fitness.max()),
            "mean_fitness": float(fitness.mean()),
            "elite_fitness": round(kept_fitness[0], 6),
            "bytes_exchanged": sent + sent_more,
            "new_elite": new_elite,
        }

    def _anneal(self, t):
        cfg, s = self.cfg, self.state
        if cfg.annealing == "none" or s["annealings"] >= cfg.schedule_limit:
            return
        due = (
            s["since_best"] >= cfg.patience_iterations
            if cfg.annealing == "patience"
            else (t + 1) % cfg.schedule_start == 0
        )
        if not due:
            return
        s["sigma"] /= cfg.stdev_divisor
        s["batch_size"] = min(self.n_train, int(round(s["batch_size"] * cfg.bs_multiplier)))
        s["annealings"] += 1
        s["since_best"] = 0
        if cfg.algorithm == "nes":
            s["stepsize"] /= cfg.stepsize_divisor
            for group in self.optimizer.param_groups:
                group["lr"] = s["stepsize"]
        print(
            f"iteration {t}: annealed ({s['annealings']} of {cfg.schedule_limit}): noise stdev {s['sigma']:.3g}, batch {s['batch_size']}",
            flush=True,
        )


def train(
    features_train,
    features_val,
    labels_h5,
    labels_json,
    references,
    cider_df,
    init_checkpoint,
    model_name,
    model_args,
    out_checkpoint,
    out_history,
    cfg,
    threads=1,
):
    """Train with evolution strategies from `init_checkpoint` (XE) or, when None, from a
    random init of `model_name`; write the best checkpoint (greedy val CIDEr-D) and the history."""
    check_config(cfg)
    device = distributed.device_for(resolve_device(cfg.device))
    if device.type == "cpu":
        threads //= distributed.world_size()
    use_threads(threads)
    index = read_labels_json(labels_json)
    if init_checkpoint:
        model, init = checkpoint.load_model(init_checkpoint, index["vocab_hash"])
        model_name, full_args, blind = init["model_name"], init["model_args"], init.get("blind", False)
    else:
        init, blind = {}, False
    train_data = SplitData(labels_h5, labels_json, features_train, "train", blind)
    val_data = SplitData(labels_h5, labels_json, features_val, "val", blind)
    if init_checkpoint:
        checkpoint.check_feature_dim(
            init,
            init_checkpoint,
            train_data.features.feat_dim,
            f"features {features_train}",
            "train ES on the features its XE stage read",
        )
    else:
        full_args = {**model_args, "vocab_size": train_data.vocab_size, "feat_dim": train_data.features.feat_dim}
        torch.manual_seed(cfg.seed)
        model = create_model(model_name, **full_args)
        model.fit_feature_norms(train_data.features.get(range(train_data.features.fit_rows())))
    model.to(device).eval()
    with open(references) as f:
        val_refs = json.load(f)["val"]
    refs = {}
    for item, row in enumerate(train_data.caption_image):
        words = train_data.labels[train_data.caption_rows[item]].tolist()
        refs.setdefault(int(row), []).append(words[: words.index(0)] if 0 in words else words)
    cider = CiderD(refs, df=DocumentFrequencies.load(cider_df))
    n_train = len(train_data.features)
    ref_items = torch.randperm(len(train_data.caption_rows), generator=generator_for(cfg.seed, -1, "reference"))[
        : cfg.safe_mutation_batch
    ].numpy()
    feats, inputs, _, mask = train_data.caption_batch(ref_items)
    reference = ({k: v.to(device) for k, v in feats.items()}, inputs.to(device), mask.to(device))
    evolution = Evolution(model, Fitness(model, train_data, cider, cfg, device), reference, n_train, cfg)
    if distributed.is_main():
        print(
            f"train_es: {cfg.algorithm} on {model_name} ({evolution.n / 1e6:.2f} M parameters), lambda {cfg.offspring}, fitness {cfg.fitness}, {distributed.world_size()} process(es)",
            flush=True,
        )

    record = {
        "model_name": model_name,
        "model_args": full_args,
        "xe": init.get("xe"),
        "es": asdict(cfg),
        "blind": blind,
    }
    key = fingerprint(
        record,
        file_stamp(init_checkpoint) if init_checkpoint else None,
        file_stamp(cider_df),
        file_stamp(features_train),
        file_stamp(features_val),
    )
    meta = {**record, "vocab_hash": index["vocab_hash"], "stage": "es"}
    run = TrainingRun(
        out_checkpoint,
        out_history,
        key,
        meta,
        model,
        evolution,
        None,
        torch.Generator().manual_seed(cfg.seed),
        cfg.iterations,
        cfg.patience,
        10**9,
        "train_es",
        hint=f"noise too large for these weights (es.noise_stdev = {cfg.noise_stdev:g}) or es.stepsize = {cfg.stepsize:g}",
        history_columns=HISTORY,
    )
    val_ids = val_data.image_ids[: cfg.num_val_items]
    while run.running():
        t = run.epoch
        for _ in run.remaining([t]):  # one step per iteration: the iteration is the data position
            stats = evolution.iteration(t)
            if run.writer:
                for name in ("best_fitness", "mean_fitness", "noise_stdev", "offspring_per_s"):
                    run.writer.add_scalar(f"es/{name}", stats[name], t + 1)
            run.step_done(-stats["mean_fitness"])
        score = None
        if (t + 1) % cfg.val_every == 0 or t + 1 == cfg.iterations:
            score = run.validate(lambda: greedy_cider_d(model, val_data, val_refs, device, cfg.max_len, val_ids))
        stats = evolution.state["last"]
        if distributed.is_main():
            print(
                f"iteration {t}: fitness best {stats['best_fitness']:.4f} mean {stats['mean_fitness']:.4f}, noise {stats['noise_stdev']:.3g}, "
                f"batch {stats['batch_size']}, {stats['offspring_per_s']} offspring/s, {stats['bytes_exchanged']} bytes exchanged"
                + (f", val CIDEr-D {score:.4f}" if score is not None else ""),
                flush=True,
            )
        run.end_epoch(score, extra={k: stats.get(k, "") for k in HISTORY[3:]})
    run.finish()
