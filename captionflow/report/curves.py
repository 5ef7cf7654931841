"""Learning curves of an experiment, from the history TSV each training stage writes.

training.png: train loss, learning rate and val CIDEr-D per epoch of the gradient stages
(XE, then e2e beside it on one epoch axis, then SCST and SCST end to end); scst.png: SCST's mean sampled
reward and baseline per epoch; es.png: ES fitness (best, mean, elite) and val CIDEr-D
per iteration. A figure is drawn only for the stages the experiment has.
"""

import csv
from pathlib import Path

from matplotlib.ticker import MaxNLocator

from captionflow.errors import CaptionflowError
from captionflow.report.figures import plt, save_png

GRADIENT_STAGES = ("xe", "e2e", "scst", "scst_e2e")
SELF_CRITICAL = ("scst", "scst_e2e")  # their loss is a policy-gradient surrogate: scst.png
COLORS = {"xe": "tab:blue", "e2e": "tab:orange", "scst": "tab:green", "scst_e2e": "tab:olive", "es": "tab:purple"}


def read_history(path):
    """Rows of a history TSV as {column: float or None (empty cell)}."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
    except OSError as exc:
        raise CaptionflowError(f"history {path} cannot be read ({exc.strerror}): rerun the stage") from None
    if not rows or "epoch" not in rows[0]:
        raise CaptionflowError(f"history {path} has no epochs (no `epoch` column or no rows): rerun the stage")
    try:
        return [{k: float(v) if v not in ("", None) else None for k, v in row.items()} for row in rows]
    except ValueError as exc:
        raise CaptionflowError(f"history {path} holds a value that is not a number ({exc}): rerun the stage") from None


def _series(rows, column, offset=0):
    """(x, y) of the rows where `column` has a value; x = epoch + offset."""
    points = [(row["epoch"] + offset, row[column]) for row in rows if row.get(column) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def _missing(ax, text):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="gray", wrap=True)


def _finish(*axes):
    """Grid, integer epochs and a legend where something is drawn."""
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.lines:
            ax.legend(fontsize=8)


def plot_training(experiment, histories, out_png):
    """Loss, learning rate and val CIDEr-D of the gradient stages on one epoch axis."""
    fig, (loss_ax, lr_ax, val_ax) = plt.subplots(1, 3, figsize=(14, 3.8))
    offset = 0
    for stage, rows in histories.items():
        color = COLORS[stage]
        if stage not in SELF_CRITICAL:  # SCST's loss is a policy-gradient surrogate, not a likelihood
            loss_ax.plot(*_series(rows, "train_loss", offset), "o-", color=color, label=stage, ms=3)
        lr_ax.plot(*_series(rows, "lr", offset), "o-", color=color, label=stage, ms=3)
        val_ax.plot(*_series(rows, "val_cider_d", offset), "o-", color=color, label=stage, ms=3)
        if offset:
            for ax in (loss_ax, lr_ax, val_ax):
                ax.axvline(offset - 0.5, color="gray", lw=0.8, ls=":")
        offset += int(max(row["epoch"] for row in rows)) + 1
    loss_ax.set(title="train loss (cross-entropy)", xlabel="epoch", ylabel="loss")
    lr_ax.set(title="learning rate", xlabel="epoch", ylabel="lr", yscale="log")
    val_ax.set(title="val CIDEr-D (greedy)", xlabel="epoch", ylabel="CIDEr-D")
    _finish(loss_ax, lr_ax, val_ax)
    fig.suptitle(f"{experiment}: {' -> '.join(histories)} (epochs continue across stages)", fontsize=11)
    save_png(fig, out_png)


def _beside_val_cider(rows, stage, xlabel, title, draw, out_png):
    """A two-panel figure: `draw(ax)` on the left, val CIDEr-D of `rows` on the right."""
    fig, (left, val_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    draw(left)
    val_ax.plot(*_series(rows, "val_cider_d"), "o-", color=COLORS[stage], ms=3)
    val_ax.set(title="val CIDEr-D (greedy)", xlabel=xlabel, ylabel="CIDEr-D")
    for ax in (left, val_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title, fontsize=11)
    save_png(fig, out_png)


def plot_scst(experiment, histories, out_png):
    """SCST (and SCST end to end after it, on one epoch axis): mean reward of the sampled
    captions and the baseline they are compared with; val CIDEr-D beside it."""
    fig, (ax, val_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    offset = 0
    for stage, rows in histories.items():
        color = COLORS[stage]
        if "reward" not in rows[0]:
            _missing(ax, f"no reward column: this history predates it (rerun train_{stage})")
        else:
            ax.plot(*_series(rows, "reward", offset), "o-", color=color, label=f"{stage}: mean sample reward", ms=3)
            rewards, baselines = _series(rows, "reward")[1], _series(rows, "baseline")[1]
            # the leave-one-out (mean_of_others) baselines average to the mean reward itself
            same = len(rewards) == len(baselines) and all(abs(r - b) < 1e-5 for r, b in zip(rewards, baselines))
            label = f"{stage}: mean baseline" + (" (= mean reward: leave-one-out)" if same else "")
            ax.plot(
                *_series(rows, "baseline", offset),
                "s--",
                color="tab:red" if stage == "scst" else "tab:brown",
                label=label,
                ms=3,
            )
        val_ax.plot(*_series(rows, "val_cider_d", offset), "o-", color=color, label=stage, ms=3)
        if offset:
            for a in (ax, val_ax):
                a.axvline(offset - 0.5, color="gray", lw=0.8, ls=":")
        offset += int(max(row["epoch"] for row in rows)) + 1
    ax.set(title="reward (CIDEr-D of sampled captions)", xlabel="SCST epoch", ylabel="reward")
    val_ax.set(title="val CIDEr-D (greedy)", xlabel="SCST epoch", ylabel="CIDEr-D")
    _finish(ax, val_ax)
    fig.suptitle(f"{experiment}: self-critical sequence training", fontsize=11)
    save_png(fig, out_png)


def plot_es(experiment, rows, out_png):
    """ES: fitness (CIDEr-D of the offspring) per iteration, and val CIDEr-D where measured."""

    def draw(ax):
        for column, style in (("best_fitness", "o-"), ("mean_fitness", "s-"), ("elite_fitness", "^--")):
            x, y = _series(rows, column)
            if y:
                ax.plot(x, y, style, label=column.replace("_", " "), ms=3)
        ax.set(title="fitness (CIDEr-D of the offspring)", xlabel="iteration", ylabel="fitness")
        ax.legend(fontsize=8)

    _beside_val_cider(rows, "es", "iteration", f"{experiment}: evolution strategies", draw, out_png)


def plot_curves(experiment, stage_histories, out_dir):
    """Write the experiment's learning-curve PNGs into `out_dir`.

    stage_histories: {stage: history TSV} in stage order. -> the PNG paths written."""
    histories = {stage: read_history(path) for stage, path in stage_histories.items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    gradient = {s: rows for s, rows in histories.items() if s in GRADIENT_STAGES}
    if gradient:
        written.append(out_dir / "training.png")
        plot_training(experiment, gradient, written[-1])
    self_critical = {s: rows for s, rows in histories.items() if s in SELF_CRITICAL}
    if self_critical:
        written.append(out_dir / "scst.png")
        plot_scst(experiment, self_critical, written[-1])
    if "es" in histories:
        written.append(out_dir / "es.png")
        plot_es(experiment, histories["es"], written[-1])
    print(f"learning curves: {', '.join(str(p) for p in written)}", flush=True)
    return written
