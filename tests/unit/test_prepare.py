"""`captionflow prepare`: each input format converts to a caption file that the workflow's
loader reads back with the same images, captions and splits; every bad record is one
stderr line naming its position, and the exit status says records were rejected."""

import csv
import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from captionflow.data import prepare
from captionflow.data.demo import make_demo_dataset
from captionflow.data.karpathy import load_karpathy, tokenize
from tests.conftest import scaled

REPO = Path(__file__).resolve().parents[2]
N_IMAGES = 12


@pytest.fixture
def demo(tmp_path):
    """12 demo images in photos/images/ -> (photos root, {path under images/: [raw captions]})."""
    make_demo_dataset(
        tmp_path / "demo.json", tmp_path / "photos/images", {"train": N_IMAGES}, seed=5, min_side=32, max_side=32
    )
    data = json.loads((tmp_path / "demo.json").read_text())
    (tmp_path / "demo.json").unlink()
    return tmp_path / "photos", {img["filename"]: [s["raw"] for s in img["sentences"]] for img in data["images"]}


def unique_captions(captions):
    """What the converter keeps of one image's captions: the first of each set of words."""
    seen, out = set(), []
    for raw in captions:
        if tuple(tokenize(raw)) not in seen:
            seen.add(tuple(tokenize(raw)))
            out.append(raw)
    return out


def write_csv(path, rows, header=("image", "caption")):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(dict(zip(("image", "caption", "split"), row))) + "\n" for row in rows))
    return path


def write_coco(path, images, first_id):
    """A COCO captions file for {file name: [captions]} with ids from first_id."""
    ids = {name: first_id + i for i, name in enumerate(images)}
    annotations = [
        {"id": len(ids) * 10 + k, "image_id": ids[name], "caption": c}
        for name, caps in images.items()
        for k, c in enumerate(caps)
    ]
    path.write_text(
        json.dumps({"images": [{"id": i, "file_name": name} for name, i in ids.items()], "annotations": annotations})
    )
    return ids


def captionflow(*args, cwd):
    """The real command line, `python -m captionflow.cli prepare ...`, with this checkout's code."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "captionflow.cli", "prepare", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
    )


def snapshot(folder):
    return {
        p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def git_status():
    return subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout


def problem_lines(stderr, tmp_path):
    """The bad-record lines (each names a position under tmp_path), without the prefix."""
    prefix = f"captionflow prepare: {tmp_path}/"
    return [line[len(prefix) :] for line in stderr.splitlines() if line.startswith(prefix)]


def read_back(out):
    """The converted file through the workflow's loader -> {file_path: record}."""
    return {rec.file_path: rec for rec in load_karpathy(out)}


def assert_same_captions(records, expected):
    assert sorted(records) == sorted(expected)
    for path, rec in records.items():
        assert list(rec.raw) == unique_captions(expected[path]), path
        assert [list(c) for c in rec.captions] == [tokenize(raw) for raw in rec.raw], path


def splits_of(records):
    return {split: {p for p, r in records.items() if r.split == split} for split in ("train", "restval", "val", "test")}


# --- round trips, one per format


def test_folder_round_trip(demo, tmp_path):
    root, expected = demo
    for name, captions in expected.items():
        (root / "images" / name).with_suffix(".txt").write_text("\n".join(captions) + "\n")
    out = tmp_path / "captions.json"
    before, status = snapshot(tmp_path), git_status()

    assert prepare.main([str(root / "images"), "-o", str(out), "--val", "2", "--test", "3", "--seed", "1"]) == 0

    records = read_back(out)
    assert_same_captions(records, expected)  # the folder itself is the images root
    assert all((root / "images" / p).is_file() for p in records)
    assert {s: len(paths) for s, paths in splits_of(records).items()} == {"train": 7, "restval": 0, "val": 2, "test": 3}
    after = snapshot(tmp_path)
    assert set(after) - set(before) == {out.relative_to(tmp_path)} and all(after[p] == h for p, h in before.items())
    assert git_status() == status


def test_csv_round_trip_splits_are_seeded_disjoint_and_independent_of_row_order(demo, tmp_path):
    root, expected = demo
    rows = [(f"images/{name}", c) for name, captions in expected.items() for c in captions]
    shuffled = random.Random(0).sample(rows, len(rows))
    outs = {}
    for name, seed, data in (("a", 0, rows), ("b", 0, shuffled), ("c", 1, rows)):
        source = write_csv(tmp_path / f"{name}.csv", data)
        outs[name] = tmp_path / f"{name}.json"
        assert (
            prepare.main(
                [
                    str(source),
                    "-o",
                    str(outs[name]),
                    "--images-root",
                    str(root),
                    "--val",
                    "0.25",
                    "--test",
                    "0.25",
                    "--seed",
                    str(seed),
                ]
            )
            == 0
        )

    records = read_back(outs["a"])
    assert_same_captions(records, {f"images/{n}": c for n, c in expected.items()})
    splits = splits_of(records)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [6, 3, 3]
    assert (
        set.union(*splits.values()) == set(records) and sum(map(len, splits.values())) == N_IMAGES
    )  # disjoint, complete
    again = splits_of(read_back(outs["b"]))
    assert again == splits  # same seed, rows in another order: the same draw
    assert splits_of(read_back(outs["c"]))["test"] != splits["test"]  # another seed, another draw


def test_jsonl_round_trip_keeps_a_given_split_and_merges_with_csv(demo, tmp_path):
    root, expected = demo
    names = list(expected)
    given = {names[0]: "test", names[1]: "val", names[2]: "restval"}
    rows = [(f"images/{n}", c, given.get(n, "")) for n in names[:8] for c in expected[n]]
    source = write_jsonl(tmp_path / "captions.jsonl", rows)
    # the other images come from a CSV; one image of the JSON Lines file gets one more caption there
    extra = write_csv(
        tmp_path / "more.csv",
        [(f"images/{n}", c) for n in names[8:] for c in expected[n]] + [(f"images/{names[3]}", "A brand new caption.")],
    )
    out = tmp_path / "out.json"

    assert (
        prepare.main([str(source), str(extra), "-o", str(out), "--images-root", str(root), "--val", "1", "--test", "1"])
        == 0
    )

    records = read_back(out)
    want = {f"images/{n}": c for n, c in expected.items()}
    want[f"images/{names[3]}"] = want[f"images/{names[3]}"] + ["A brand new caption."]
    assert_same_captions(records, want)
    assert {n: records[f"images/{n}"].split for n in given} == given  # kept as the source gave them
    splits = splits_of(records)
    assert (len(splits["val"]), len(splits["test"]), len(splits["train"])) == (2, 2, N_IMAGES - 5)


def test_coco_round_trip_maps_train_and_val_files_like_karpathy(demo, tmp_path):
    root, expected = demo
    names = list(expected)
    for folder, part in (("train2014", names[:8]), ("val2014", names[8:])):
        (root / folder).mkdir()
        for n in part:
            (root / "images" / n).rename(root / folder / n)
    train_ids = write_coco(tmp_path / "captions_train2014.json", {n: expected[n] for n in names[:8]}, first_id=100)
    val_ids = write_coco(tmp_path / "captions_val2014.json", {n: expected[n] for n in names[8:]}, first_id=500)
    out = tmp_path / "dataset_coco.json"

    assert (
        prepare.main(
            [
                str(tmp_path / "captions_train2014.json"),
                str(tmp_path / "captions_val2014.json"),
                "-o",
                str(out),
                "--images-root",
                str(root),
                "--val",
                "1",
                "--test",
                "1",
            ]
        )
        == 0
    )

    records = read_back(out)
    assert_same_captions(
        records, {f"train2014/{n}": expected[n] for n in names[:8]} | {f"val2014/{n}": expected[n] for n in names[8:]}
    )
    assert {p: r.id for p, r in records.items()} == {f"train2014/{n}": i for n, i in train_ids.items()} | {
        f"val2014/{n}": i for n, i in val_ids.items()
    }
    assert {p for p, r in records.items() if r.split == "train"} == {f"train2014/{n}" for n in names[:8]}
    assert sorted(r.split for p, r in records.items() if p.startswith("val2014/")) == [
        "restval",
        "restval",
        "test",
        "val",
    ]


# --- bad records: one line each, naming the position; exit 1 and nothing written, or --skip-bad


def bad_csv(root, tmp_path, expected):
    names = list(expected)
    # the quoted caption of line 3 runs on to line 4: a record is named by the line it starts on
    rows = [
        (f"images/{names[0]}", "A red circle."),
        (f"images/{names[1]}", "  ?!\n "),
        (f"images/{names[2]}", "x", "extra"),
        ("images/gone.jpg", "A lost photo."),
        (f"images/{names[3]}", "A blue box."),
    ]
    return (
        write_csv(tmp_path / "c.csv", rows),
        [
            "c.csv:3: caption '?!' of images/",
            "c.csv:5: 3 fields, expected 2",
            "c.csv:6: image images/gone.jpg not found",
        ],
        2,
    )


def bad_jsonl(root, tmp_path, expected):
    names = list(expected)
    path = write_jsonl(tmp_path / "c.jsonl", [(f"images/{names[0]}", "A red circle."), (f"images/{names[1]}", "")])
    with open(path, "a") as f:
        f.write('{"image": "images/x.jpg", "caption": \n')  # cut off
        f.write(json.dumps({"image": "../outside.jpg", "caption": "A cat."}) + "\n")
        f.write(json.dumps({"image": f"images/{names[3]}", "caption": "A blue box."}) + "\n")
    return (
        path,
        [
            "c.jsonl:2: caption '' of images/",
            "c.jsonl:3: not a JSON object",
            "c.jsonl:4: image '../outside.jpg' is absolute or has a '..' part",
        ],
        2,
    )


def bad_coco(root, tmp_path, expected):
    names = list(expected)
    path = tmp_path / "captions_mine.json"
    images = [
        {"id": 1, "file_name": f"images/{names[0]}"},
        {"id": 2, "file_name": "images/gone.jpg"},
        {"id": 1, "file_name": f"images/{names[1]}"},
        {"id": 3, "file_name": f"images/{names[3]}"},
        {"id": 4},
    ]
    annotations = [
        {"image_id": 1, "caption": "A red circle."},
        {"image_id": 2, "caption": "A lost one."},
        {"image_id": 3, "caption": "   "},
        {"image_id": 9, "caption": "Whose?"},
        {"image_id": 3, "caption": "A blue box."},
        {"image_id": 4, "caption": "A cat."},
    ]
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    lines = [
        "captions_mine.json: images[2]: id 1 is listed twice",
        "captions_mine.json: annotations[2]: caption '' of images/",
        "captions_mine.json: annotations[3]: image_id 9 is not an id",
        "captions_mine.json: images[1]: image images/gone.jpg not found",
        "captions_mine.json: images[4]: expected an object with an integer 'id' and a 'file_name'",
    ]
    return path, lines, 2


def bad_folder(root, tmp_path, expected):
    names = list(expected)[:5]
    for n in list(expected)[5:]:
        (root / "images" / n).unlink()
    (root / "images" / names[0]).with_suffix(".txt").write_text("A red circle.\n")
    (root / "images" / names[1]).with_suffix(".txt").write_text("\n \n")  # empty
    (root / "images" / names[2]).with_suffix(".txt").write_text("A green star.\n...\n")  # a line with no word
    (root / "images/stray.txt").write_text("A caption of nothing.\n")
    (root / "images" / names[4]).with_suffix(".txt").write_text("A blue box.\n")
    stem = Path(names[1]).stem
    lines = [
        f"{stem}.txt: empty",
        f"{Path(names[2]).stem}.txt:2: caption '...' of",
        f"{names[3]}: no caption file",
        "stray.txt: no image stray.jpg",
    ]
    return root / "images", lines, 3


@pytest.mark.parametrize("make", [bad_csv, bad_jsonl, bad_coco, bad_folder], ids=["csv", "jsonl", "coco", "folder"])
def test_bad_records_are_named_one_line_each_and_the_exit_status_says_so(make, demo, tmp_path):
    root, expected = demo
    source, wanted, n_good = make(root, tmp_path, expected)
    out = tmp_path / "out" / "captions.json"
    out.parent.mkdir()
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    options = ["-o", out, "--images-root", root, "--val", "0", "--test", "0"]
    before, status = snapshot(tmp_path), git_status()

    proc = captionflow(source, *options, cwd=elsewhere)

    assert proc.returncode == 1, proc.stderr
    found = sorted(line.removeprefix("photos/images/") for line in problem_lines(proc.stderr, tmp_path))
    assert len(found) == len(wanted), proc.stderr
    assert [sum(line.startswith(prefix) for line in found) for prefix in wanted] == [1] * len(wanted), proc.stderr
    assert f"nothing written to {out}" in proc.stderr
    assert snapshot(tmp_path) == before and git_status() == status  # nothing written anywhere

    proc = captionflow(source, *options, "--skip-bad", cwd=elsewhere)

    assert proc.returncode == 0, proc.stderr
    assert len(problem_lines(proc.stderr, tmp_path)) == len(wanted)  # still named
    records = load_karpathy(out)
    assert len(records) == n_good and all(r.split == "train" for r in records)
    assert "warning: no val and no test images" in proc.stderr  # extract_features would stop on them
    assert all(" ".join(c) in {"a red circle", "a blue box", "a green star"} for r in records for c in r.captions)
    assert sorted(os.listdir(out.parent)) == ["captions.json"] and os.listdir(elsewhere) == []  # no temp file left
    assert git_status() == status


def test_duplicates_image_listed_twice_and_captions_repeated(demo, tmp_path):
    root, expected = demo
    name = next(iter(expected))
    source = write_csv(
        tmp_path / "c.csv",
        [
            (f"images/{name}", "A red circle."),
            (f"./images//{name}", "a red circle"),
            (f"images/{name}", "A RED circle!"),
            (f"images/{name}", "A blue box."),
        ],
    )
    coco = tmp_path / "captions_x.json"
    coco.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": f"images/{name}"}, {"id": 2, "file_name": f"images/{name}"}],
                "annotations": [{"image_id": 1, "caption": "A cat."}],
            }
        )
    )
    out = tmp_path / "out.json"

    proc = captionflow(source, "-o", out, "--images-root", root, "--val", "0", "--test", "0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (rec,) = load_karpathy(out)
    assert rec.file_path == f"images/{name}" and rec.raw == (
        "A red circle.",
        "A blue box.",
    )  # one image, repeats dropped
    assert "2 duplicate captions dropped" in proc.stderr

    proc = captionflow(coco, "-o", out, "--images-root", root, "--val", "0", "--test", "0", cwd=tmp_path)
    assert proc.returncode == 1
    assert problem_lines(proc.stderr, tmp_path) == [
        f"captions_x.json: images[1]: image images/{name} is listed twice (also {coco}: images[0])"
    ]


def test_a_split_that_disagrees_is_a_bad_record(demo, tmp_path):
    root, expected = demo
    a, b = (f"images/{n}" for n in list(expected)[:2])
    source = write_csv(
        tmp_path / "c.csv",
        [(a, "A red circle.", "train"), (a, "A blue box.", "test"), (b, "A green star.", "val")],
        header=("image", "caption", "split"),
    )
    more = write_jsonl(tmp_path / "m.jsonl", [(b, "A pink ring.", "test")])

    proc = captionflow(
        source, more, "-o", tmp_path / "out.json", "--images-root", root, "--val", "0", "--test", "0", cwd=tmp_path
    )

    assert proc.returncode == 1
    assert problem_lines(proc.stderr, tmp_path) == [
        f"c.csv:3: image {a} has split test here but train at {source}:2",
        f"m.jsonl:1: image {b} has split test here but val at {source}:4",
    ]


def test_the_output_never_replaces_an_input_or_lands_outside_the_path_given(demo, tmp_path):
    root, expected = demo
    coco = tmp_path / "captions_x.json"
    write_coco(coco, {f"images/{n}": c for n, c in expected.items()}, first_id=1)
    before = snapshot(tmp_path)

    for out, message in (
        (coco, f"output {coco} is one of the inputs"),
        (tmp_path / "no/such/dir/out.json", "folder"),
        (tmp_path / "out.txt", "expected a .json file name"),
    ):
        proc = captionflow(coco, "-o", out, "--images-root", root, cwd=tmp_path)
        assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
        assert snapshot(tmp_path) == before and not (tmp_path / "no").exists()


def test_file_level_errors_are_one_line(demo, tmp_path):
    root, _ = demo
    for name, text, message in (
        ("h.csv", "file,text\na.jpg,A cat.\n", "h.csv:1: header ['file', 'text'] has no 'image' and 'caption' columns"),
        ("captions_bad.json", '{"images": []}', "expected an object with 'images' and 'annotations' lists"),
        ("b.jsonl", b"\xff\xfe", "not UTF-8 text"),
        (
            "gone.csv",
            "image,caption\ngone.jpg,A cat.\n",
            f"(1 bad records, the first: {tmp_path}/gone.csv:2: image gone.jpg not found",
        ),
    ):
        path = tmp_path / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        proc = captionflow(path, "-o", tmp_path / "o.json", "--images-root", root, cwd=tmp_path)
        assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, (
            proc.stderr
        )


@pytest.mark.slow
def test_a_converted_folder_runs_through_the_workflows_data_stages(tmp_path):
    """The guide's path end to end: photos with .txt sidecars -> `captionflow prepare` ->
    real Snakemake (resize_images, prepro_labels, extract_features) on the caption file."""
    from tests.workflow.conftest import SNAKEMAKE, jobs

    photos = tmp_path / "photos"
    make_demo_dataset(tmp_path / "demo.json", photos / "trip", {"train": 16}, seed=2, min_side=48, max_side=64)
    demo = json.loads((tmp_path / "demo.json").read_text())
    (tmp_path / "demo.json").unlink()
    for img in demo["images"]:
        (photos / "trip" / img["filename"]).with_suffix(".txt").write_text(
            "\n".join(s["raw"] for s in img["sentences"])
        )
    captions = tmp_path / "captions.json"
    assert captionflow(photos, "-o", captions, "--val", "3", "--test", "3", cwd=tmp_path).returncode == 0
    run = tmp_path / "my_run"
    run.mkdir()
    config = {
        "data": {"source": "karpathy", "karpathy_json": str(captions), "images_root": str(photos)},
        "resize": {"size": 32, "threads": 1},
        "labels": {"word_count_threshold": 0},
        "features": {"batch_size": 4, "num_workers": 0, "threads": 1},
    }
    (run / "config.yaml").write_text(json.dumps(config))  # YAML reads JSON
    before = snapshot(photos)

    proc = subprocess.run(
        [str(SNAKEMAKE), "-s", str(REPO / "Snakefile"), "--cores", "1"],
        cwd=run,
        capture_output=True,
        text=True,
        timeout=scaled(300),
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )

    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(jobs(proc)) == {"resize_images", "prepro_labels", "extract_features", "all"}
    converted = {rec.id: rec for rec in load_karpathy(captions)}
    index = json.loads((run / "results/data/labels.json").read_text())
    assert {(i["id"], i["split"], i["file_path"]) for i in index["images"]} == {
        (r.id, r.split, r.file_path) for r in converted.values()
    }
    references = json.loads((run / "results/data/references.json").read_text())
    assert {s: {int(k): tuple(v) for k, v in refs.items()} for s, refs in references.items()} == {
        s: {r.id: r.raw for r in converted.values() if r.split == s} for s in ("val", "test")
    }
    assert snapshot(photos) == before  # the user's photos are only read
