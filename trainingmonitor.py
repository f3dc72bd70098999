"""Metrics of a run (CSV, JSON) and the curves: per run, and runs of one setup overlaid."""
import csv
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: files only, no window
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402

from tools import atomic_write, write_json  # noqa: E402

FIELDS = ["epoch", "lr", "train_loss", "train_acc", "valid_loss", "valid_acc", "seconds"]


def write_metrics(run_dir, history):
    """metrics.csv and metrics.json, one row per epoch, floats at full (repr) precision."""
    out = io.StringIO()
    writer = csv.DictWriter(out, FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write(run_dir / "metrics.csv", lambda tmp: Path(tmp).write_text(out.getvalue()))
    write_json(run_dir / "metrics.json", history)


def plot_run(run_dir, history):
    """loss.png and acc.png: train against valid over epochs."""
    epochs = [row["epoch"] for row in history]
    for metric, label in (("loss", "cross-entropy loss"), ("acc", "accuracy")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for split in ("train", "valid"):
            ax.plot(epochs, [row[f"{split}_{metric}"] for row in history], marker=".", label=split)
        _save(fig, ax, run_dir / f"{metric}.png", f"{run_dir.name}: {metric}", label)


def plot_comparison(out_dir, runs):
    """The seed post's three figures: one line per dropout_num (mean over seeds, band +-1 std)."""
    for metric, label in (("train_loss", "train loss"), ("valid_loss", "valid loss"), ("valid_acc", "valid accuracy")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for m, group in _by_dropout_num(runs):
            epochs, curves = _aligned([r["history"] for r in group], metric)
            mean = curves.mean(0)
            ax.plot(epochs, mean, marker=".", label=f"dropout_num={m} ({len(group)} seed{'s' * (len(group) > 1)})")
            if len(group) > 1:
                std = curves.std(0, ddof=1)
                ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
        _save(fig, ax, out_dir / f"{metric}.png", f"{out_dir.name}: {label}", label)


def write_summary(out_dir, runs):
    """summary.md: final and best valid accuracy and final train loss of every run."""
    lines = ["| dropout_num | seed | epochs | final valid acc | best valid acc (epoch) | final train loss | run |",
             "|---:|---:|---:|---:|---:|---:|---|"]
    for m, group in _by_dropout_num(runs):
        for r in sorted(group, key=lambda r: r["config"]["seed"]):
            last, best = r["history"][-1], max(r["history"], key=lambda row: row["valid_acc"])
            lines.append(f"| {m} | {r['config']['seed']} | {last['epoch']} | {last['valid_acc']:.4f} | "
                         f"{best['valid_acc']:.4f} ({best['epoch']}) | {last['train_loss']:.4f} | {r['dir'].name} |")
    atomic_write(out_dir / "summary.md", lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))


def _by_dropout_num(runs):
    nums = sorted({r["config"]["dropout_num"] for r in runs})
    return [(m, [r for r in runs if r["config"]["dropout_num"] == m]) for m in nums]


def _aligned(histories, metric):
    """Epochs common to all runs and a (runs, epochs) array of the metric."""
    n = min(len(h) for h in histories)
    return [row["epoch"] for row in histories[0][:n]], np.array([[row[metric] for row in h[:n]] for h in histories])


def _save(fig, ax, path, title, ylabel):
    ax.set(title=title, xlabel="epoch", ylabel=ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
