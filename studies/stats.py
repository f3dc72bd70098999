"""Paired statistics over seeds.

Runs with the same seed start from the same weights and see the images in the same order (a test
checks it), whatever their dropout_num, so two settings are compared seed by seed: the spread
between seeds cancels out of the differences.
"""
import numpy as np
from scipy import stats

CONFIDENCE = 0.95


def paired_difference(setting, reference):
    """setting - reference, pair by pair: {'n', 'mean', 'interval' and 'sd' (None with one pair), 'higher', 'lower'}.

    The interval is Student t's on the paired differences (n - 1 degrees of freedom), as in a paired
    t-test: mean +- t * sd / sqrt(n).
    """
    d = np.asarray(setting, float) - np.asarray(reference, float)
    interval = None
    if len(d) > 1:
        half = stats.t.ppf((1 + CONFIDENCE) / 2, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
        interval = (float(d.mean() - half), float(d.mean() + half))
    return {"n": len(d), "mean": float(d.mean()), "interval": interval, "sd": float(d.std(ddof=1)) if len(d) > 1 else None,
            "higher": int((d > 0).sum()), "lower": int((d < 0).sum())}


def paired_by_seed(setting, reference):
    """paired_difference over the seeds both {seed: value} maps hold, in seed order; None if they share none."""
    seeds = sorted(setting.keys() & reference.keys())
    return paired_difference([setting[s] for s in seeds], [reference[s] for s in seeds]) if seeds else None


def excludes_zero(d):
    """Whether a paired difference's interval lies wholly above or below zero."""
    return bool(d["interval"]) and (d["interval"][0] > 0 or d["interval"][1] < 0)


def half_width(d):
    """Half the width of a paired difference's interval, or None without one."""
    return (d["interval"][1] - d["interval"][0]) / 2 if d["interval"] else None


def error_bar(differences):
    """[below, above] each mean to its interval's ends, for matplotlib's errorbar: 0 where one seed has no interval."""
    return [[d["mean"] - d["interval"][0] if d["interval"] else 0 for d in differences],
            [d["interval"][1] - d["mean"] if d["interval"] else 0 for d in differences]]


def format_difference(d):
    interval = f"[{d['interval'][0]:+.4f}, {d['interval'][1]:+.4f}]" if d["interval"] else "(one seed: no interval)"
    return f"{d['mean']:+.4f} {interval}"


def pooled_sd(differences):
    """The paired differences' standard deviation pooled over comparisons (weighted by degrees of freedom), with
    those degrees of freedom; (None, 0) where none has two pairs."""
    spread = [(d["n"] - 1, d["sd"]) for d in differences if d["sd"] is not None]
    df = sum(n for n, _ in spread)
    return (float(np.sqrt(sum(n * sd ** 2 for n, sd in spread) / df)), df) if df else (None, 0)


def seeds_for_half_width(sd, half_width):
    """The fewest pairs whose 95% t interval is no wider than +-half_width at this spread of the differences."""
    n = 2
    while stats.t.ppf((1 + CONFIDENCE) / 2, n - 1) * sd / np.sqrt(n) > half_width:
        n += 1
    return n
