"""train_es: NES and GA from an XE start, shared-seed distribution (2 processes = 1), exact
resume after a crash mid-iteration, safe mutations against the formula by hand."""

import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from captionflow.config import build
from captionflow.errors import CaptionflowError
from captionflow.metrics.cider import document_frequencies_from_labels
from captionflow.models import checkpoint
from captionflow.training import distributed, es, xe
from captionflow.training.es import ESConfig, centred_ranks
from captionflow.training.mutation import (
    flat_params,
    greedy_step_outputs,
    load_sensitivity_vector,
    output_sensitivity,
    perturbation,
    proportional_scale,
    sensitivity_scale,
    set_flat_params,
)
from captionflow.training.xe import XEConfig

FC = {"embed_size": 16, "hidden_size": 32, "dropout": 0.0}


@pytest.fixture(scope="module")
def xe_start(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("xe")
    d = tiny_data
    xe.train(
        d / "train.h5",
        d / "val.h5",
        d / "labels.h5",
        d / "labels.json",
        d / "references.json",
        out / "model.pt",
        out / "history.tsv",
        "fc",
        FC,
        build(XEConfig, epochs=2, batch_size=8, device="cpu"),
    )
    document_frequencies_from_labels(d / "labels.h5", d / "labels.json").save(out / "df.npz")
    return out


def _kwargs(data, start, out, cfg, init=True, threads=1):
    return dict(
        features_train=data / "train.h5",
        features_val=data / "val.h5",
        labels_h5=data / "labels.h5",
        labels_json=data / "labels.json",
        references=data / "references.json",
        cider_df=start / "df.npz",
        init_checkpoint=start / "model.pt" if init else None,
        model_name="fc",
        model_args=FC,
        out_checkpoint=out / "model.pt",
        out_history=out / "history.tsv",
        cfg=cfg,
        threads=threads,
    )


def _history(out):
    lines = (out / "history.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"))) for line in lines[1:]]


def test_sm_g_sum_scale_equals_the_formula_by_hand():
    # y = W x + b over a batch x_1, x_2 (B = 2): dY_k/dW_kj of the batch sum = sum_b x_bj (0 for
    # rows of other outputs), dY_k/db_k = 2: s = |sum_b x_bj| / 2 = 2, 0, 0.375 and 2 / 2 = 1
    layer = nn.Linear(3, 2)
    x = torch.tensor([[1.0, 2.0, 0.5], [3.0, -2.0, 0.25]])
    s = output_sensitivity(layer, lambda: layer(x).sum(dim=0), batch_size=2)
    torch.testing.assert_close(s, torch.tensor([2.0, 0.0, 0.375, 2.0, 0.0, 0.375, 1.0, 1.0]))
    # u = 0.5: clamped 2, 0.5, 0.5, 1 -> f = u / clamped: a weight below u keeps the plain noise
    f = sensitivity_scale(s, "SM-G-SUM", underflow=0.5)
    torch.testing.assert_close(f, torch.tensor([0.25, 1.0, 1.0, 0.25, 1.0, 1.0, 0.5, 0.5]))
    # two outputs of one weight vector, y_2 = 3 y_1: the squares add over the outputs before
    # the square root: s_w = sqrt(1 + 9) |dy_1/dw| / B
    single = nn.Linear(2, 1)
    x1 = torch.tensor([[1.0, -4.0]])
    s = output_sensitivity(single, lambda: torch.cat([single(x1)[0], 3 * single(x1)[0]]), batch_size=1)
    torch.testing.assert_close(s, torch.tensor([1.0, 4.0, 1.0]) * 10**0.5)


class _Scaled(nn.Module):
    """A stand-in captioner: every step's log-probabilities are h * w for image feature h."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([3.0, 4.0, -2.0]))

    def init_state(self, feats):
        return {"h": feats["fc"]}

    def step(self, tokens, state):
        return state["h"] * self.w, state


def test_sm_g_sum_of_a_captioner_by_hand():
    # last step's log-probabilities h_b w, groups of 2 words {w0, w1}, {w2}: summed over the
    # images, Y_1 = S sqrt(w0^2 + w1^2) = 5 S, Y_2 = S |w2|, S = sum_b |h_b| = 4 (B = 2);
    # s = (S |w0| / 5, S |w1| / 5, S) / B = (1.2, 1.6, 2); u = 1.5: f = (1, 1.5 / 1.6, 0.75)
    model = _Scaled()
    outputs = greedy_step_outputs(model, {"fc": torch.tensor([[1.0], [-3.0]])}, steps=5, group=2)
    s = output_sensitivity(model, outputs, batch_size=2)
    torch.testing.assert_close(s, torch.tensor([1.2, 1.6, 2.0]))
    torch.testing.assert_close(sensitivity_scale(s, "SM-G-SUM", 1.5), torch.tensor([1.0, 0.9375, 0.75]))


def test_sm_vector_and_sm_proportional_scales_by_hand(tmp_path):
    torch.save(torch.tensor([0.05, 0.2, 1.0, 0.4]), tmp_path / "s.pt")
    vector = load_sensitivity_vector(tmp_path / "s.pt", 4)
    # u = 0.1: clamped 0.1, 0.2, 1, 0.4, divided by their smallest (0.1) -> f = 1 / that
    torch.testing.assert_close(sensitivity_scale(vector, "SM-VECTOR", 0.1), torch.tensor([1.0, 0.5, 0.1, 0.25]))
    # none below u: divided by the smallest (0.25), not by u
    torch.testing.assert_close(
        sensitivity_scale(torch.tensor([0.25, 0.5, 1.0, 2.0]), "SM-VECTOR", 0.1), torch.tensor([1.0, 0.5, 0.25, 0.125])
    )
    with pytest.raises(CaptionflowError, match="must hold one tensor of 5 sensitivities"):
        load_sensitivity_vector(tmp_path / "s.pt", 5)
    # |theta|, zeros taking the mean |theta| = 3.5 / 5
    params = torch.tensor([0.0, -2.0, 1.0, 0.5, 0.0])
    torch.testing.assert_close(proportional_scale(params), torch.tensor([0.7, 2.0, 1.0, 0.5, 0.7]))


class _Scripted:
    """A fitness that returns the given values in call order and records what it scored
    (and the noise stdev it was scored with, once `evolution` is set)."""

    def __init__(self, values):
        self.values, self.calls, self.sigmas, self.evolution = list(values), [], [], None

    def __call__(self, params, rows, seed):
        self.calls.append(params.clone())
        if self.evolution is not None:
            self.sigmas.append(self.evolution.state["sigma"])
        return self.values[len(self.calls) - 1]


def _evolution(fitness, **settings):
    model = nn.Linear(2, 1)
    set_flat_params(model, torch.tensor([1.0, -2.0, 0.5]))
    cfg = build(ESConfig, device="cpu", batch_size=2, **settings)
    return es.Evolution(model, fitness, None, 4, cfg)


def test_one_nes_step_by_hand(monkeypatch):
    eps = {0: torch.tensor([1.0, 0.0, 2.0]), 1: torch.tensor([0.0, 1.0, -1.0])}
    monkeypatch.setattr(es, "perturbation", lambda seed, t, j, n: eps[j].clone())
    # offspring: theta + d0, theta - d0, theta + d1, theta - d1 (d_j = sigma eps_j), fitnesses 3, 1, 0, 2
    fitness = _Scripted([3.0, 1.0, 0.0, 2.0])
    theta = torch.tensor([1.0, -2.0, 0.5])
    evolution = _evolution(
        fitness, offspring=4, noise_stdev=0.1, optimizer="sgd", stepsize=0.5, l2coeff=0.01, safe_mutations="none"
    )
    evolution.iteration(0)
    for params, sign, j in zip(fitness.calls, (1, -1, 1, -1), (0, 0, 1, 1)):
        torch.testing.assert_close(params, theta + sign * 0.1 * eps[j])
    # centred ranks of 3, 1, 0, 2: 1/2, -1/6, -1/2, 1/6; pair weights 2/3 and -2/3
    # g = (2/3 * 0.1 * eps_0 - 2/3 * 0.1 * eps_1) / 4 = (eps_0 - eps_1) / 60 = (1, -1, 3) / 60
    # SGD (the source's): v = 0.1 * (-g + 0.01 theta); theta - 0.5 v
    g = torch.tensor([1.0, -1.0, 3.0]) / 60
    expected = theta - 0.5 * 0.1 * (-g + 0.01 * theta)
    torch.testing.assert_close(evolution.theta.detach(), expected)
    torch.testing.assert_close(expected, torch.tensor([1.000333333, -1.999833333, 0.502250]))


@pytest.mark.parametrize("kind", ["schedule", "patience"])
def test_annealing_generations_follow_the_source_and_have_no_cap(monkeypatch, kind):
    # schedule_start 2, schedule_limit 3: generations (1-based) 2, 5, 8 run annealed; patience
    # 2 with no improvement after generation 1: annealed after generations 3, 5, 7, 9 (4
    # annealings: no cap, the old one was 3)
    fitness = _Scripted([-float(i) for i in range(100)])
    evolution = _evolution(
        fitness,
        offspring=2,
        noise_stdev=1.0,
        stepsize=1.0,
        annealing=kind,
        schedule_start=2,
        schedule_limit=3,
        patience_iterations=2,
        stdev_divisor=2.0,
        stepsize_divisor=10.0,
        bs_multiplier=1.0,
    )
    fitness.evolution = evolution
    stepsizes = [evolution.iteration(t)["stepsize"] for t in range(9)]
    sigmas = fitness.sigmas[::2]  # the noise stdev each generation's offspring were scored with
    if kind == "schedule":  # annealed before generations 2, 5 and 8
        assert sigmas == [1.0, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.125, 0.125]
        # the stepsize follows after that generation's update
        assert stepsizes == pytest.approx([1.0, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 1e-3, 1e-3])
    else:  # annealed after generations 3, 5, 7 and 9 (2 without a better best fitness each)
        assert sigmas == [1.0, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.125, 0.125]
        assert stepsizes == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.01, 1e-3, 1e-3, 1e-4])
        assert evolution.state["annealings"] == 4 and evolution.state["sigma"] == 1 / 16


def test_sc_loss_and_greedy_logprob_fitness_by_hand():
    # caption 0 ends after one word (its end token counts), caption 1 runs to max_len
    seqs = torch.tensor([[5, 0, 0], [3, 4, 7]])
    lp = torch.log(torch.tensor([[0.5, 0.25, 1.0], [0.5, 0.5, 0.5]]))
    # -(0.2 (ln 0.5 + ln 0.25) - 0.1 * 3 ln 0.5) / 5 words = -(0.2 ln 1/8 - 0.1 ln 1/8) / 5 = 0.1 ln 8 / 5
    assert es.sc_loss_fitness(seqs, lp, [0.2, -0.1]) == pytest.approx(0.1 * math.log(8) / 5)
    # log10(p + 1/9) + log10 9 = log10(9 p + 1): p = 1 -> 1, p = 1/2 -> log10 5.5; CIDEr-D 2 and 0.5
    # (2 (1 + log10 5.5 * 0) ...): caption 0 words p 0.5, 0.25 -> log10 5.5, log10 3.25
    expected = (2 * (math.log10(5.5) + math.log10(3.25)) + 0.5 * 3 * math.log10(5.5)) / 5
    assert es.greedy_logprob_fitness(seqs, lp, [2.0, 0.5]) == pytest.approx(expected)


def test_noise_comes_back_from_its_seed_and_params_round_trip():
    assert torch.equal(perturbation(3, 7, 1, 10), perturbation(3, 7, 1, 10))
    assert not torch.equal(perturbation(3, 7, 1, 10), perturbation(3, 7, 2, 10))
    model = nn.Linear(3, 2)
    vec = torch.arange(8, dtype=torch.float32)
    set_flat_params(model, vec)
    assert torch.equal(flat_params(model), vec)


def test_centred_ranks():
    assert centred_ranks(torch.tensor([0.3, -1.0, 5.0])).tolist() == [0.0, -0.5, 0.5]


@pytest.mark.parametrize("algorithm", ["nes", "ga"])
def test_es_from_xe_raises_greedy_val_cider_over_the_start(tiny_data, xe_start, tmp_path, algorithm):
    cfg = build(
        ESConfig,
        algorithm=algorithm,
        iterations=8,
        offspring=8,
        population=3,
        noise_stdev=0.02,
        stepsize=0.01,
        batch_size=20,
        val_every=1,
        num_val_items=100,
        elite_batch_size=20,
        device="cpu",
    )
    es.train(**_kwargs(tiny_data, xe_start, tmp_path, cfg))
    start = checkpoint.load(xe_start / "model.pt")[
        "val_cider_d"
    ]  # the XE checkpoint ES starts from, on the same val images
    scores = [float(row["val_cider_d"]) for row in _history(tmp_path)]
    best = checkpoint.load(tmp_path / "model.pt")
    assert best["stage"] == "es" and best["val_cider_d"] == pytest.approx(max(scores), abs=1e-6)
    assert max(scores) > start  # evolution found weights the XE start did not have
    assert all(row["offspring_per_s"] and row["noise_stdev"] for row in _history(tmp_path))


class _Crash(Exception):
    pass


def test_crash_mid_iteration_resumes_to_identical_parameters(tiny_data, xe_start, tmp_path, monkeypatch, capsys):
    cfg = build(
        ESConfig,
        algorithm="nes",
        iterations=5,
        offspring=4,
        batch_size=8,
        val_every=2,
        num_val_items=6,
        safe_mutations="SM-G-SUM",
        safe_mutation_every=2,
        annealing="schedule",
        schedule_start=2,
        device="cpu",
    )
    es.train(**_kwargs(tiny_data, xe_start, tmp_path / "ref", cfg))
    real, calls = es.Fitness.__call__, {"n": 0}

    def crash_in_iteration_3(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3 * 4 + 2:  # the third offspring of iteration 3
            raise _Crash
        return real(self, *args, **kwargs)

    monkeypatch.setattr(es.Fitness, "__call__", crash_in_iteration_3)
    with pytest.raises(_Crash):
        es.train(**_kwargs(tiny_data, xe_start, tmp_path / "run", cfg))
    monkeypatch.setattr(es.Fitness, "__call__", real)
    capsys.readouterr()
    es.train(**_kwargs(tiny_data, xe_start, tmp_path / "run", cfg))
    assert "resuming from" in capsys.readouterr().out
    ref, run = checkpoint.load(tmp_path / "ref/model.pt"), checkpoint.load(tmp_path / "run/model.pt")
    assert all(torch.equal(ref["model"][k], run["model"][k]) for k in ref["model"])
    strip = [{k: v for k, v in row.items() if k != "offspring_per_s"} for row in _history(tmp_path / "ref")]
    assert strip == [{k: v for k, v in row.items() if k != "offspring_per_s"} for row in _history(tmp_path / "run")]


def test_random_init_start_and_bad_settings(tiny_data, xe_start, tmp_path):
    cfg = build(
        ESConfig,
        algorithm="ga",
        iterations=2,
        offspring=4,
        population=2,
        batch_size=8,
        val_every=1,
        num_val_items=4,
        fitness="sc_loss",
        selection="tournament",
        safe_mutations="SM-PROPORTIONAL",
        device="cpu",
    )
    es.train(**_kwargs(tiny_data, xe_start, tmp_path, cfg, init=False))
    assert checkpoint.load(tmp_path / "model.pt")["model_name"] == "fc"
    with pytest.raises(CaptionflowError, match="es.offspring 5 must be even with mirrored sampling"):
        es.train(**_kwargs(tiny_data, xe_start, tmp_path / "x", build(ESConfig, offspring=5)))
    with pytest.raises(CaptionflowError, match="safe_mutation_vector .* goes with es.safe_mutations: SM-VECTOR"):
        es.train(**_kwargs(tiny_data, xe_start, tmp_path / "x", build(ESConfig, safe_mutations="SM-VECTOR")))


def test_sm_vector_and_greedy_logprob_train(tiny_data, xe_start, tmp_path):
    model, _ = checkpoint.load_model(xe_start / "model.pt")
    n = flat_params(model).numel()
    torch.save(torch.linspace(0.0, 1.0, n), tmp_path / "sensitivity.pt")
    cfg = build(
        ESConfig,
        iterations=2,
        offspring=2,
        batch_size=8,
        val_every=1,
        num_val_items=4,
        fitness="greedy_logprob",
        safe_mutations="SM-VECTOR",
        safe_mutation_vector=str(tmp_path / "sensitivity.pt"),
        device="cpu",
    )
    es.train(**_kwargs(tiny_data, xe_start, tmp_path / "run", cfg))
    assert len(_history(tmp_path / "run")) == 2
    torch.save(torch.ones(3), tmp_path / "short.pt")
    with pytest.raises(CaptionflowError, match=f"must hold one tensor of {n} sensitivities"):
        es.train(
            **_kwargs(
                tiny_data,
                xe_start,
                tmp_path / "x",
                replace(cfg, safe_mutation_vector=str(tmp_path / "short.pt")),
            )
        )


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["nes", "ga"])
def test_two_processes_equal_one_and_exchange_only_fitnesses(tiny_data, xe_start, tmp_path, algorithm, report_figure):
    results = {}
    for lam in (4, 8):
        cfg = build(
            ESConfig,
            algorithm=algorithm,
            iterations=3,
            offspring=lam,
            population=2,
            batch_size=8,
            val_every=1,
            num_val_items=6,
            elite_batch_size=8,
            device="cpu",
        )
        for processes in (1, 2):
            out = tmp_path / f"{lam}_{processes}"
            distributed.launch(es.train, processes, **_kwargs(tiny_data, xe_start, out, cfg, threads=processes))
            results[lam, processes] = (checkpoint.load(out / "model.pt")["model"], _history(out))
        one, two = results[lam, 1], results[lam, 2]
        assert all(torch.equal(one[0][k], two[0][k]) for k in one[0])
        assert [r["val_cider_d"] for r in one[1]] == [r["val_cider_d"] for r in two[1]]
        assert {r["bytes_exchanged"] for r in one[1]} == {"0"}
    sent = {lam: int(results[lam, 2][1][0]["bytes_exchanged"]) for lam in (4, 8)}
    candidates = 2 + 1 if algorithm == "ga" else 0  # ga re-scores C candidates and the elite
    assert sent == {
        lam: 8 * (lam + candidates) for lam in (4, 8)
    }  # float64 fitnesses: O(lambda), whatever the model's size
    params = sum(v.numel() for v in results[4, 1][0].values())
    report_figure(
        f"ES {algorithm}: bytes exchanged per iteration by each of 2 processes: lambda 4 -> {sent[4]}, lambda 8 -> {sent[8]} ({params} parameters; a parameter vector would be {4 * params} bytes)"
    )
