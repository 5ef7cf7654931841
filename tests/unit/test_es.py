"""train_es: NES and GA from an XE start, shared-seed distribution (2 processes = 1), exact
resume after a crash mid-iteration, safe mutations against the formula by hand."""

import pytest
import torch
from torch import nn

from captionflow.config import build
from captionflow.errors import CaptionflowError
from captionflow.metrics.cider import document_frequencies_from_labels
from captionflow.models import checkpoint
from captionflow.training import distributed, es, xe
from captionflow.training.es import ESConfig, centred_ranks
from captionflow.training.mutation import flat_params, mutation_scale, output_sensitivity, perturbation, set_flat_params
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


def test_linear_sensitivity_equals_the_formula_by_hand():
    # y = W x + b over a batch x_1, x_2: dy_k/dW_kj summed over the batch = sum_t x_tj (0 for
    # rows of other outputs), dy_k/db_k = 2 (the batch size): s = |sum_t x_tj| and 2
    layer = nn.Linear(3, 2)
    x = torch.tensor([[1.0, 2.0, 0.5], [3.0, -2.0, 0.25]])
    s = output_sensitivity(layer, lambda: layer(x).sum(dim=0))
    sums = x.sum(dim=0).abs()  # 4, 0, 0.75
    torch.testing.assert_close(s, torch.cat([sums, sums, torch.tensor([2.0, 2.0])]))
    scale = mutation_scale(layer, lambda: layer(x).sum(dim=0), "SM-G-SUM", underflow=0.1)
    # the underflow cap: the weight the outputs ignore (column 2 sums to 0) gets 1 / 0.1, not inf
    torch.testing.assert_close(scale, 1.0 / torch.cat([sums, sums, torch.tensor([2.0, 2.0])]).clamp_min(0.1))
    assert scale.max() == pytest.approx(10.0)
    proportional = mutation_scale(layer, lambda: layer(x).sum(dim=0), "SM-PROPORTIONAL", underflow=0.1)
    torch.testing.assert_close(proportional, scale / scale.mean())
    assert torch.equal(mutation_scale(layer, lambda: layer(x).sum(dim=0), "none", 0.1), torch.ones(8))


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
        fitness="greedy_logprob",
        selection="tournament",
        device="cpu",
    )
    es.train(**_kwargs(tiny_data, xe_start, tmp_path, cfg, init=False))
    assert checkpoint.load(tmp_path / "model.pt")["model_name"] == "fc"
    with pytest.raises(CaptionflowError, match="es.offspring 5 must be even with mirrored sampling"):
        es.train(**_kwargs(tiny_data, xe_start, tmp_path / "x", build(ESConfig, offspring=5)))


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
