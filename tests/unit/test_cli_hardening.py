"""`captionflow caption` against what users tried: -o onto an input or the bundle, a typo
among the inputs, FIFOs and broken links in folders, control characters in names, COCO
ids, odd numbers, --device cuda without CUDA, a PDF, an experiment folder as --model.

Every input lives in tmp_path: a test that overwrites one destroys nothing shared."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import captionflow.deploy.captioner as captioner_module
from captionflow import cli
from captionflow.cli import IMAGE_SUFFIXES, main
from tests.conftest import scaled
from tests.unit.conftest import _test_images

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def images(tiny_data, tmp_path):
    """A folder of three test images (a.jpg, b.jpg, c.jpg) in tmp_path."""
    folder = tmp_path / "images"
    folder.mkdir()
    for name, src in zip("abc", _test_images(tiny_data)):
        shutil.copy(src, folder / f"{name}.jpg")
    return folder


def _caption(capsys, *args):
    """Run `captionflow caption ARGS -q` in-process -> (exit status, stdout, stderr lines)."""
    status = main(["caption", *map(str, args), "-q"])
    out, err = capsys.readouterr()
    return status, out, err.splitlines()


def _one_line(err):
    return len(err) == 1 and err[0].startswith("captionflow caption: ") and "Traceback" not in err[0]


def _tree(root):
    """{relative path: (size, mtime_ns)} of every file and link below root, None for a folder."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            found[str(Path(folder, name).relative_to(root))] = None
        for name in files:
            st = Path(folder, name).lstat()
            found[str(Path(folder, name).relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return found


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading the bundle fails the test: a refusal must come before any work."""

    def loaded(*args, **kwargs):
        raise AssertionError("the bundle was loaded before the command was refused")

    monkeypatch.setattr(captioner_module, "Captioner", loaded)


def test_an_output_that_is_an_input_or_in_the_bundle_folder_is_refused_before_any_work(
    bundle, images, tmp_path, capsys, no_model_load
):
    own_bundle = shutil.copytree(bundle, tmp_path / "export")
    named = tmp_path / "named.jpg"
    shutil.copy(images / "a.jpg", named)
    link = tmp_path / "link.txt"
    link.symlink_to(images / "b.jpg")  # -o through a link onto an input
    before = _tree(tmp_path)
    for output in (
        images / "a.jpg",
        named,
        link,
        own_bundle / "bundle.pt",
        own_bundle / "bundle.json",
        own_bundle / "captions.txt",
    ):
        status, out, err = _caption(capsys, images, named, "--model", own_bundle, "-o", output)
        assert status == 2 and _one_line(err), (output, err)
        assert ("input image" in err[0]) if output.suffix == ".jpg" or output == link else ("bundle" in err[0])
        assert _tree(tmp_path) == before  # nothing written, nothing removed
    # the bundle file given by name, not its folder
    status, _, err = _caption(capsys, images, "--model", own_bundle / "bundle.pt", "-o", own_bundle / "bundle.pt")
    assert status == 2 and _one_line(err) and "is the bundle" in err[0]
    assert _tree(tmp_path) == before


def test_an_output_onto_a_folder_or_into_a_missing_folder_is_refused_up_front(
    bundle, images, tmp_path, capsys, no_model_load
):
    before = _tree(tmp_path)
    for output, said in (
        (images, "is a folder"),
        (tmp_path / "missing/captions.txt", "does not exist"),
        (images / "a.jpg/x.txt", "is not a folder"),
    ):
        status, _, err = _caption(capsys, images, "--model", bundle, "-o", output)
        assert status == 2 and _one_line(err) and said in err[0], (output, err)
    assert _tree(tmp_path) == before and not (tmp_path / "missing").exists()


def test_the_output_is_replaced_only_when_every_input_was_captioned(bundle, images, tmp_path, capsys, monkeypatch):
    captions = tmp_path / "out/captions.txt"
    captions.parent.mkdir()
    captions.write_text("old captions\n")
    captions.chmod(0o640)

    # a typo among the inputs: refused, the old file untouched
    status, _, err = _caption(capsys, images / "a.jpg", images / "typo.jpg", "--model", bundle, "-o", captions)
    assert status == 2 and _one_line(err) and "typo.jpg: no such file or folder" in err[0]
    assert captions.read_text() == "old captions\n"

    # a write that fails half-way leaves the old file and no temporary file
    real_write = cli._write

    def fails_half_way(results, fmt, out):
        real_write(results[:1], fmt, out)
        raise cli.CaptionflowError("the disk went away")

    monkeypatch.setattr(cli, "_write", fails_half_way)
    status, _, err = _caption(capsys, images, "--model", bundle, "-o", captions)
    assert status == 2 and "the disk went away" in err[-1]
    assert captions.read_text() == "old captions\n" and os.listdir(captions.parent) == ["captions.txt"]
    monkeypatch.setattr(cli, "_write", real_write)

    # captioning that fails on the second batch writes nothing
    real_caption = captioner_module.Captioner.caption_tensors
    calls = []

    def second_batch_fails(self, prepared, **options):
        calls.append(len(prepared))
        if len(calls) == 2:
            raise cli.CaptionflowError("the model failed")
        return real_caption(self, prepared, **options)

    monkeypatch.setattr(captioner_module.Captioner, "caption_tensors", second_batch_fails)
    status, _, err = _caption(capsys, images, "--model", bundle, "-o", captions, "--batch-size", 1)
    assert status == 2 and len(calls) == 2 and captions.read_text() == "old captions\n"
    monkeypatch.setattr(captioner_module.Captioner, "caption_tensors", real_caption)

    # the control: a run that succeeds replaces the file, keeping its permissions
    status, _, _ = _caption(capsys, images, "--model", bundle, "-o", captions)
    lines = captions.read_text().splitlines()
    assert status == 0 and [line.split("\t")[0] for line in lines] == [str(images / f"{n}.jpg") for n in "abc"]
    assert os.listdir(captions.parent) == ["captions.txt"] and captions.stat().st_mode & 0o777 == 0o640


@pytest.mark.timeout(120)  # a FIFO that is opened blocks: then this fails instead of hanging
def test_entries_of_a_folder_that_are_not_read_are_named_counted_and_exit_1(
    bundle, images, tmp_path, capsys, monkeypatch
):
    os.mkfifo(images / "pipe.jpg")
    (images / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (images / "loop.jpg").symlink_to(images / "loop.jpg")
    (images / "up").symlink_to(images)  # a folder link back to its parent
    locked = images / "locked"
    locked.mkdir()
    shutil.copy(images / "a.jpg", locked / "d.jpg")
    real_scandir = os.scandir

    def scandir(path="."):  # chmod 000 does not stop root: refuse the folder as the kernel would
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    captions = tmp_path / "captions.txt"
    status, _, err = _caption(capsys, images, "--model", bundle, "-o", captions)
    assert status == 1
    assert [line.split("\t")[0] for line in captions.read_text().splitlines()] == [
        str(images / f"{n}.jpg") for n in "abc"
    ]
    said = {
        "pipe.jpg": "FIFO",
        "gone.jpg": "dangling symlink",
        "loop.jpg": "symlink loop",
        "up": "symlink loop",
        "locked": "cannot be read",
    }
    for name, reason in said.items():
        lines = [line for line in err if line.startswith(f"captionflow caption: {images / name}: ")]
        assert len(lines) == 1 and reason in lines[0], (name, err)
    assert err[-1] == "captionflow caption: captioned 3 images, skipped 5 (named above)"


def test_text_output_escapes_control_characters_in_names(bundle, images, tmp_path, capsys):
    folder = tmp_path / "odd"
    folder.mkdir()
    names = ["a\nb.jpg", "tab\there.jpg", "back\\slash.jpg", "cr\rx.jpg", "line\u2028sep.jpg"]
    for name in names:
        shutil.copy(images / "a.jpg", folder / name)
    shutil.copy(images / "a.jpg", os.fsencode(folder) + b"/\xff.jpg")  # a name that is not UTF-8
    captions = tmp_path / "captions.txt"
    status, _, err = _caption(capsys, folder, "--model", bundle, "-o", captions)
    assert status == 0, err
    records = captions.read_text(encoding="utf-8").splitlines()
    assert len(records) == len(names) + 1 and all(len(r.split("\t")) == 2 for r in records)
    written = {r.split("\t")[0] for r in records}
    assert str(folder / "a\\nb.jpg") in written and str(folder / "\\xff.jpg") in written
    # the escapes are Python's: unicode_escape reads the names back
    assert {w.encode().decode("unicode_escape") for w in written} - {str(folder / "\xff.jpg")} == {
        str(folder / n) for n in names
    }
    # nor a message line on stderr
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes/x.txt\ncaptionflow caption: forged.txt").write_text("not an image")
    status, _, err = _caption(capsys, tmp_path / "notes", "--model", bundle)
    assert status == 1 and len(err) == 2 and "x.txt\\ncaptionflow caption: forged.txt: not an image format" in err[0]


def test_coco_image_ids_are_unique_and_odd_digit_stems_do_not_crash(bundle, images, tmp_path, capsys):
    def ids(*names):
        folder = tmp_path / "coco" / str(len(os.listdir(tmp_path / "coco")))
        folder.mkdir()
        for name in names:
            shutil.copy(images / "a.jpg", folder / name)
        status, out, err = _caption(capsys, folder, "--model", bundle, "--format", "coco")
        assert status == 0 and not err, err
        return {Path(r["file_path"]).name: r["image_id"] for r in json.loads(out)}

    (tmp_path / "coco").mkdir()
    got = ids("000123.jpg", "1.jpg", "3.jpg", "x.jpg")  # x.jpg was given its running index, 3
    assert got["000123.jpg"] == 123 and got["1.jpg"] == 1 and got["3.jpg"] == 3 and len(set(got.values())) == 4
    got = ids("\u00b2.jpg", "7.jpg", "007.jpg", "y.jpg")  # "²".isdigit(), but int("²") fails; 7 twice
    assert len(set(got.values())) == 4 and all(isinstance(i, int) for i in got.values())
    assert ids("\u00b2.jpg", "7.jpg", "007.jpg", "y.jpg") == got  # the same inputs, the same ids


@pytest.mark.parametrize(
    "option, value, said",
    [
        ("--temperature", "nan", "must be a finite number above 0"),
        ("--temperature", "inf", "must be a finite number above 0"),
        ("--temperature", "0", "must be a finite number above 0"),
        ("--seed", str(2**70), "must be an integer from 0 to"),
        ("--seed", "-1", "must be an integer from 0 to"),
        ("--beam-size", "0", "must be an integer of at least 1"),
        ("--max-len", "-3", "must be an integer of at least 1"),
        ("--batch-size", "0", "must be an integer of at least 1"),
    ],
)
def test_numbers_are_checked_by_argparse(bundle, images, capsys, option, value, said):
    with pytest.raises(SystemExit) as exc:
        main(["caption", str(images / "a.jpg"), "--model", str(bundle), "--sample", option, value, "-q"])
    err = capsys.readouterr().err.splitlines()
    assert exc.value.code == 2 and err[-1].startswith(f"captionflow caption: error: argument {option}: {said}")
    assert err[-1].endswith(f"got {value!r}") and not any("Traceback" in line for line in err)


def test_device_cuda_without_cuda_is_said_in_cli_words(bundle, images, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    status, _, err = _caption(capsys, images, "--model", bundle, "--device", "cuda")
    assert status == 2 and _one_line(err)
    assert "--device cuda: CUDA is not available" in err[0] and "--device cpu" in err[0] and "stage" not in err[0]


def test_a_non_image_file_is_said_to_be_of_a_format_captionflow_does_not_read(bundle, images, tmp_path, capsys):
    pdf = tmp_path / "report.pdf"
    pdf.write_bytes(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n%%EOF\n")
    shutil.copy(pdf, images / "notes.pdf")
    status, out, err = _caption(capsys, pdf, images, "--model", bundle)
    assert status == 1 and len(out.splitlines()) == 3
    for path in (pdf, images / "notes.pdf"):
        line = next(line for line in err if line.startswith(f"captionflow caption: {path}: "))
        assert "not an image format captionflow reads (.pdf)" in line and "corrupt" not in line
        assert all(suffix in line for suffix in IMAGE_SUFFIXES)
    with pytest.raises(SystemExit):
        main(["caption", "--help"])
    help_text = capsys.readouterr().out
    assert all(suffix in help_text for suffix in IMAGE_SUFFIXES)


def test_an_experiment_folder_as_model_points_to_its_bundle(bundle, images, tmp_path, capsys):
    experiment = tmp_path / "results/sat"
    shutil.copytree(bundle, experiment / "export")
    status, _, err = _caption(capsys, images, "--model", experiment)
    assert (
        status == 2
        and _one_line(err)
        and f"use --model {experiment / 'export'}" in err[0]
        and "export it again" not in err[0]
    )
    status, _, err = _caption(
        capsys, images / "a.jpg", "--model", experiment / "export"
    )  # the control: that path works
    assert status == 0 and not err


def test_nothing_outside_tmp_path_changes(bundle, images, tiny_data, tmp_path):
    """A real run (and a refused one) writes its -o file and nothing else: not in the bundle,
    the inputs, the data they came from, the working tree or the current folder."""
    os.mkfifo(images / "pipe.jpg")
    (images / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (tmp_path / "out").mkdir()
    (tmp_path / "cwd").mkdir()
    git = ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=all"]
    outside = {root: _tree(root) for root in (bundle, tiny_data)}
    repo, inside = subprocess.run(git, capture_output=True, text=True, check=True).stdout, _tree(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [
        sys.executable,
        "-m",
        "captionflow.cli",
        "caption",
        str(images),
        "--model",
        str(bundle),
        "--format",
        "coco",
    ]
    proc = subprocess.run(
        [*command, "-o", str(tmp_path / "out/captions.json")],
        cwd=tmp_path / "cwd",
        env=env,
        capture_output=True,
        text=True,
        timeout=scaled(300),
    )
    assert (tmp_path / "out/captions.json").exists(), proc.stderr
    refused = subprocess.run(
        [*command, "-o", str(images / "a.jpg")],
        cwd=tmp_path / "cwd",
        env=env,
        capture_output=True,
        text=True,
        timeout=scaled(300),
    )
    assert refused.returncode == 2 and len(refused.stderr.splitlines()) == 1
    assert {root: _tree(root) for root in (bundle, tiny_data)} == outside
    assert subprocess.run(git, capture_output=True, text=True, check=True).stdout == repo
    after = _tree(tmp_path)
    assert set(after) - set(inside) == {"out/captions.json"} and {k: after[k] for k in inside} == inside
