"""The `captionflow` command: caption your own images with an exported bundle, export ONNX.

    captionflow caption photo.jpg holiday/ --model results/<experiment>/export
    captionflow export-onnx results/<experiment>/export onnx/
"""

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from captionflow.errors import CaptionflowError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def image_files(inputs):
    """Files named or found (recursively, sorted) in folders -> (files, [(path, reason)])."""
    files, problems = [], []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            for p in sorted(q for q in path.rglob("*") if q.is_file() and not q.name.startswith(".")):
                if p.suffix.lower() in IMAGE_SUFFIXES:
                    files.append(p)
                else:
                    problems.append((p, f"not an image file ({p.suffix or 'no suffix'}); skipped"))
        elif path.is_file():
            files.append(path)
        else:
            problems.append((path, "no such file or folder"))
    return files, problems


def _write(results, fmt, out):
    if fmt == "text":
        for path, caption in results:
            out.write(f"{path}\t{caption}\n")
    elif fmt == "jsonl":
        for path, caption in results:
            out.write(json.dumps({"file_path": str(path), "caption": caption}) + "\n")
    else:  # coco: the results format, with the file in a side field
        records = []
        for i, (path, caption) in enumerate(results):
            image_id = int(path.stem) if path.stem.isdigit() else i
            records.append({"image_id": image_id, "caption": caption, "file_path": str(path)})
        json.dump(records, out, indent=1)
        out.write("\n")


def caption_command(args):
    from captionflow.deploy.captioner import Captioner, UnreadableImage

    captioner = Captioner(args.model, args.device, onnx=args.onnx)
    files, problems = image_files(args.images)
    for path, reason in problems:
        print(f"captionflow caption: {path}: {reason}", file=sys.stderr)
    options = {"beam_size": args.beam_size, "max_len": args.max_len, "sample_captions": args.sample, "temperature": args.temperature, "seed": args.seed}
    results, failed = [], len(problems)
    batch, names = [], []

    def flush():
        if batch:
            results.extend(zip(names, captioner.caption_tensors(batch, **options)))
            batch.clear()
            names.clear()

    for path in tqdm(files, desc="caption", unit="img", disable=len(files) < 2 or args.quiet or not sys.stderr.isatty()):
        try:
            batch.append(captioner.images(path))
            names.append(path)
        except UnreadableImage as exc:
            tqdm.write(f"captionflow caption: {exc}; skipped", file=sys.stderr)  # not into the bar's line
            failed += 1
            continue
        if len(batch) == args.batch_size:
            flush()
    flush()
    out = open(args.output, "w") if args.output else sys.stdout
    try:
        _write(results, args.format, out)
    finally:
        if args.output:
            out.close()
    if failed:
        print(f"captionflow caption: captioned {len(results)} images, skipped {failed} (named above)", file=sys.stderr)
    if not results:
        print("captionflow caption: no image was captioned", file=sys.stderr)
        return 1
    return 0


def export_onnx_command(args):
    from captionflow.deploy.onnx import export_bundle

    export_bundle(args.bundle, args.out_dir, fp16=args.fp16)
    return 0


def parser():
    p = argparse.ArgumentParser(prog="captionflow", description="Caption images with a captionflow bundle; export it to ONNX.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("caption", help="caption image files and folders", description="Caption image files and folders (recursively) with an exported bundle.")
    c.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER")
    c.add_argument("--model", required=True, metavar="BUNDLE", help="results/<experiment>/export (or its bundle.pt)")
    c.add_argument("--beam-size", type=int, default=None, help="default: the bundle's (its experiment's evaluate.beam_size)")
    c.add_argument("--max-len", type=int, default=None, help="most words per caption; default: the bundle's")
    c.add_argument("--sample", action="store_true", help="sample one caption per image instead of beam search")
    c.add_argument("--temperature", type=float, default=1.0, help="with --sample")
    c.add_argument("--seed", type=int, default=0, help="with --sample")
    c.add_argument("--format", choices=["text", "jsonl", "coco"], default="text", help="text: path<TAB>caption lines")
    c.add_argument("--output", "-o", default=None, help="write here instead of standard output")
    c.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    c.add_argument("--onnx", default=None, metavar="DIR", help="run on onnxruntime (CPU) with the graphs `captionflow export-onnx` wrote from this bundle")
    c.add_argument("--batch-size", type=int, default=16)
    c.add_argument("--quiet", "-q", action="store_true", help="no progress bar (there is none when stderr is not a terminal)")
    c.set_defaults(run=caption_command)
    e = sub.add_parser("export-onnx", help="export a bundle's image encoder and decoder step to ONNX")
    e.add_argument("bundle", metavar="BUNDLE")
    e.add_argument("out_dir", metavar="OUT_DIR")
    e.add_argument("--fp16", action="store_true", help="half-precision weights where the graph allows it")
    e.set_defaults(run=export_onnx_command)
    from captionflow.data import prepare  # `captionflow prepare`: its options and handler live in its module

    prepare.add_parser(sub)
    return p


def _check(args, p):
    for name in ("beam_size", "max_len", "batch_size"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if getattr(args, "temperature", 1.0) <= 0:
        p.error(f"--temperature must be positive, got {args.temperature}")


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    _check(args, p)
    try:
        return args.run(args)
    except CaptionflowError as exc:
        print(f"captionflow {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
