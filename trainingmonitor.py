"""The curves: per run, and the runs of one setup overlaid and compared (their tables: tables.py)."""
import fcntl

import matplotlib
import numpy as np

from bookkeeping import runfiles
from bookkeeping.experiment import HEAD_OPTIONS, OMITTED_AT_DEFAULT, run_identity, setup_flags
from bookkeeping.runfiles import FIELDS
from studies import stats
from studies.tables import paired_markdown, paired_rows, summary_markdown
from tools import UserError, atomic_write, check_writable, text_writer

matplotlib.use("Agg")  # headless: files only, no window
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def plot_run(run_dir, history, config):
    """loss.png and acc.png: train against valid over epochs, titled with the run's setup."""
    epochs, setup = [row["epoch"] for row in history], run_title(config)
    for metric, label in (("loss", "cross-entropy loss"), ("acc", "accuracy")):
        fig, ax = plt.subplots(figsize=(6, 4))
        curves = [[row[f"{split}_{metric}"] for row in history] for split in ("train", "valid")]
        lines = [ax.plot(epochs, values, marker=".", label=split)[0] for split, values in zip(("train", "valid"), curves)]
        if metric == "loss":
            keep_in_view(ax, lines)
        _save(fig, ax, run_dir / f"{metric}.png", f"{label}, train and valid, by epoch\n{setup}", "epoch", label)


def keep_in_view(ax, lines):
    """An exploding first epoch (a loss of 33, or 3112) would flatten the rest: then the axis stops above the rest,
    and each first point above it is marked on the top edge with its value."""
    firsts, later = [], 0.0
    for line in lines:
        values = np.asarray(line.get_ydata(), float)
        if len(values) > 1:  # a curve of one epoch has no later epochs
            firsts.append((line, values[0]))
            later = max(later, values[1:].max())
    if later > 0 and max(first for _, first in firsts) > 3 * later:
        top = later * 1.15
        ax.set_ylim(0, top)  # losses are not negative
        for line, first in [(line, first) for line, first in firsts if first > top]:
            x = line.get_xdata()[0]
            ax.plot([x], [top], marker="^", color=line.get_color(), clip_on=False)
            ax.annotate(f"{line.get_label()} {first:,.4g}, off the axis", (x, top), xytext=(8, -4 - 11 * lines.index(line)),
                        textcoords="offset points", va="top", fontsize=8, color=line.get_color())


def run_title(config):
    return (f"{config['model']}, {config['dataset']}, {samples_in_words(config['dropout_num'])} (p={config['dropout_p']}), "
            f"seed {config['seed']}, {config.get('train_images', '?')} img, {config['precision']}")


def compare_setup(runs_dir, setup, out_dir=None):
    """Redraw (out_dir or runs_dir)/compare/<setup>/ from the finished runs of that setup under runs_dir; returns
    (that folder, their number).

    Runs that finish at the same moment (a job array on a cluster) take turns, under a lock file in the folder
    (a file, since over NFS only a file opened for writing takes an exclusive lock; --output_dir keeps it out of a
    committed folder): the last to draw has seen every run that finished before it, and each file is replaced
    whole, never torn.
    """
    compare_dir = (out_dir or runs_dir) / "compare" / setup
    compare_dir.mkdir(parents=True, exist_ok=True)
    with open(compare_dir / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        runs = runfiles.one_per_identity([r for r in runfiles.finished_runs(runs_dir)
                                          if run_identity(r["config"])[1] == setup])
        write_comparison(compare_dir, runs, setup_flags(runs[0]["config"]))
    return compare_dir, len(runs)


def compare_all(folder, out_dir=None):
    """run.py --compare: every setup's comparison of the finished runs under folder, drawn into out_dir (or folder)."""
    runs = runfiles.finished_runs(folder) if folder.is_dir() else []
    if not runs:
        raise UserError(f"{folder} holds no finished runs (folders with config.json and metrics.json up to their "
                        "last epoch); give the --output_dir of a grid")
    check_writable((out_dir or folder) / "compare")
    for setup in sorted({run_identity(r["config"])[1] for r in runs}):
        compare_dir, count = compare_setup(folder, setup, out_dir)
        print(f"{compare_dir}: comparison of {count} finished run(s)")
    return 0


def write_comparison(out_dir, runs, setup):
    """Curves (mean over seeds, band +-1 std), the M and p ablations when the grid has them, and summary.md.

    setup: the defining flags the runs share, for summary.md's opening and the figures' titles.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    groups, short = group_runs(runs), short_setup(setup, runs)
    for metric, label in (("train_loss", "train loss"), ("valid_loss", "valid loss"), ("valid_acc", "valid accuracy")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for g in groups:
            draw_band(ax, g["epochs"], g["curves"][metric], g["label"])
        if metric.endswith("loss"):
            keep_in_view(ax, list(ax.get_lines()))  # the means of the groups
        _save(fig, ax, out_dir / f"{metric}.png", f"{label}\n{short}", "epoch", label)
    fig, ax = plt.subplots(figsize=(6, 4))
    for g in groups:  # the speed claim is about wall-clock as much as epochs
        draw_band(ax, g["curves"]["seconds"].cumsum(1).mean(0), g["curves"]["valid_acc"], g["label"])
    fig.text(0.01, 0.01, "seconds compare only between runs that had the machine to themselves", fontsize=7, alpha=0.7)
    _save(fig, ax, out_dir / "valid_acc_vs_time.png", f"valid accuracy\n{short}",
          "seconds (training and evaluation)", "valid accuracy")
    for key, name in (("dropout_num", "m"), ("dropout_p", "p")):
        if len({g[key] for g in groups}) > 1:
            _plot_final_vs(out_dir / f"final_acc_vs_{name}.png", groups, key, short)
    gains = [(g["name"], final) for g, _, final, _ in paired_rows(groups, 1)]
    if gains:
        plot_gain(out_dir / "gain.png", gains, short)
    text = "\n".join([describe_setup(setup, runs), summary_markdown(groups), paired_markdown(groups)])
    atomic_write(out_dir / "summary.md", text_writer(text))


def describe_setup(setup, runs):
    """summary.md's opening: the flags every run of the comparison shares, then the epochs and images they ran."""
    shared = lambda key: ", ".join(sorted({str(r["config"].get(key, "-")) for r in runs}))
    lines = ["#### " + short_setup(setup, runs), "", "Every run of this comparison has these defining flags; they differ only in "
             "seed, dropout_num, dropout_p and R-Drop α.", "", "| flag | value |", "|---|---|",
             *[f"| {flag} | {value} |" for flag, value in setup.items()]]
    lines += [f"| epochs | {shared('epochs')} |", f"| images: train / valid / test | {shared('train_images')} / "
              f"{shared('valid_images')} / {shared('test_images')} |", f"| data_dir | {shared('data_dir')} |", ""]
    return "\n".join(lines)


def short_setup(setup, runs):
    """The setup in one line, for figure titles: model, data, images, epochs, schedule, batch, precision."""
    c, s = runs[0]["config"], setup
    schedule = f"lr {s['lr']}" + (f", /10 after {s['lr_milestone']}" if s["lr_milestone"] else "")
    images = f"{c.get('train_images', s['train_size'] or 'all')}/{c.get('test_images', s['test_size'] or 'all')} img"
    head = [f"{k} {s[k]}" for k in HEAD_OPTIONS if s.get(k, OMITTED_AT_DEFAULT[k]) != OMITTED_AT_DEFAULT[k]]
    return ", ".join([s["model"], s["dataset"], images, f"{max(r['config']['epochs'] for r in runs)} ep", schedule,
                      f"batch {s['batch_size']}", s["precision"]] + ["augment"] * bool(s["augment"]) + head
                     + ["compiled"] * bool(s.get("compile")) + ["CUDA graph"] * bool(s.get("cuda_graph")))


def plot_gain(path, gains, title, what="final valid accuracy minus dropout_num=1's"):
    """Each setting's paired difference in final valid accuracy against its reference (same seeds): the mean, and its
    95% interval as an error bar (a bare point with one seed, where there is none). gains: [(label, difference)]."""
    fig, ax = plt.subplots(figsize=(7, 1.5 + 0.5 * len(gains)))  # one row per setting: long labels stay readable
    rows = range(len(gains))[::-1]  # the first setting on top
    ax.errorbar([d["mean"] for _, d in gains], rows, xerr=stats.error_bar([d for _, d in gains]), fmt="o", capsize=4)
    ax.axvline(0, color="grey", lw=1)
    ax.set_ylim(-0.6, len(gains) - 0.4)  # half a row of margin above and below
    ax.set_yticks(rows, [f"{label} ({d['n']} seed{'s' * (d['n'] > 1)})" for label, d in gains], fontsize=8)
    _save(fig, ax, path, f"{what}, paired by seed (95% t interval)\n{title}", "difference in final valid accuracy", "",
          legend=False, over_figure=True)  # centred on the figure, not on the axes the long labels push right


def _group_key(run):
    c = run["config"]
    return c["dropout_p"], c["dropout_num"], c["rdrop_alpha"]


def group_runs(runs):
    """Runs grouped by (dropout_p, dropout_num, rdrop_alpha), seeds in order, with their curves over the common epochs."""
    keys = sorted({_group_key(r) for r in runs})
    several_p = len({p for p, _, _ in keys}) > 1
    groups = []
    for p, m, alpha in keys:
        members = sorted((r for r in runs if _group_key(r) == (p, m, alpha)), key=lambda r: r["config"]["seed"])
        n = min(len(r["history"]) for r in members)
        curves = {k: np.array([[row[k] for row in r["history"][:n]] for r in members])
                  for k in FIELDS if all(k in r["history"][0] for r in members)}
        name = f"dropout_num={m}" + (f", p={p}" if several_p else "") + (f", R-Drop α={alpha}" if alpha else "")
        words = samples_in_words(m) + (f", p={p}" if several_p else "") + (f", R-Drop α={alpha}" if alpha else "")
        groups.append({"dropout_p": p, "dropout_num": m, "rdrop_alpha": alpha, "runs": members, "curves": curves,
                       "epochs": curves["epoch"][0], "name": name,
                       "label": f"{words} ({len(members)} seed{'s' * (len(members) > 1)})"})
    return groups


def samples_in_words(dropout_num):
    """For legends: 'no dropout', 'dropout' (one sample), '8 samples'."""
    return {0: "no dropout", 1: "dropout"}.get(dropout_num, f"{dropout_num} samples")


def draw_band(ax, x, curves, label, color=None):
    """The mean over seeds as a line and, with several seeds, +-1 std as a band."""
    mean = curves.mean(0)
    (line,) = ax.plot(x, mean, marker=".", label=label, color=color)
    if len(curves) > 1:
        std = curves.std(0, ddof=1)
        ax.fill_between(x, mean - std, mean + std, alpha=0.2, color=line.get_color())


def _plot_final_vs(path, groups, key, short):
    """Final valid accuracy (mean +- std over seeds) against dropout_num or dropout_p, a line per value of the
    other (and per R-Drop alpha)."""
    other = "dropout_p" if key == "dropout_num" else "dropout_num"
    fig, ax = plt.subplots(figsize=(6, 4))
    for value, alpha in sorted({(g[other], g["rdrop_alpha"]) for g in groups}):
        line = [g for g in groups if (g[other], g["rdrop_alpha"]) == (value, alpha)]
        finals = [g["curves"]["valid_acc"][:, -1] for g in line]  # at the last epoch all seeds reached
        ax.errorbar([g[key] for g in line], [f.mean() for f in finals], capsize=3, marker="o",
                    label=(samples_in_words(value) if other == "dropout_num" else f"p={value}")
                    + (f", R-Drop α={alpha}" if alpha else ""),
                    yerr=[f.std(ddof=1) if len(f) > 1 else 0 for f in finals])
    _save(fig, ax, path, f"final valid accuracy\n{short}", key, "final valid accuracy")


def _save(fig, ax, path, title, xlabel, ylabel, legend=True, over_figure=False):
    if not over_figure:
        ax.set_title(title, fontsize=9)  # two lines: what is drawn, and the setup it comes from
    label_axes(ax, xlabel, ylabel, legend)
    save_figure(fig, path, title if over_figure else None)


def label_axes(ax, xlabel, ylabel, legend=True, fontsize=None):
    """Every figure's axes: names, whole numbers on an epoch or dropout_num axis, a light grid, the legend."""
    ax.set(xlabel=xlabel, ylabel=ylabel)
    if xlabel in ("epoch", "dropout_num"):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=fontsize)


def save_figure(fig, path, title=None):
    """The PNG, replaced whole (never a torn file), with the figure's title over all its axes if given."""
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
