"""COCO caption metrics from pycocoevalcap's own scorers, with SPICE optional.

We call the scorers one by one instead of `COCOEvalCap.evaluate()`, which builds SPICE
unconditionally and so downloads Stanford CoreNLP (and crashes) on an offline machine.
The numbers are pycocoevalcap's: "CIDEr" is its CIDEr-D (sigma 6, clipped counts, x10),
named as coco-caption names it.
"""

import shutil
import subprocess
from pathlib import Path

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.spice import spice as spice_module
from pycocoevalcap.spice.get_stanford_models import get_stanford_models
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from captionflow.errors import CaptionflowError

# SPICE parses captions with Stanford CoreNLP 3.6.0, which pycocoevalcap does not ship:
# spice.get_stanford_models() downloads these two jars into spice/lib on first use.
SPICE_LIB = Path(spice_module.__file__).parent / "lib"
SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


def java_available():
    """None when `java` runs; else a one-line reason (the PTB tokenizer, METEOR and SPICE are Java)."""
    if shutil.which("java") is None:
        return (
            "java not found on PATH: pycocoevalcap's PTB tokenizer and METEOR need a Java "
            "runtime (Debian: apt install default-jre-headless)"
        )
    try:
        proc = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"java on PATH does not run ({_one_line(exc)}): pycocoevalcap's PTB tokenizer and METEOR need a Java runtime"
    if proc.returncode != 0:
        return f"`java -version` failed with status {proc.returncode} ({_one_line(proc.stderr)}): pycocoevalcap's PTB tokenizer and METEOR need a Java runtime"
    return None


def spice_status():
    """None when SPICE can run offline (its CoreNLP jars are present); else a one-line reason."""
    for jar in SPICE_JARS:
        if not (SPICE_LIB / jar).is_file():
            return (
                f"SPICE needs {SPICE_LIB / jar}, which is missing: run the `prefetch` target on a "
                "machine with internet (it downloads Stanford CoreNLP 3.6.0 for SPICE)"
            )
    return None


def fetch_spice_models():
    """Download SPICE's Stanford CoreNLP 3.6.0 jars into pycocoevalcap (a large zip; needs internet)."""
    try:
        get_stanford_models()
    except Exception as exc:  # URLError, OSError, BadZipFile: all mean "no usable download"
        raise CaptionflowError(
            f"could not download Stanford CoreNLP 3.6.0 for SPICE into {SPICE_LIB}: {_one_line(exc)}"
        ) from None
    # get_stanford_models() looks only at the first jar, so a half-finished earlier run
    # would leave the models jar missing without complaint.
    reason = spice_status()
    if reason is not None:
        raise CaptionflowError(f"{reason} (after download; delete {SPICE_LIB / SPICE_JARS[0]} and retry)")


def score_captions(references, predictions, tokenize=True, spice=True):
    """Corpus-level COCO caption scores of `predictions` against `references`.

    references: {image_id: [reference string, ...]}; predictions: {image_id: caption string},
    over the same image ids. tokenize=True lowercases and PTB-tokenizes both and drops
    punctuation, as coco-caption does; tokenize=False scores the strings as they are.
    Returns {"Bleu_1".."Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE": float,
    "SPICE_skipped": reason or None, "num_images": int}; SPICE is None when it did not run,
    with the reason in SPICE_skipped, so a missing score is never mistaken for a 0.
    """
    _check_inputs(references, predictions, tokenize)
    reason = java_available()
    if reason is not None:
        raise CaptionflowError(reason)

    gts = {i: [{"caption": c} for c in refs] for i, refs in references.items()}
    res = {i: [{"caption": predictions[i]}] for i in references}
    if tokenize:
        tokenizer = PTBTokenizer()
        gts, res = tokenizer.tokenize(gts), tokenizer.tokenize(res)
    else:
        gts = {i: [c["caption"] for c in caps] for i, caps in gts.items()}
        res = {i: [c["caption"] for c in caps] for i, caps in res.items()}

    scores = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores.update({f"Bleu_{n + 1}": float(b) for n, b in enumerate(bleu)})
    scores["METEOR"] = _meteor(gts, res)
    scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])

    scores["SPICE"], scores["SPICE_skipped"] = None, "SPICE not requested (spice=False)"
    if spice:
        scores["SPICE_skipped"] = spice_status()
        if scores["SPICE_skipped"] is None:
            try:
                scores["SPICE"] = float(spice_module.Spice().compute_score(gts, res)[0])
            except (subprocess.CalledProcessError, OSError, ValueError) as exc:
                scores["SPICE_skipped"] = f"SPICE failed: {_one_line(exc)}"
    scores["num_images"] = len(references)
    return scores


def _meteor(gts, res):
    """METEOR from one java process, which is ended here rather than left to Meteor.__del__.

    Meteor only kills its process in __del__, which runs late or never while a traceback or
    a reference cycle holds the object; a leaked JVM keeps its 2 GB heap.
    """
    meteor = Meteor()
    try:
        return float(meteor.compute_score(gts, res)[0])
    finally:
        proc = meteor.meteor_p
        proc.kill()  # __del__ then finds a finished process and does nothing harmful
        proc.wait()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            pipe.close()


def _check_inputs(references, predictions, tokenize):
    """Raise CaptionflowError unless both dicts cover the same images with usable strings."""
    missing = [i for i in references if i not in predictions]
    extra = [i for i in predictions if i not in references]
    if missing or extra:
        raise CaptionflowError(
            f"predictions and references cover different images: {len(missing)} without a prediction "
            f"(e.g. {missing[:3]}), {len(extra)} without references (e.g. {extra[:3]})"
        )
    if not references:
        raise CaptionflowError("no images to score: references and predictions are empty")
    for i, refs in references.items():
        if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
            raise CaptionflowError(f"image {i!r}: references must be a non-empty list of strings, got {refs!r:.80}")
        if not isinstance(predictions[i], str):
            raise CaptionflowError(f"image {i!r}: prediction must be a string, got {predictions[i]!r:.80}")
        # METEOR talks to java one line per caption: an embedded newline would shift every
        # later score onto the wrong image (the tokenizer path replaces newlines itself).
        if not tokenize and any("\n" in s for s in [predictions[i], *refs]):
            raise CaptionflowError(f"image {i!r}: a caption contains a newline, which tokenize=False cannot score")


def _one_line(x):
    """`x` as a single line, for error messages that must stay one line."""
    return " ".join(str(x).split()) or type(x).__name__
