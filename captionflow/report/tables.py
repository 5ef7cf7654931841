"""The report's tables: test metrics of every experiment x stage (and of every retrieval
model), and each job's run time and peak memory from Snakemake's `benchmark:` files.

The metrics table puts beside each row its decoding settings and SCST reward signature
(what a number means depends on both), and, where an experiment has an image-blind twin
(the same model with `blind: true`), how much CIDEr-D the image adds at each stage both have.
"""

import csv
import html
import json
from pathlib import Path

from captionflow.errors import CaptionflowError
from captionflow.utils.io import write_text

METRICS = {
    "Bleu_1": "BLEU-1",
    "Bleu_2": "BLEU-2",
    "Bleu_3": "BLEU-3",
    "Bleu_4": "BLEU-4",
    "METEOR": "METEOR",
    "ROUGE_L": "ROUGE-L",
    "CIDEr": "CIDEr-D",
    "SPICE": "SPICE",
    "bad_endings": "bad endings",  # share of captions ending with a function word (captionflow.metrics.endings)
}

STYLE = """
body { font-family: sans-serif; margin: 1em; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: right; }
th { background: #eef; }
td.text { text-align: left; max-width: 28em; font-size: 11px; color: #444; }
td.nowrap { white-space: nowrap; }
th { text-align: left; }
tr.reranked td { color: #555; font-style: italic; }
"""


def _read_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise CaptionflowError(f"{what} {path} cannot be read ({exc}): rerun the rule that writes it") from None


def _decoding(d):
    if not d:
        return ""
    return f"{d['method']} {d['beam_size']}, max_len {d['max_len']}, alpha {d['alpha']:g}" + (
        ", no repeated trigrams" if d.get("block_trigrams") else ""
    )


def _cell(value):
    return "" if value is None else f"{value:.4f}"


def metrics_rows(experiments, blind_twins=None):
    """Table rows, one per experiment x stage (and one more where its beams were reranked).

    experiments: {name: {stage: metrics JSON}} in order; blind_twins: {name: the name of
    its image-blind twin}. Each row: experiment, stage, model, the metrics (None where not
    computed, e.g. SPICE without its jars), gap (CIDEr-D minus the twin's at that stage, or
    None), decoding, reward signature."""
    reports = {name: {s: _read_json(p, "metrics") for s, p in stages.items()} for name, stages in experiments.items()}
    rows = []
    for name, stages in reports.items():
        twin = (blind_twins or {}).get(name)
        for stage, rep in stages.items():
            scores = rep["metrics"]
            gap = None
            if twin and stage in reports.get(twin, {}) and scores.get("CIDEr") is not None:
                gap = scores["CIDEr"] - reports[twin][stage]["metrics"]["CIDEr"]
            common = {
                "experiment": name,
                "model": rep.get("model", ""),
                "decoding": _decoding(rep.get("decoding")),
                "reward": rep.get("reward_signature") or "",
            }
            rows.append(
                {
                    **common,
                    "stage": stage,
                    "metrics": {k: scores.get(k) for k in METRICS},
                    "blind_gap": gap,
                    "twin": twin,
                }
            )
            if rep.get("reranked"):
                again = rep["reranked"]
                label = f"{stage} reranked (top {again['k']}, {again['changed']} changed)"
                rows.append(
                    {
                        **common,
                        "stage": label,
                        "metrics": {k: again["metrics"].get(k) for k in METRICS},
                        "blind_gap": None,
                        "twin": None,
                        "reranked": True,
                    }
                )
    return rows


def _signature(text):
    """A reward signature as HTML: its first clause, the rest folded away."""
    if not text:
        return ""
    head, _, rest = text.partition("; ")
    return (
        f"<details><summary>{html.escape(head)}</summary>{html.escape(rest)}</details>" if rest else html.escape(head)
    )


# A retrieval model's figures in the report: direction -> its measures (percent)
RETRIEVAL_COLUMNS = {
    "text_to_image": ("R@1", "R@5", "R@10", "mAP"),
    "image_to_text": ("R@1", "R@5", "R@10", "mAP"),
}


def retrieval_rows(retrieval):
    """Rows of the retrieval table, one per retrieval model.

    retrieval: {experiment: the metrics JSON evaluate_retrieval writes}, in order. Each row:
    experiment, model, what was evaluated (person search: identity-aware matches; end to
    end: the fine-tuned backbone's gallery), and {direction: {measure: percent}}."""
    rows = []
    for name, path in retrieval.items():
        rep = _read_json(path, "retrieval metrics")
        kind = [k.replace("_", " ") for k in ("person_search", "end_to_end") if rep.get(k)]
        rows.append(
            {
                "experiment": name,
                "model": rep.get("model", ""),
                "kind": ", ".join(kind),
                "scores": {d: {m: rep[d].get(m) for m in ms} for d, ms in RETRIEVAL_COLUMNS.items()},
            }
        )
    return rows


def _retrieval_html(retrieval):
    """The retrieval table of the metrics page ("" without retrieval models)."""
    rows = retrieval_rows(retrieval or {})
    if not rows:
        return ""
    header = ["experiment", "retrieval model", "evaluated as"] + [
        f"{d.replace('_', '-')} {m}" for d, ms in RETRIEVAL_COLUMNS.items() for m in ms
    ]
    body = []
    for row in rows:
        tds = [f"<td class='text'>{html.escape(row[k])}</td>" for k in ("experiment", "model", "kind")]
        tds += [
            f"<td>{'&ndash;' if v is None else f'{v:.1f}'}</td>"
            for scores in row["scores"].values()
            for v in scores.values()
        ]
        body.append(f"<tr>{''.join(tds)}</tr>")
    return (
        "<h2>Retrieval: every retrieval model (test split, %)</h2>"
        "<p>Text-to-image: each test caption ranks the test images; image-to-text the reverse. R@k: the share "
        "of queries with a match among the first k; mAP over every match (person search: any image of the "
        "same identity matches).</p>"
        f"<table><tr>{''.join(f'<th>{html.escape(h)}</th>' for h in header)}</tr>{''.join(body)}</table>"
    )


def write_metrics_table(experiments, blind_twins, out_html, out_tsv, retrieval=None):
    """Write the metrics table as an HTML page (the report's) and a TSV (for papers); the
    page also has the retrieval models' table (retrieval: {experiment: metrics JSON}), the
    only one of a retrieval-only run."""
    rows = metrics_rows(experiments, blind_twins)
    header = [
        "experiment",
        "stage",
        "model",
        *METRICS.values(),
        "CIDEr-D gain over blind twin",
        "decoding",
        "reward signature",
    ]
    lines = ["\t".join(header)]
    body = []
    for row in rows:
        gap = "" if row["blind_gap"] is None else f"{row['blind_gap']:+.4f} ({row['twin']})"
        cells = [
            row["experiment"],
            row["stage"],
            row["model"],
            *(_cell(v) for v in row["metrics"].values()),
            gap,
            row["decoding"],
            row["reward"],
        ]
        lines.append("\t".join(cells))
        tds = [f"<td class='text'>{html.escape(c)}</td>" for c in cells[:3]]
        tds += [f"<td>{c or '&ndash;'}</td>" for c in cells[3:-2]]
        tds.append(f"<td class='text nowrap'>{html.escape(row['decoding'])}</td>")
        tds.append(f"<td class='text'>{_signature(row['reward'])}</td>")
        body.append(f"<tr{' class=reranked' if row.get('reranked') else ''}>{''.join(tds)}</tr>")
    captioning = (
        "<h2>Test metrics: every experiment x stage</h2>"
        "<p>pycocoevalcap on the PTB-tokenized test split; SPICE is &ndash; where its jars are missing "
        "(<code>snakemake prefetch</code> fetches them). The gain over a blind twin is CIDEr-D minus that of the same model and "
        "stage trained on zeroed image features: what the image adds. Bad endings: the share of captions whose last word is "
        "a function word (&ldquo;a man riding a horse on a&rdquo;), the artifact of SCST without the end token in "
        "its reward; &ndash; for metrics written before it was measured.</p>"
        f"<table><tr>{''.join(f'<th>{html.escape(h)}</th>' for h in header)}</tr>{''.join(body)}</table>"
    )
    if not rows and retrieval:  # retrieval-only experiments: no captioning table to show
        captioning = ""
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>test metrics</title>"
        f"<style>{STYLE}</style></head><body>{captioning}{_retrieval_html(retrieval)}</body></html>\n"
    )
    write_text(out_html, page)
    write_text(out_tsv, "\n".join(lines) + "\n")
    print(f"metrics of {len(rows)} rows: {out_html}, {out_tsv}", flush=True)


def read_benchmarks(root):
    """Rows {rule, job, seconds, max_rss_mb, cpu_seconds} of every `benchmark:` TSV under
    `root` (benchmarks/<rule>.tsv or benchmarks/<rule>/<job>.tsv), sorted by rule and job."""
    rows = []
    for path in sorted(Path(root).rglob("*.tsv")):
        rel = path.relative_to(root)
        rule, job = (rel.parts[0], path.stem) if len(rel.parts) > 1 else (path.stem, "")
        try:
            with open(path, newline="") as f:
                records = list(csv.DictReader(f, delimiter="\t"))
            last = records[-1]  # `repeat()` benchmarks hold several runs: the latest
            rows.append(
                {
                    "rule": rule,
                    "job": job,
                    "seconds": float(last["s"]),
                    "max_rss_mb": _number(last.get("max_rss")),
                    "cpu_seconds": _number(last.get("cpu_time")),
                }
            )
        except (OSError, IndexError, KeyError, ValueError) as exc:
            raise CaptionflowError(f"benchmark {path} cannot be read ({exc!r}): delete it and rerun its rule") from None
    return rows


def _number(value):
    try:
        return float(value)
    except (TypeError, ValueError):  # "NA": a job too short for psutil to sample
        return None


def write_benchmarks_table(root, out_html):
    """Write run time and peak memory (max RSS) per job, and per rule in total, as HTML."""
    rows = read_benchmarks(root)
    total = sum(r["seconds"] for r in rows)
    body = []
    for r in rows:
        mem = "&ndash;" if r["max_rss_mb"] is None else f"{r['max_rss_mb']:.0f}"
        cpu = "&ndash;" if r["cpu_seconds"] is None else f"{r['cpu_seconds']:.1f}"
        body.append(
            f"<tr><td class='text'>{html.escape(r['rule'])}</td><td class='text'>{html.escape(r['job'])}</td>"
            f"<td>{r['seconds']:.1f}</td><td>{100 * r['seconds'] / max(total, 1e-9):.0f}%</td><td>{cpu}</td><td>{mem}</td></tr>"
        )
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>run time and memory</title>"
        f"<style>{STYLE}</style></head><body><h2>Run time and peak memory per job</h2>"
        f"<p>From the rules' <code>benchmark:</code> files ({len(rows)} jobs, {total:.0f} s of wall time in all, "
        "not counting overlap). Peak memory: maximum resident set size of the job's processes.</p>"
        "<table><tr><th>rule</th><th>job</th><th>wall s</th><th>share</th><th>CPU s</th><th>peak RSS MB</th></tr>"
        f"{''.join(body)}</table></body></html>\n"
    )
    write_text(out_html, page)
    print(f"benchmarks of {len(rows)} jobs: {out_html}", flush=True)
