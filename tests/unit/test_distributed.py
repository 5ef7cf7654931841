"""Multi-process training under torchrun with the gloo backend (what `gpus: N` runs on GPUs
with nccl): the same results contract as single-process training."""

import time

import pytest
import torch

from captionflow.config import build
from captionflow.models import checkpoint
from captionflow.training import distributed, xe
from captionflow.training.xe import XEConfig

FC = {"embed_size": 64, "hidden_size": 128, "dropout": 0.2}


def _kwargs(data, out, cfg):
    return dict(
        features_train=data / "train.h5",
        features_val=data / "val.h5",
        labels_h5=data / "labels.h5",
        labels_json=data / "labels.json",
        references=data / "references.json",
        out_checkpoint=out / "model.pt",
        out_history=out / "history.tsv",
        model_name="fc",
        model_args=FC,
        cfg=cfg,
        threads=2,
    )


def test_shard_splits_a_global_batch_and_never_leaves_a_rank_empty(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    shares = {}
    for r in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        shares[r] = (distributed.shard(list(range(7))), distributed.shard([42]))
    assert sorted(shares[0][0] + shares[1][0]) == list(range(7))
    assert shares[0][1] == shares[1][1] == [42]  # a last batch of one: both ranks take part


@pytest.mark.slow
def test_torchrun_gloo_training_matches_single_process(small_demo, tmp_path, report_figure):
    cfg = build(XEConfig, epochs=4, batch_size=50, lr=2e-3, warmup_steps=10, patience=4, device="cpu")
    scores, seconds = {}, {}
    for name, processes, seed in (("single", 1, 0), ("single_seed1", 1, 1), ("ddp", 2, 0)):
        started = time.time()
        distributed.launch(
            xe.train,
            processes,
            **_kwargs(small_demo, tmp_path / name, build(XEConfig, **{**cfg.__dict__, "seed": seed})),
        )
        seconds[name] = time.time() - started
        scores[name] = checkpoint.load(tmp_path / name / "model.pt")["val_cider_d"]
    noise = abs(scores["single"] - scores["single_seed1"])  # what another seed changes
    report_figure(
        f"XE fc, 300 demo images, 4 epochs, val CIDEr-D: 1 process {scores['single']:.3f} "
        f"(seed 1: {scores['single_seed1']:.3f}), torchrun 2 x gloo {scores['ddp']:.3f}; "
        f"wall {seconds['single']:.0f} s vs {seconds['ddp']:.0f} s (incl. torchrun start)"
    )
    assert abs(scores["ddp"] - scores["single"]) <= max(2 * noise, 0.05)
    assert scores["ddp"] > 0.2  # it learned something
    # a plain single-process checkpoint (tests/slurm evaluates one with the evaluate rule)
    assert checkpoint.load_model(tmp_path / "ddp/model.pt")[0].registry_name == "fc"
    ddp, single = torch.load(tmp_path / "ddp/model.pt"), torch.load(tmp_path / "single/model.pt")
    assert ddp["model"].keys() == single["model"].keys()  # no "module." prefix
