"""The tables of a comparison (summary.md): every setting's mean over seeds, every run, and the paired differences."""
import numpy as np

from studies import stats
from studies.stats import format_difference


def summary_markdown(groups):
    """Per (dropout_num, p, R-Drop alpha): mean +- std over seeds at the last epoch all of them reached, and epochs to the
    dropout_num=1 runs' best; then every run on its own line."""
    lines = ["| dropout_num | p | R-Drop α | seeds | epochs | final valid acc | best valid acc | final train loss | final valid loss "
             "| epochs to M=1's best | test acc |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for g in groups:
        c = g["curves"]
        test = [r["test"]["test_acc"] for r in g["runs"] if r["test"]]
        lines.append(f"| {g['dropout_num']} | {g['dropout_p']} | {g['rdrop_alpha']} | {len(g['runs'])} | {g['epochs'][-1]} | "
                     f"{mean_std(c['valid_acc'][:, -1])} | {mean_std(c['valid_acc'].max(1))} | "
                     f"{mean_std(c['train_loss'][:, -1])} | {mean_std(c['valid_loss'][:, -1])} | "
                     f"{epochs_to_reach(g['epochs'], c['valid_acc'].mean(0), m1_best(g, groups))} | "
                     f"{mean_std(np.array(test)) if test else '-'} |")
    lines += ["", "M=1's best: the best point of the mean valid accuracy curve of the dropout_num=1 runs with the same p; "
              "epochs to M=1's best: the first epoch at which the mean curve (per seed: the run's curve) reaches it.", "",
              "| dropout_num | p | R-Drop α | seed | epochs | final valid acc | best valid acc (epoch) | final train loss "
              "| final valid loss | epochs to M=1's best | run |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for g in groups:
        for r, curve in zip(g["runs"], g["curves"]["valid_acc"]):
            last, best = r["history"][len(curve) - 1], r["history"][int(curve.argmax())]
            lines.append(f"| {g['dropout_num']} | {g['dropout_p']} | {g['rdrop_alpha']} | {r['config']['seed']} | {last['epoch']} | "
                         f"{last['valid_acc']:.4f} | {best['valid_acc']:.4f} ({best['epoch']}) | "
                         f"{last['train_loss']:.4f} | {last['valid_loss']:.4f} | "
                         f"{epochs_to_reach(g['epochs'], curve, m1_best(g, groups))} | {r['dir'].name} |")
    return "\n".join(lines) + "\n"


def paired_markdown(groups):
    """Every setting against the dropout_num=1 and the dropout_num=0 runs with the same p, seed by seed."""
    lines = ["#### Paired differences", "", "| setting | against | seeds | Δ final valid acc [95% CI] | seeds higher / lower "
             "| Δ best valid acc [95% CI] | seeds higher / lower |", "|---|---|---:|---:|---:|---:|---:|"]
    rows = paired_rows(groups, 1) + paired_rows(groups, 0)
    for g, ref, final, best in rows:
        lines.append(f"| {g['name']} | {ref['name']} | {final['n']} | {format_difference(final)} | {final['higher']} / "
                     f"{final['lower']} | {format_difference(best)} | {best['higher']} / {best['lower']} |")
    if not rows:
        lines.append("| no setting shares seeds with a dropout_num=1 or dropout_num=0 group | | | | | | |")
    lines += ["", "Δ: the setting minus the reference, seed by seed (runs with the same seed start from the same weights "
              "and see the images in the same order), averaged over the seeds both have; final: at the last epoch both "
              "reached; best: each run's highest valid accuracy. 95% CI: Student t on the paired differences (n - 1 "
              "degrees of freedom); with one seed no interval can be given. Seeds higher / lower: how many seeds favour "
              "the setting / the reference (ties in neither)."]
    return "\n".join(lines) + "\n"


def paired_rows(groups, reference_m):
    """(group, reference group, final, best) for every group against the dropout_num=reference_m group with its p."""
    rows = []
    by_seed = lambda group: {r["config"]["seed"]: c for r, c in zip(group["runs"], group["curves"]["valid_acc"])}
    for g in groups:
        ref = next((r for r in groups if r["dropout_num"] == reference_m and r["dropout_p"] == g["dropout_p"]
                    and not r["rdrop_alpha"]), None)
        mine, theirs = by_seed(g), by_seed(ref) if ref else {}
        if ref is g or not mine.keys() & theirs.keys():
            continue
        n = min(len(g["epochs"]), len(ref["epochs"]))  # the epochs both groups reached
        final = lambda curves: {seed: curve[n - 1] for seed, curve in curves.items()}
        best = lambda curves: {seed: curve[:n].max() for seed, curve in curves.items()}
        rows.append((g, ref, stats.paired_by_seed(final(mine), final(theirs)), stats.paired_by_seed(best(mine), best(theirs))))
    return rows


def m1_best(group, groups):
    """The best point of the mean curve of the dropout_num=1 runs with this group's p, or None."""
    reference = [g for g in groups if g["dropout_num"] == 1 and g["dropout_p"] == group["dropout_p"] and not g["rdrop_alpha"]]
    return reference[0]["curves"]["valid_acc"].mean(0).max() if reference else None


def epochs_to_reach(epochs, curve, target):
    if target is None:
        return "no dropout_num=1 runs"
    reached = np.flatnonzero(curve >= target)
    return str(int(epochs[reached[0]])) if len(reached) else "not reached"


def mean_std(values, digits=4):
    values = np.asarray(values, float)
    return f"{values.mean():.{digits}f}" + (f" ± {values.std(ddof=1):.{digits}f}" if len(values) > 1 else "")
