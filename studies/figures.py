"""study.py's figures and tables: each study's points (mean +- std over seeds) and paired differences (95% t)."""

import matplotlib
import numpy as np

import trainingmonitor
from bookkeeping import runfiles
from studies import stats
from studies.stats import format_difference
from studies.tables import mean_std
from trainingmonitor import label_axes, save_figure

matplotlib.use("Agg")  # headless: files only, no window
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

finals = runfiles.final_accuracies


def curves(runs, metric):
    """{seed: per-epoch values} over the epochs every run reached."""
    n = min(len(r["history"]) for r in runs.values())
    return {seed: np.array([row[metric] for row in r["history"][:n]]) for seed, r in runs.items()}


def caption(points, protocol):
    """'converged protocol: 10000/10000 images, 25 epochs, bf16; seeds 42-46': what the runs recorded."""
    configs = [r["config"] for runs in points.values() for r in runs.values()]
    values = lambda key: "/".join(sorted({str(c.get(key, "?")) for c in configs}))
    seeds = sorted({c["seed"] for c in configs})
    consecutive = seeds == list(range(seeds[0], seeds[-1] + 1)) and len(seeds) > 2
    named = f"{seeds[0]}-{seeds[-1]}" if consecutive else " ".join(map(str, seeds))
    return (f"{protocol} protocol: {values('train_images')}/{values('valid_images')} images, {values('epochs')} epochs, "
            f"{values('precision')}; seed{'s' * (len(seeds) > 1)} {named}")


def table(name, study, points, pairs, caption, more_seeds, run_times, own):
    """NAME.md: every point, then every comparison (study.Comparison) with its interval and where its pairs ran;
    one paired over more than the study's own seeds (own) also over those alone; then the seconds a run took,
    {where it ran: [seconds]}."""
    lines = [f"#### {name}: {study.about}", "", caption, "",
             "| setting | M | p | seeds | final valid acc | final valid error | final train acc |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for point in points:  # the train accuracy shows whether a point fits its training images, as the protocol meant
        values = np.array(list(finals(points[point]).values()))
        train = [r["history"][-1]["train_acc"] for r in points[point].values()]
        lines.append(f"| {point.setting} | {point.dropout_num} | {point.dropout_p} | {len(values)} | {mean_std(values)} "
                     f"| {mean_std(1 - values)} | {mean_std(train)} |")
    lines += ["", "| comparison | seeds paired | Δ final valid acc [95% CI] | 95% half-width | seeds higher / lower "
              "| pairs ran on |", "|---|---:|---:|---:|---:|---|"]
    for c in pairs:
        lines.append(comparison_row(c.label, c.difference, c.ran_on))
        if c.first and c.later:
            lines.append(comparison_row(f"{c.label} (first {c.first['n']} seeds)", c.first, None))
            later = "the seed" if c.later["n"] == 1 else f"the {c.later['n']} seeds"
            lines.append(comparison_row(f"{c.label} ({later} after them)", c.later, None))
    lines += power_lines([c.difference for c in pairs])
    lines += ["", "Δ: the setting's final valid accuracy minus the reference's, seed by seed (a seed gives both the "
              "same initial weights and data order). 95% CI: Student t on the paired differences. Rule, fixed "
              f"before the runs: a comparison whose interval over the study's own {study.seeds} seeds excludes 0 "
              f"(marked *) gets {more_seeds} more seeds; a comparison with more seeds than its own (the rule's, or "
              "another study's runs of the same settings in the same folder) is shown over all of them, over "
              "its first, and over the seeds after those: the test of what the first found. Pairs ran on: "
              "'a / b threads' means the setting's run used a CPU threads and the reference's b (threads change a "
              "CPU run's rounding, so its bits, not its initial weights, data order or masks). Both runs of a pair "
              "ran on one kind of device in one precision; a seed whose runs could not all be paired on one machine "
              "is trained whole on one, and its runs from elsewhere stay out of this folder, uncounted."]
    lines += ["", *run_time_table(run_times)]
    if study.figure == "convergence":
        lines += ["", *epochs_to_target_table(points, pairs, own), "", *per_epoch_table(points, pairs)]
    if study.figure == "samples":
        lines += ["", *losses_table(points, pairs[0].reference)]
    return "\n".join(lines) + "\n"


def run_time_table(run_times):
    """What a run cost, by where it ran: the runs, and the median and range of their seconds."""
    lines = ["Seconds a run, its epochs' training and evaluation summed (metrics.json), by where it ran (runs that "
             "shared the machine took longer):", "", "| ran on | runs | seconds a run: median (min - max) |",
             "|---|---:|---:|"]
    for where, seconds in sorted(run_times.items()):
        lines.append(f"| {where} | {len(seconds)} | {np.median(seconds):,.0f} ({min(seconds):,.0f} - {max(seconds):,.0f}) |")
    return lines


HALF_POINT = 0.005  # the effect size people weigh when choosing a regulariser: half a point of accuracy


def power_lines(differences):
    """How many seeds a comparison would need for a half-width of half a point, at the spread measured here."""
    sd, df = stats.pooled_sd(differences)
    if sd is None:
        return []
    return ["", f"Power: the paired differences' standard deviation, pooled over these comparisons, is {sd:.4f} "
            f"(the comparisons' n − 1 summed: {df}; they share reference runs, so fewer are independent); at that "
            f"spread a 95% half-width of ±{HALF_POINT:.4f} (half a point) takes {stats.seeds_for_half_width(sd, HALF_POINT)} "
            "seeds a comparison."]


def comparison_row(label, d, ran_on):
    half = stats.half_width(d)
    where = "; ".join(f"{k} ×{n}" for k, n in sorted(ran_on.items())) if ran_on else "(as above)"
    return (f"| {label} | {d['n']} | {format_difference(d)}{' *' if stats.excludes_zero(d) else ''} | "
            f"{f'±{half:.4f}' if half is not None else '-'} | {d['higher']} / {d['lower']} | {where} |")


def losses_table(points, reference):
    """The paper's 'fewer iterations' in numbers: each point's mean training loss before the lr drop and at the end,
    the epoch from which it stays below the reference's over the same seeds, and the final valid loss."""
    configs = [r["config"] for runs in points.values() for r in runs.values()]
    milestone = configs[0]["lr_milestone"]
    if len({c["lr_milestone"] for c in configs}) > 1 or not 0 < milestone < min(c["epochs"] for c in configs):
        milestone = None  # no drop within every run: no 'before the drop' column
    before = f"train loss, epoch {milestone}" if milestone else "train loss before the lr drop"
    theirs = curves(points[reference], "train_loss")
    when = f"at epoch {milestone} (the last before the lr drop)" if milestone else "before the lr drop (none here)"
    lines = [f"Losses, mean ± std over each point's seeds: training loss {when} and at the end; 'below M=1 from' is "
             "the epoch from which the mean training loss stays below M=1's mean over the same seeds.", "",
             f"| M | seeds | {before} | train loss, final | below M=1 from epoch | final valid loss |",
             "|---:|---:|---:|---:|---:|---:|"]
    for point, runs in points.items():
        mine = curves(runs, "train_loss")
        train = np.array(list(mine.values()))
        shared = sorted(mine.keys() & theirs.keys())
        since = below_from(np.mean([mine[s] for s in shared], 0), np.mean([theirs[s] for s in shared], 0)) \
            if shared and point != reference else None
        valid = [r["history"][-1]["valid_loss"] for r in runs.values()]
        lines.append(f"| {point.dropout_num} | {len(runs)} | {mean_std(train[:, milestone - 1]) if milestone else '-'} "
                     f"| {mean_std(train[:, -1])} | {since or '-'} | {mean_std(valid)} |")
    return lines


def below_from(mine, theirs):
    """The epoch from which the curve mine stays below theirs, or None where it ends not below."""
    n = min(len(mine), len(theirs))
    not_below = np.flatnonzero(mine[:n] >= theirs[:n])
    if len(not_below) and not_below[-1] == n - 1:
        return None
    return int(not_below[-1]) + 2 if len(not_below) else 1  # the epoch after the last one not below (epochs count from 1)


def epochs_to_target(runs, target):
    """{seed: first epoch whose valid accuracy reaches target, or None}."""
    reached = {}
    for seed, r in runs.items():
        epochs = [row["epoch"] for row in r["history"] if row["valid_acc"] >= target]
        reached[seed] = epochs[0] if epochs else None
    return reached


def epochs_to_target_table(points, pairs, own):
    """Epochs to reach one point below the M=1 runs' mean final valid accuracy, per setting and paired. The mean is
    over the study's own seeds where it has them, so that the rule's more seeds for two points move no other's target."""
    reference = finals(points.get(pairs[0].reference, {}))
    mine = sorted(seed for seed in reference if seed in own)
    target = np.mean([reference[seed] for seed in mine] or list(reference.values()) or [np.nan]) - 0.01
    over = (f"seeds {own[0]}-{own[-1]}" if mine == list(own) else f"seeds {', '.join(map(str, mine))}") if mine else "all seeds"
    lines = [f"Epochs to target: the first epoch whose valid accuracy reaches {target:.4f} (one point below the "
             f"M=1 runs' mean final valid accuracy over {over}); runs that never reach it are counted apart and left "
             "out of the pairs.", "", "| setting | M | runs | epochs to target | never reached |", "|---|---:|---:|---:|---:|"]
    reached = {point: epochs_to_target(runs, target) for point, runs in sorted(points.items())}
    for point, epochs in reached.items():
        hit = [e for e in epochs.values() if e is not None]
        lines.append(f"| {point.setting} | {point.dropout_num} | {len(epochs)} | "
                     f"{mean_std(hit, digits=1) if hit else '-'} | {len(epochs) - len(hit)} |")
    lines += ["", "| comparison | pairs | Δ epochs to target [95% CI] | 95% half-width | seeds sooner / later |",
              "|---|---:|---:|---:|---:|"]
    for c in pairs:
        mine, theirs = reached.get(c.point, {}), reached.get(c.reference, {})
        both = {s for s in mine.keys() & theirs.keys() if mine[s] is not None and theirs[s] is not None}
        d = stats.paired_by_seed({s: mine[s] for s in both}, {s: theirs[s] for s in both})
        if d:
            interval, half = "(one pair)", "-"
            if d["interval"]:
                interval, half = f"[{d['interval'][0]:+.2f}, {d['interval'][1]:+.2f}]", f"±{stats.half_width(d):.2f}"
            lines.append(f"| {c.label} | {d['n']} | {d['mean']:+.2f} {interval} | {half} | {d['lower']} / {d['higher']} |")
    return lines


def per_epoch_differences(points, c, metric):
    """The comparison's paired difference in metric at each epoch its runs share: (epochs, [difference], seeds)."""
    mine, theirs = curves(points[c.point], metric), curves(points[c.reference], metric)
    seeds = sorted(mine.keys() & theirs.keys())
    n = min(len(mine[seeds[0]]), len(theirs[seeds[0]]))
    differences = [stats.paired_difference([mine[s][e] for s in seeds], [theirs[s][e] for s in seeds]) for e in range(n)]
    return epochs_of(points[c.point])[:n], differences, seeds


def per_epoch_table(points, pairs):
    """The numbers under convergence.png: each comparison's paired difference at every epoch, marked where its
    interval excludes zero."""
    columns = [(c, metric) for c in pairs for metric in ("valid_acc", "train_loss")]
    drawn = [per_epoch_differences(points, c, metric) for c, metric in columns]  # (epochs, [difference], seeds) each
    lines = ["Epoch by epoch (convergence.png): the paired difference [95% CI] in valid accuracy and in training loss, "
             "* where the interval excludes 0.", "",
             "| epoch | " + " | ".join(f"{c.label}: Δ {metric.replace('_', ' ')} ({len(seeds)} seeds)"
                                   for (c, metric), (_, _, seeds) in zip(columns, drawn)) + " |",
             "|---:|" + "---:|" * len(columns)]
    epochs = min((epochs for epochs, _, _ in drawn), key=len)
    for e, epoch in enumerate(epochs):
        lines.append(f"| {epoch} | " + " | ".join(format_difference(differences[e]) +
                                                 (" *" if stats.excludes_zero(differences[e]) else "")
                                                 for _, differences, _ in drawn) + " |")
    return lines


def error_bars(ax, x, runs_by_x, label, side=0):
    """Final valid error, mean +- std over seeds, against x; side: where its seed counts go (see seed_counts)."""
    errors = [1 - np.array(list(finals(runs).values())) for runs in runs_by_x]
    means, stds = [e.mean() for e in errors], [e.std(ddof=1) if len(e) > 1 else 0 for e in errors]
    line = ax.errorbar(x, means, yerr=stds, capsize=3, marker="o", label=label).lines[0]
    seed_counts(ax, x, np.add(means, stds), [len(e) for e in errors], side, line.get_color())


N_LEGEND = "n: seeds of a point, pairs of a difference"


def seed_counts(ax, x, tops, counts, side=0, color="dimgrey"):
    """'n=5' over each point's bar, clear of it: the points of one figure may have different numbers of seeds.
    side -1 or 1 puts the counts left or right of the bars' tops, so two series at one x keep theirs apart."""
    for xi, top, n in zip(x, tops, counts):
        ax.annotate(f"n={n}", (xi, top), xytext=(3 * side, 4), textcoords="offset points", va="bottom",
                    ha={-1: "right", 0: "center", 1: "left"}[side], fontsize=7, color=color)
    ax.margins(x=0.08, y=0.15)  # room for the labels over the highest bars


def difference_bars(ax, x, differences, label=None):
    """Paired differences with their 95% intervals (a bare point where there is one seed), the pairs' count, and zero."""
    means, (below, above) = [d["mean"] for d in differences], stats.error_bar(differences)
    ax.errorbar(x, means, yerr=[below, above], fmt="o", capsize=4, label=label)
    seed_counts(ax, x, np.add(means, above), [d["n"] for d in differences])
    ax.axhline(0, color="grey", lw=1)


def samples_figure(path, points, pairs, caption):
    """Left: final valid error against M (log2), and under it each M's paired difference from M=1.
    Right: training loss per epoch, one line per M (the paper's 'fewer iterations')."""
    fig = plt.figure(figsize=(11, 6.5))
    grid = fig.add_gridspec(2, 2, height_ratios=[3, 2])
    top, bottom, right = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[1, 0]), fig.add_subplot(grid[:, 1])
    ms = sorted(p.dropout_num for p in points)
    error_bars(top, ms, [points[p] for p in sorted(points)], "mean ± std over seeds")
    by_m = {c.point.dropout_num: c.difference for c in pairs}
    difference_bars(bottom, sorted(by_m), [by_m[m] for m in sorted(by_m)])
    for ax in (top, bottom):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ms, [str(m) for m in ms])
    label_axes(top, "", "final valid error (mean ± std)", legend=False)
    label_axes(bottom, "dropout samples M (log2 axis)", "Δ accuracy vs M=1 (95% CI)", legend=False)
    for point in sorted(points):
        losses = np.array(list(curves(points[point], "train_loss").values()))
        trainingmonitor.draw_band(right, epochs_of(points[point]), losses,
                                  f"{trainingmonitor.samples_in_words(point.dropout_num)} (n={len(losses)})")
    right.set_yscale("log")
    right.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 0.01, not 10⁻²
    right.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))  # 0.02, 0.05
    label_axes(right, "epoch", "training loss (mean ± std; log axis)", fontsize=8)
    save_figure(fig, path, f"final valid error against the number of dropout samples, and training loss\n{caption}\n{N_LEGEND}")


def epochs_of(runs):
    return next(iter(curves(runs, "epoch").values())).astype(int)


def rate_figure(path, points, pairs, caption):
    """Final valid error against p for M=1 and M=8, and under it their paired difference against p."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 7), height_ratios=[3, 2], sharex=True)
    for side, m in zip((-1, 1), sorted({p.dropout_num for p in points})):  # M=1 and M=8
        line = sorted(p for p in points if p.dropout_num == m)
        error_bars(top, [p.dropout_p for p in line], [points[p] for p in line], trainingmonitor.samples_in_words(m), side)
    label_axes(top, "", "final valid error (mean ± std)", fontsize=8)
    by_p = {c.point.dropout_p: c.difference for c in pairs}
    difference_bars(bottom, sorted(by_p), [by_p[p] for p in sorted(by_p)])
    label_axes(bottom, "dropout probability p", "Δ accuracy, M=8 − M=1 (95% CI)", legend=False)
    save_figure(fig, path, f"final valid error against the dropout probability\n{caption}\n{N_LEGEND}")


def convergence_figure(path, points, pairs, caption):
    """Epoch by epoch: the paired difference in valid accuracy and in training loss, with a 95% band."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, metric, ylabel in zip(axes, ("valid_acc", "train_loss"), ("Δ valid accuracy", "Δ training loss")):
        for c in pairs:
            epochs, per_epoch, seeds = per_epoch_differences(points, c, metric)
            (line,) = ax.plot(epochs, [d["mean"] for d in per_epoch], marker=".", label=f"{c.label} ({len(seeds)} seeds)")
            if all(d["interval"] for d in per_epoch):
                ax.fill_between(epochs, *zip(*[d["interval"] for d in per_epoch]), alpha=0.2, color=line.get_color())
        ax.axhline(0, color="grey", lw=1)
        label_axes(ax, "epoch", f"{ylabel} (95% band)", fontsize=8)
    save_figure(fig, path, f"paired differences epoch by epoch (a seed gives both runs the same start and data order)\n{caption}")


def gain_figure(path, points, pairs, caption):
    trainingmonitor.plot_gain(path, [(c.label, c.difference) for c in pairs], caption,
                              "differences in final valid accuracy, as each label says")


FIGURES = {"samples": samples_figure, "rate": rate_figure, "convergence": convergence_figure, "gain": gain_figure}
