"""Stage train_es: evolution strategies train a captioner without backpropagation through
the sampler (NIC-ES and NIC-NES, Cartuyvels et al., github rubencart/es-img-captioning;
Salimans et al. 2017; Such et al. 2017; Lehman et al. 2018). docs/stages.md maps the
source's options onto these keys.

    nes (NIC-NES)  a centre theta; lambda offspring theta + delta_i, delta_i = sigma * f * eps_i
                   (f: the safe-mutation factor; mirrored pairs +delta, -delta); fitnesses
                   shaped to centred ranks w_i; the source's (OpenAI ES starter's) update:
                   g = sum_i w_i delta_i / lambda (no 1 / sigma), and the optimizer (Adam,
                   or SGD with dampened momentum) steps along -g + l2coeff * theta;
                   `single_batch` scores every offspring on one batch
    ga  (NIC-ES)   mu parents; lambda offspring, each a parent chosen `uniform`ly or by
                   `tournament` plus sigma * f * eps_i; the C best offspring and the elite
                   are re-scored on `elite_batch_size` more images, and the E best of that
                   become the elites, kept unmutated; parents = elites + the best offspring
Fitness (`fitness`) on a batch of training images, c_i = CIDEr-D of caption i (captionflow's
vectorized scorer, training document frequencies), p_it its word t's probability and m_it
1 up to and including its end token:
    greedy             mean c_i of greedy captions
    sample             mean c_i of sampled captions (one per image)
    self_critical      mean c_i of sampled minus mean c_i of greedy captions
    sc_loss            the self-critical loss of the sampled captions (the source's sign):
                       -sum_it m_it log p_it (c_i - c_i^greedy) / sum_it m_it
    greedy_logprob     greedy captions, each word's probability mapped to [0, 1]:
                       sum_it m_it c_i (log10(p_it + 1/9) + log10 9) / sum_it m_it
    reference_logprob  the mean log-probability of the reference captions (the XE
                       objective; captionflow's, not in the source)
`safe_mutations` set f (captionflow.training.mutation).

Distributed by shared seeds: every process holds the centre (or the parents), regenerates
each offspring from (seed, iteration, index) and scores its share of them; the fitnesses
are summed over the processes (lambda numbers, plus the elite candidates' for ga), and
every process applies the same update. Nothing is written per offspring.

Annealing (`annealing`) divides the noise stdev (`stdev_divisor`) and the stepsize
(`stepsize_divisor`, nes) and multiplies the batch size (`bs_multiplier`), as often as it
comes due (no cap). `schedule`: before generations (1-based) schedule_start,
schedule_start + schedule_limit, schedule_start + 2 schedule_limit, ... (the source's
meaning of both names); `patience`: after `patience_iterations` generations in a row
without a better best fitness (nes) or a new elite (ga). The stepsize changes after that
generation's update, as in the source. Greedy val CIDEr-D on `num_val_items` images every
`val_every` iterations picks the best model. Resumable exactly: the iteration is the data
position (each iteration's batches and noise follow from the seed and the iteration
number), and the state holds the centre or parents, the optimizer, annealing and patience.
"""

import json
import time
from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np
import torch

from captionflow.data.captions import SplitData, read_labels_json
from captionflow.decoding.search import greedy_steps, sample, until_end
from captionflow.errors import CaptionflowError
from captionflow.evaluation.split_captions import greedy_cider_d
from captionflow.metrics.cider import CiderD, DocumentFrequencies
from captionflow.models import checkpoint, create_model
from captionflow.training import distributed
from captionflow.training.loop import TrainingRun, fingerprint
from captionflow.training.mutation import (
    SAFE_MUTATIONS,
    flat_params,
    generator_for,
    greedy_step_outputs,
    load_sensitivity_vector,
    output_sensitivity,
    perturbation,
    proportional_scale,
    sensitivity_scale,
    set_flat_params,
)
from captionflow.utils.device import resolve_device
from captionflow.utils.io import file_stamp  # a regenerated input starts training over
from captionflow.utils.threads import use_threads

ALGORITHMS = ("nes", "ga")
FITNESS = ("greedy", "sample", "self_critical", "sc_loss", "greedy_logprob", "reference_logprob")
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
    safe_mutation_batch: int  # reference images of SM-G-SUM
    safe_mutation_underflow: float
    safe_mutation_every: int  # iterations between sensitivity updates (SM-G-SUM)
    safe_mutation_vector: str  # SM-VECTOR: a torch file of one sensitivity per weight
    annealing: str
    patience_iterations: int  # generations without improvement before annealing (patience)
    schedule_start: int  # first annealed generation, 1-based (schedule)
    schedule_limit: int  # generations between annealings from then on (schedule)
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
    if (cfg.safe_mutations == "SM-VECTOR") != bool(cfg.safe_mutation_vector):
        raise CaptionflowError(
            "es.safe_mutation_vector (a file of sensitivities) goes with es.safe_mutations: SM-VECTOR, and only with it"
        )
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
        if kind == "reference_logprob":
            items = np.asarray([i for r in rows for i in self.items_of[r]])
            feats, inputs, targets, mask = self.data.caption_batch(items)
            feats = {k: v.to(self.device) for k, v in feats.items()}
            logprobs, _ = self.model.teacher_forcing(feats, inputs.to(self.device))
            picked = logprobs.gather(2, targets.to(self.device)[..., None])[..., 0].cpu()
            return float((picked * mask).sum() / mask.sum())
        feats = {k: v.to(self.device) for k, v in self.data.features.get(rows).items()}
        keys = np.asarray(rows)
        if kind in ("sample", "self_critical", "sc_loss"):
            gen = torch.Generator(device=self.device).manual_seed(seed)
            sampled, sampled_lp = sample(self.model, feats, n=1, max_len=max_len, generator=gen)
            sampled_cider = np.asarray(self.cider.score(keys, until_end(sampled.cpu())), dtype=np.float64)
        if kind != "sample":
            greedy_seqs, greedy_lp = greedy_steps(self.model, feats, max_len)
            greedy_cider = np.asarray(self.cider.score(keys, until_end(greedy_seqs.cpu())), dtype=np.float64)
        if kind == "greedy":
            return float(greedy_cider.mean())
        if kind == "sample":
            return float(sampled_cider.mean())
        if kind == "self_critical":
            return float(sampled_cider.mean() - greedy_cider.mean())
        if kind == "sc_loss":
            return sc_loss_fitness(sampled.cpu(), sampled_lp.cpu(), sampled_cider - greedy_cider)
        return greedy_logprob_fitness(greedy_seqs.cpu(), greedy_lp.cpu(), greedy_cider)


def caption_mask(seqs):
    """m (N, T): 1 at each word up to and including the end token (0), 0 after it."""
    mask = torch.ones(seqs.shape, dtype=torch.float64)
    mask[:, 1:] = (seqs[:, :-1] != 0).to(torch.float64).cumprod(dim=1)
    return mask


def sc_loss_fitness(seqs, token_logprobs, advantage):
    """-sum_it m_it log p_it a_i / sum_it m_it: the self-critical loss of captions seqs (N, T)
    with per-word log-probabilities (N, T) and advantages a (N,) (sampled minus greedy CIDEr-D)."""
    mask = caption_mask(seqs)
    weighted = token_logprobs.double() * torch.as_tensor(advantage, dtype=torch.float64)[:, None]
    return float(-(weighted * mask).sum() / mask.sum())


def greedy_logprob_fitness(seqs, token_logprobs, cider):
    """sum_it m_it c_i (log10(p_it + 1/9) + log10 9) / sum_it m_it: each word's probability
    mapped onto [0, 1] (0 at p = 0, 1 at p = 1), weighted by its caption's CIDEr-D c_i (N,)."""
    mask = caption_mask(seqs)
    mapped = torch.log10(token_logprobs.double().exp() + 1.0 / 9.0) + np.log10(9.0)
    weighted = mapped * torch.as_tensor(cider, dtype=torch.float64)[:, None]
    return float((weighted * mask).sum() / mask.sum())


class SourceSGD(torch.optim.Optimizer):
    """SGD as NIC-NES (the OpenAI ES starter) steps: v <- m v + (1 - m) g; theta <- theta - lr v
    (torch's SGD leaves out the 1 - m and starts v at g)."""

    def __init__(self, params, lr, momentum=0.9):
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if "velocity" not in state:
                    state["velocity"] = torch.zeros_like(p)
                velocity = state["velocity"]
                velocity.mul_(group["momentum"]).add_(p.grad, alpha=1.0 - group["momentum"])
                p.sub_(velocity, alpha=group["lr"])


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
        self.vector_scale = None
        if cfg.safe_mutations == "SM-VECTOR":
            self.vector_scale = sensitivity_scale(
                load_sensitivity_vector(cfg.safe_mutation_vector, self.n), "SM-VECTOR", cfg.safe_mutation_underflow
            )
        if cfg.algorithm == "nes":
            self.theta = torch.nn.Parameter(theta)
            if cfg.optimizer == "adam":
                self.optimizer = torch.optim.Adam([self.theta], lr=cfg.stepsize)
            else:
                self.optimizer = SourceSGD([self.theta], lr=cfg.stepsize, momentum=0.9)
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

    def _factor(self, base):
        """The safe-mutation factor f (n,) for mutating the vector `base`, or None (f = 1)."""
        kind = self.cfg.safe_mutations
        if kind == "SM-PROPORTIONAL":
            return proportional_scale(base)
        if kind == "SM-VECTOR":
            return self.vector_scale
        return self.state["scale"] if kind == "SM-G-SUM" else None

    def _delta(self, t, index, factor):
        """Perturbation `index` of iteration t: sigma * f * eps."""
        eps = perturbation(self.cfg.seed, t, index, self.n)
        return self.state["sigma"] * (eps if factor is None else eps * factor)

    def _update_scale(self, t):
        cfg = self.cfg
        if cfg.safe_mutations != "SM-G-SUM" or t % cfg.safe_mutation_every:
            return
        set_flat_params(self.model, self.current())
        self.model.eval()
        batch = next(iter(self.reference.values())).shape[0]
        sensitivity = output_sensitivity(self.model, greedy_step_outputs(self.model, self.reference), batch)
        self.state["scale"] = sensitivity_scale(sensitivity, "SM-G-SUM", cfg.safe_mutation_underflow)

    def _schedule_due(self, t):
        """Whether generation t + 1 (1-based) is one the schedule anneals before."""
        cfg, generation = self.cfg, t + 1
        return (
            cfg.annealing == "schedule"
            and generation >= cfg.schedule_start
            and (generation - cfg.schedule_start) % cfg.schedule_limit == 0
        )

    def iteration(self, t):
        """Score lambda offspring of iteration t and update -> statistics of the iteration."""
        self._update_scale(t)
        annealed = self._schedule_due(t)
        if annealed:
            self._anneal(t, "schedule")
        start = time.perf_counter()
        stats = self._nes(t) if self.cfg.algorithm == "nes" else self._ga(t)
        improved = (
            stats["best_fitness"] > self.state["best_fitness"]
            if self.cfg.algorithm == "nes"
            else stats.pop("new_elite")
        )
        self.state["best_fitness"] = max(self.state["best_fitness"], stats["best_fitness"])
        self.state["since_best"] = 0 if improved else self.state["since_best"] + 1
        if self.cfg.annealing == "patience" and self.state["since_best"] >= self.cfg.patience_iterations:
            self._anneal(t, "patience")
            annealed = True
        if annealed and self.cfg.algorithm == "nes":  # after this generation's update, as the source
            self.state["stepsize"] /= self.cfg.stepsize_divisor
            for group in self.optimizer.param_groups:
                group["lr"] = self.state["stepsize"]
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
        cfg, lam = self.cfg, self.cfg.offspring
        theta = self.theta.detach()
        factor = self._factor(theta)

        def offspring(i):
            index, sign = (i // 2, 1.0 - 2.0 * (i % 2)) if cfg.mirrored else (i, 1.0)
            rows = self._batch(t, 0 if cfg.single_batch else index)
            return self.fitness(theta + sign * self._delta(t, index, factor), rows, seed=_sample_seed(cfg.seed, t, i))

        fitness, sent = _score_all(offspring, lam)
        grad = nes_gradient(
            centred_ranks(fitness.float()),
            lambda j: self._delta(t, j, factor),
            cfg.mirrored,
        )
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
        cfg, lam = self.cfg, self.cfg.offspring
        gen = generator_for(cfg.seed, t, "select")
        if cfg.selection == "uniform":
            chosen = torch.randint(cfg.population, (lam,), generator=gen)
        else:
            entrants = torch.randint(cfg.population, (lam, cfg.tournament_size), generator=gen)
            chosen = entrants.gather(1, self.parent_fitness[entrants].argmax(dim=1, keepdim=True))[:, 0]

        def child(i):
            parent = self.parents[chosen[i]]
            return parent + self._delta(t, i, self._factor(parent))

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

    def _anneal(self, t, why):
        """Divide the noise stdev and grow the batch (the stepsize follows after the update)."""
        s = self.state
        s["sigma"] /= self.cfg.stdev_divisor
        s["batch_size"] = min(self.n_train, int(round(s["batch_size"] * self.cfg.bs_multiplier)))
        s["annealings"] += 1
        s["since_best"] = 0
        print(
            f"iteration {t}: annealed by {why} (annealing {s['annealings']}): noise stdev {s['sigma']:.3g}, batch {s['batch_size']}",
            flush=True,
        )


def nes_gradient(weights, delta, mirrored):
    """g = sum_i w_i delta_i / lambda for shaped fitnesses w (lambda,) and perturbations
    delta(j) = sigma * f * eps_j; mirrored: offspring 2j and 2j + 1 are +delta_j and -delta_j."""
    lam = len(weights)
    if mirrored:
        pairs = [(float(weights[2 * j] - weights[2 * j + 1]), j) for j in range(lam // 2)]
    else:
        pairs = [(float(weights[i]), i) for i in range(lam)]
    grad = None
    for w, j in pairs:
        term = w * delta(j)
        grad = term if grad is None else grad + term
    return grad / lam


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
    ref_rows = torch.randperm(n_train, generator=generator_for(cfg.seed, -1, "reference"))[: cfg.safe_mutation_batch]
    reference = {k: v.to(device) for k, v in train_data.features.get(sorted(ref_rows.tolist())).items()}
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
        file_stamp(cfg.safe_mutation_vector) if cfg.safe_mutation_vector else None,
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
