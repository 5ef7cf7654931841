"""What a run reads and what it will need, checked before any job: a preset runs alone
(the command of docs/presets.md plans only its experiments), `prefetch` plans exactly the
downloads the config in use needs, and a model_args typo stops the dry run in one line."""

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
import torchvision
import yaml

from captionflow.data.cuhk_pedes import write_demo_reid_raw
from captionflow.data.demo import make_demo_dataset
from tests.workflow.conftest import REPO, TINY, Workflow, jobs, merge

# The data stages every preset plans, then per preset its own jobs (one experiment each).
DATA = {"resize_images": 1, "prepro_labels": 1, "prepro_cider_df": 1}
PER_STAGE = {"report_metrics_job": 1, "export_model_job": 1, "plot_experiment_job": 1, "report_tables": 1, "all": 1}
PRESET_JOBS = {
    "expansionnet_v2_coco": {
        **DATA,
        **PER_STAGE,
        "extract_features": 1,
        "train_xe_job": 1,
        "finetune_e2e_job": 1,
        "regenerate_features_job": 1,
        "train_scst_job": 1,
        "train_scst_e2e_job": 1,
        "regenerate_scst_e2e_features_job": 1,
        "evaluate_job": 4,
        "plot_attention_job": 1,
    },
    "aoanet_coco": {
        **DATA,
        **PER_STAGE,
        "import_bottomup": 1,
        "train_xe_job": 1,
        "train_scst_job": 1,
        "evaluate_job": 2,
    },
    "show_attend_tell_coco": {  # XE only: no reward, so no CIDEr-D document frequencies
        **{job: n for job, n in DATA.items() if job != "prepro_cider_df"},
        **PER_STAGE,
        "extract_features": 1,
        "train_xe_job": 1,
        "evaluate_job": 1,
        "plot_attention_job": 1,
    },
    # NIC-ES / NIC-NES: XE then ES on the bottom-up features; fc has no attention to plot
    **{
        preset: {**DATA, **PER_STAGE, "import_bottomup": 1, "train_xe_job": 1, "train_es_job": 1, "evaluate_job": 2}
        for preset in ("nic_es_coco", "nic_nes_coco")
    },
    # GNA-RNN person search: retrieval only (no captioner job, nothing to export or score as
    # captions), on CUHK-PEDES imported from its reid_raw.json
    "gna_rnn_cuhk_pedes": {
        "import_cuhk_pedes": 1,
        "resize_images": 1,
        "prepro_labels": 1,
        "extract_features": 1,
        "train_retrieval_job": 1,
        "evaluate_retrieval_job": 1,
        "report_tables": 1,
        "all": 1,
    },
}
PRESETS = sorted(p.stem for p in (REPO / "presets").glob("*.yaml"))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project folder holding what the presets point at: data/coco (a small Karpathy
    file and its images), data/cuhk_pedes (a generated reid_raw.json and its images) and the
    bottom-up TSV files (empty: a dry run only needs them)."""
    root = tmp_path_factory.mktemp("project")
    coco = root / "data/coco"
    make_demo_dataset(
        coco / "dataset_coco.json",
        coco / "images/images",
        {"train": 6, "restval": 0, "val": 2, "test": 2},
        seed=0,
        min_side=32,
        max_side=40,
    )
    pedes = root / "data/cuhk_pedes"
    write_demo_reid_raw(pedes / "reid_raw.json", n_ids=6, images_per_id=2, seed=0, images_root=pedes / "imgs")
    for preset in PRESETS:
        for tsv in yaml.safe_load((REPO / f"presets/{preset}.yaml").read_text())["features"].get("tsv", []):
            (root / tsv).parent.mkdir(parents=True, exist_ok=True)
            (root / tsv).touch()
    return root


def test_every_preset_has_its_expected_jobs():
    assert sorted(PRESET_JOBS) == PRESETS


@pytest.mark.parametrize("preset", PRESETS)
def test_the_documented_preset_command_plans_only_the_presets_experiments(project, preset):
    """docs/presets.md: `snakemake -s <repo>/Snakefile --configfile <repo>/presets/X.yaml --cores all`
    in a project folder, here one with a config.yaml of its own: neither it nor the demo
    config is merged under the preset, and the banner says which file is read."""
    own = Workflow(project, {"experiments": {"mine": {"model": "fc", "stages": ["xe"]}}})  # writes config.yaml
    path = REPO / f"presets/{preset}.yaml"
    result = own.run("-n", "--configfile", str(path))
    assert jobs(result) == PRESET_JOBS[preset]
    assert f"captionflow: config from --configfile {path} (nothing else merged" in result.stderr
    experiments = yaml.safe_load(path.read_text())["experiments"]
    words = (result.stdout + result.stderr).split()
    planned = {word.split("/")[1] for word in words if word.startswith("results/") and "/test/" in word}
    assert planned == set(experiments)


def test_a_model_args_typo_fails_the_dry_run_in_one_line(tmp_path):
    config = merge(
        TINY,
        {
            "experiments": {
                "sat": {"model": "show_attend_tell", "model_args": {"hiden_size": 32}, "stages": ["xe"]},
            }
        },
    )
    workflow = Workflow(tmp_path / "wf", config)
    proc = workflow.run("-n", check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    line = next(line for line in out.splitlines() if line.startswith("invalid config"))
    assert line == (
        "invalid config at experiments.sat.model_args: model show_attend_tell has no option(s) hiden_size; "
        "its options: embed_size, hidden_size, att_size, dropout, alpha_reg, readout_activation, alpha_reg_average"
    )
    assert "Traceback" not in out and not (workflow / "results").exists()
    # the retrieval model's options are checked the same way
    config["experiments"]["sat"]["model_args"] = {"hidden_size": 32}
    config["experiments"]["sat"]["retrieval"] = {"model": "dual_encoder", "model_args": {"hidden_size": 32}}
    workflow.set_config(config)
    proc = workflow.run("-n", check=False)
    assert (
        "invalid config at experiments.sat.retrieval.model_args: retrieval model dual_encoder has no option(s) hidden_size"
        in proc.stdout + proc.stderr
    )


FC = {"fc": {"model": "fc", "model_args": {"embed_size": 16, "hidden_size": 32}, "stages": ["xe"]}}


@pytest.mark.parametrize(
    "config, planned",
    [
        # the demo: random-init weights, nothing to download but SPICE's jars for evaluate
        (yaml.safe_load((REPO / "config.yaml").read_text()), {"prefetch_spice": 1, "prefetch": 1}),
        (
            {"experiments": FC, "features": {"backbone": "resnet101", "weights": "imagenet"}},
            {"prefetch_spice": 1, "prefetch_weights": 1, "prefetch": 1},
        ),
        (
            {"features": {"backbone": "swin_large_patch4_window12_384", "weights": "imagenet"}},
            {"prefetch_weights": 1, "prefetch": 1},
        ),
        (
            {"experiments": FC, "features": {"backbone": "fasterrcnn_resnet50_fpn", "weights": "coco"}},
            {"prefetch_spice": 1, "prefetch_weights": 1, "prefetch": 1},
        ),
        (
            {"experiments": FC, "features": {"backbone": "resnet101", "weights": "weights/resnet101.pth"}},
            {"prefetch_spice": 1, "prefetch": 1},
        ),
    ],
    ids=["demo", "resnet101-imagenet", "swin-imagenet-no-experiments", "detector-coco", "local-weights-file"],
)
def test_prefetch_plans_exactly_what_the_config_needs(tmp_path, config, planned):
    proc = Workflow(tmp_path / "wf", config).run("-n", "prefetch")
    assert jobs(proc) == planned
    backbone = config["features"]["backbone"]
    assert (f"results/prefetch/weights/{backbone}.json" in proc.stdout + proc.stderr) == ("prefetch_weights" in planned)


def test_prefetch_says_what_it_fetched_and_where(tmp_path, monkeypatch):
    """Offline: the weights already in the hub cache (as on a node that shares it) are found,
    nothing is downloaded, and the run says where they are. No experiments: no SPICE jars."""
    torch_home = tmp_path / "torch"
    checkpoint = (
        torch_home / "hub/checkpoints" / Path(torchvision.models.get_model_weights("resnet18").DEFAULT.url).name
    )
    checkpoint.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), checkpoint)
    monkeypatch.setenv("TORCH_HOME", str(torch_home))  # inherited by snakemake and its jobs
    workflow = Workflow(tmp_path / "wf", {"features": {"backbone": "resnet18", "weights": "imagenet"}})
    proc = workflow.run("prefetch")
    assert jobs(proc) == Counter({"prefetch_weights": 1, "prefetch": 1})
    assert f"prefetch: resnet18 ImageNet weights: already in {checkpoint}" in proc.stdout + proc.stderr
    assert json.loads((workflow / "results/prefetch.json").read_text()) == [
        {"what": "resnet18 ImageNet weights", "where": str(checkpoint), "downloaded": False}
    ]
