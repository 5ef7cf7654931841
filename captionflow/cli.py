"""The `captionflow` command: caption your own images with an exported bundle, export ONNX.

    captionflow caption photo.jpg holiday/ --model results/<experiment>/export
    captionflow export-onnx results/<experiment>/export onnx/
    captionflow import-weights expansionnet --checkpoint rf_model.pth --tokens demo_coco_tokens.pickle --out en.pt

`caption` checks everything it can before it loads the model: the named inputs exist, `-o`
is a file in an existing folder and none of the inputs, nor the bundle; then it reads and
captions every image and only then writes `-o`, atomically (an error leaves the old file).
"""

import argparse
import errno
import json
import math
import os
import stat
import sys
import tempfile
import unicodedata
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from captionflow.data.resize import IMAGE_SUFFIXES
from captionflow.errors import CaptionflowError, disk_full_error

FORMATS = " ".join(sorted(IMAGE_SUFFIXES))
SEED_MAX = 2**64 - 1  # the largest seed torch.Generator.manual_seed takes
EXIT_STATUS = "exit status: 0 every image captioned; 1 something skipped (named on stderr) or nothing captioned; 2 a usage error (nothing written)"


def not_an_image(path):
    """Why a file is skipped for its format: the formats captionflow reads, in one line."""
    return f"not an image format captionflow reads ({path.suffix or 'no suffix'}); it reads {FORMATS}"


def _entry(path):
    """What `path` is, symlinks followed -> ("file" | "folder", its stat) or ("skip", why).

    Only stat is called: a FIFO is never opened (opening one blocks until a writer comes)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        if not os.path.islink(path):
            return "skip", "no such file or folder" if exc.errno == errno.ENOENT else f"cannot be read ({exc.strerror})"
        if exc.errno == errno.ELOOP:
            return "skip", "a symlink loop"
        if exc.errno == errno.ENOENT:
            return "skip", f"a dangling symlink (its target {os.readlink(path)} does not exist)"
        return "skip", f"a symlink whose target cannot be read ({exc.strerror})"
    if stat.S_ISDIR(st.st_mode):
        return "folder", st
    if stat.S_ISREG(st.st_mode):
        return "file", st
    special = (
        "a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "a device"
    )
    return "skip", f"{special}, not a regular file (not opened)"


def _walk(folder, ancestors, files, skipped):
    """Image files below `folder`, sorted by path, into `files`; every entry not read into
    `skipped` as (path, why). Hidden files (.name) are ignored; folders, symlinked ones too,
    are read unless they lead back to a folder above them (`ancestors`: their (dev, inode))."""
    try:
        with os.scandir(folder) as it:
            names = sorted(entry.name for entry in it)
    except OSError as exc:
        skipped.append((folder, f"folder cannot be read ({exc.strerror})"))
        return
    for name in names:
        path = folder / name
        kind, info = _entry(path)
        if name.startswith(".") and kind != "folder":
            continue
        if kind == "folder":
            key = (info.st_dev, info.st_ino)
            if key in ancestors:
                skipped.append((path, "a symlink loop (a link back to a folder above it)"))
            else:
                _walk(path, ancestors | {key}, files, skipped)
        elif kind == "file" and path.suffix.lower() in IMAGE_SUFFIXES:
            files.append(path)
        else:
            skipped.append((path, not_an_image(path) if kind == "file" else info))


def image_files(inputs):
    """Files named, or found in folders (recursively, sorted) -> (files, [(path, why skipped)]).

    A named path that is missing, or neither a file nor a folder, is a typo or a mistake
    of the command: CaptionflowError, before anything is read or written."""
    files, skipped, bad = [], [], []
    for name in inputs:
        path = Path(name)
        kind, info = _entry(path)
        if kind == "folder":
            _walk(path, {(info.st_dev, info.st_ino)}, files, skipped)
        elif kind == "file":
            files.append(path)
        else:
            bad.append((path, info))
    if bad:
        more = f" (and {len(bad) - 1} more named inputs)" if len(bad) > 1 else ""
        raise CaptionflowError(f"{bad[0][0]}: {bad[0][1]}{more}; give image files or folders (nothing was captioned)")
    return files, skipped


def _inode(path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def check_output(output, files, bundle, export_folder, onnx):
    """Refuse, before any work, an `-o` that would overwrite an input image or the bundle,
    or that cannot be written (a folder, a missing folder): the captions would be lost after
    all the work, or the user's files destroyed. export_folder, onnx: folders written by
    captionflow that no output may go into (None: none)."""
    out = Path(output)
    if out.is_dir():
        raise CaptionflowError(f"-o {out} is a folder; give a file name, e.g. -o {out / 'captions.txt'}")
    target = Path(os.path.realpath(out))  # a symlink is written through, as open() would
    if not target.parent.is_dir():
        missing = "is not a folder" if target.parent.exists() else "does not exist"
        raise CaptionflowError(
            f"-o {out}: {target.parent} {missing}; give a file in an existing folder (captionflow creates none)"
        )
    if not os.access(target.parent, os.W_OK):
        raise CaptionflowError(f"-o {out}: the folder {target.parent} is not writable; write elsewhere")
    key = _inode(target)
    if key is not None and key == _inode(bundle):
        raise CaptionflowError(f"-o {out} is the bundle {bundle}; write the captions to another file")
    for folder, what in ((export_folder, "the bundle's folder"), (onnx, "the --onnx folder")):
        if folder is not None and target.is_relative_to(os.path.realpath(folder)):
            raise CaptionflowError(f"-o {out} is inside {what} {folder}; write the captions elsewhere")
    if key is not None and (same := next((f for f in files if _inode(f) == key), None)) is not None:
        raise CaptionflowError(f"-o {out} is the input image {same}; write the captions to another file")


def locate_bundle(model):
    """The bundle file of --model; for a folder without bundle.pt that has one below it (an
    experiment folder, results/), say which path to give instead of loading nothing."""
    from captionflow.deploy.bundle import bundle_path

    path = bundle_path(model)
    if path.exists() or not Path(model).is_dir():
        return path  # load_bundle says what is wrong with it
    below = sorted(Path(model).glob("*/bundle.pt")) + sorted(Path(model).glob("*/*/bundle.pt"))
    if below:
        others = (
            f" (bundles below it: {', '.join(str(p.parent) for p in below[:3])}{', ...' if len(below) > 3 else ''})"
            if len(below) > 1
            else ""
        )
        raise CaptionflowError(f"--model {model} holds no bundle.pt; use --model {below[0].parent}{others}")
    return path


def coco_ids(paths):
    """Unique image ids for the COCO results: a file's stem as the integer when it is ASCII
    digits that no other file's stem also gives (COCO's 000000123456.jpg -> 123456); every
    other file, in order, the next integer above all those, so no two files share an id and
    the same inputs get the same ids. ("²".isdigit() is True, but it is no integer.)"""
    numbers = [int(p.stem) if p.stem.isascii() and p.stem.isdigit() else None for p in paths]
    counts = Counter(n for n in numbers if n is not None)
    ids = [n if n is not None and counts[n] == 1 else None for n in numbers]
    next_id = max((i for i in ids if i is not None), default=-1) + 1
    for k, image_id in enumerate(ids):
        if image_id is None:
            ids[k], next_id = next_id, next_id + 1
    return ids


_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape_char(c):
    if c in _ESCAPES:
        return _ESCAPES[c]
    category = unicodedata.category(c)
    if category == "Cs" and 0xDC80 <= ord(c) <= 0xDCFF:  # a byte of the name that is not UTF-8 (os.fsdecode)
        return f"\\x{ord(c) - 0xDC00:02x}"
    if category in ("Cc", "Cs", "Zl", "Zp"):  # controls and line separators (str.splitlines breaks at them)
        return f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"
    return c


def escape(text):
    """`text` as one field of a text record: backslash, tab, newline and CR as \\\\ \\t \\n \\r,
    other control and line-separator characters as \\xHH or \\uHHHH, so a file name cannot
    forge a record, a field or a line of a message."""
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(_escape_char(c) for c in text)


def _write(results, fmt, out):
    if fmt == "text":
        for path, caption in results:
            out.write(f"{escape(str(path))}\t{escape(caption)}\n")
    elif fmt == "jsonl":
        for path, caption in results:
            out.write(json.dumps({"file_path": str(path), "caption": caption}) + "\n")
    else:  # coco: the results format, with the file in a side field
        ids = coco_ids([path for path, _ in results])
        records = [
            {"image_id": i, "caption": caption, "file_path": str(path)} for i, (path, caption) in zip(ids, results)
        ]
        json.dump(records, out, indent=1)
        out.write("\n")


def write_atomically(path, write):
    """Call write(file) on a new temporary file beside `path`, then rename it onto `path`:
    `path` is either the old file or the complete new one, never half-written. The new file
    keeps the old one's permissions (a new one gets the umask's)."""
    target = Path(os.path.realpath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise _cannot_write(path, exc) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            write(f)
        if target.exists():
            mode = stat.S_IMODE(os.stat(target).st_mode)
        else:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException as exc:
        os.unlink(tmp)
        if isinstance(exc, OSError):
            raise _cannot_write(path, exc) from None
        raise


def _cannot_write(path, exc):
    return disk_full_error(exc) or CaptionflowError(
        f"cannot write {path} ({exc.strerror}); the old file, if any, is unchanged"
    )


def caption_command(args):
    import torch

    from captionflow.deploy.captioner import Captioner, UnreadableImage

    files, skipped = image_files(args.images)  # every check before the model loads
    bundle = locate_bundle(args.model)
    if args.output:
        export_folder = bundle.parent if Path(args.model).is_dir() or bundle.name == "bundle.pt" else None
        check_output(args.output, files, bundle, export_folder, args.onnx)
    if args.device == "cuda" and args.onnx is None and not torch.cuda.is_available():
        raise CaptionflowError("--device cuda: CUDA is not available on this machine; use --device cpu or auto")
    for path, reason in skipped:
        print(f"captionflow caption: {escape(str(path))}: {reason}; skipped", file=sys.stderr)
    captioner = Captioner(bundle, args.device, onnx=args.onnx)
    options = {
        "beam_size": args.beam_size,
        "max_len": args.max_len,
        "sample_captions": args.sample,
        "temperature": args.temperature,
        "seed": args.seed,
    }
    results, failed = [], len(skipped)
    batch, names = [], []

    def flush():
        if batch:
            results.extend(zip(names, captioner.caption_tensors(batch, **options)))
            batch.clear()
            names.clear()

    for path in tqdm(
        files, desc="caption", unit="img", disable=len(files) < 2 or args.quiet or not sys.stderr.isatty()
    ):
        try:
            if path.suffix.lower() not in IMAGE_SUFFIXES and not _pillow_reads(path):
                raise UnreadableImage(f"{path}: {not_an_image(path)}")
            batch.append(captioner.images(path))
            names.append(path)
        except UnreadableImage as exc:
            tqdm.write(f"captionflow caption: {escape(str(exc))}; skipped", file=sys.stderr)  # not into the bar's line
            failed += 1
            continue
        if len(batch) == args.batch_size:
            flush()
    flush()
    if not results:
        unchanged = f" ({args.output} not written)" if args.output else ""
        print(f"captionflow caption: no image was captioned{unchanged}", file=sys.stderr)
        return 1
    if args.output:
        write_atomically(args.output, lambda f: _write(results, args.format, f))
    else:
        _write(results, args.format, sys.stdout)
    if failed:
        print(f"captionflow caption: captioned {len(results)} images, skipped {failed} (named above)", file=sys.stderr)
        return 1
    return 0


def _pillow_reads(path):
    """Whether Pillow recognises the file as an image (a file named directly may have any suffix)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path):
            return True
    except UnidentifiedImageError:
        return False
    except Exception:  # recognised but damaged, too large, ...: reading it says what
        return True


def export_onnx_command(args):
    from captionflow.deploy.onnx import export_bundle

    export_bundle(args.bundle, args.out_dir, fp16=args.fp16)
    return 0


def _count(text):
    """argparse type of beam size, max length, batch size: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer of at least 1, got {text!r}")
    return value


def _temperature(text):
    """argparse type of --temperature: a finite number above 0 (nan and inf break sampling)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text!r}")
    return value


def _seed(text):
    """argparse type of --seed: an integer that torch's generators take, 0 to 2**64 - 1."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to {SEED_MAX}, got {text!r}")
    return value


def parser():
    p = argparse.ArgumentParser(
        prog="captionflow",
        description="Caption images with a captionflow bundle; export it to ONNX; import released weights.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser(
        "caption",
        help="caption image files and folders",
        description="Caption image files and folders (recursively) with an exported bundle.",
        epilog=f"Image formats read in folders: {FORMATS}; a file named directly may be any format Pillow opens. "
        "Entries that are not read (other formats, FIFOs, dangling links, unreadable folders) are named on stderr. "
        f"--format text escapes backslash, tab, newline and other control characters in names (\\\\ \\t \\n \\xHH). {EXIT_STATUS}.",
    )
    c.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER")
    c.add_argument("--model", required=True, metavar="BUNDLE", help="results/<experiment>/export (or its bundle.pt)")
    c.add_argument(
        "--beam-size", type=_count, default=None, help="default: the bundle's (its experiment's evaluate.beam_size)"
    )
    c.add_argument("--max-len", type=_count, default=None, help="most words per caption; default: the bundle's")
    c.add_argument("--sample", action="store_true", help="sample one caption per image instead of beam search")
    c.add_argument("--temperature", type=_temperature, default=1.0, help="with --sample")
    c.add_argument("--seed", type=_seed, default=0, help="with --sample")
    c.add_argument("--format", choices=["text", "jsonl", "coco"], default="text", help="text: path<TAB>caption lines")
    c.add_argument(
        "--output", "-o", default=None, help="write here (atomically, once all is captioned) instead of standard output"
    )
    c.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    c.add_argument(
        "--onnx",
        default=None,
        metavar="DIR",
        help="run on onnxruntime (CPU) with the graphs `captionflow export-onnx` wrote from this bundle",
    )
    c.add_argument("--batch-size", type=_count, default=16)
    c.add_argument(
        "--quiet", "-q", action="store_true", help="no progress bar (there is none when stderr is not a terminal)"
    )
    c.set_defaults(run=caption_command)
    e = sub.add_parser("export-onnx", help="export a bundle's image encoder and decoder step to ONNX")
    e.add_argument("bundle", metavar="BUNDLE")
    e.add_argument("out_dir", metavar="OUT_DIR")
    e.add_argument("--fp16", action="store_true", help="half-precision weights where the graph allows it")
    e.set_defaults(run=export_onnx_command)
    from captionflow.data import prepare  # `captionflow prepare`: its options and handler live in its module

    prepare.add_parser(sub)
    from captionflow.deploy import import_weights  # `captionflow import-weights`: likewise

    import_weights.add_parser(sub)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except CaptionflowError as exc:
        print(f"captionflow {args.command}: {escape(str(exc))}", file=sys.stderr)  # one line, whatever the file names
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
