"""A run's metrics files as training writes them, and its files as it left them, checked on reading: config.json,
metrics.json and the checkpoint.

Our own writes are atomic, so a damaged file was cut by a failed copy or edited by hand. Each way it can
be damaged (cut, not UTF-8, a folder in its place, a missing key, a value of the wrong type, a number
that is not finite) is one clear line naming the file, never a traceback and never a wrong table.
"""
import csv
import io
import json
import math
import os
from pathlib import Path

from bookkeeping.experiment import run_identity
from tools import UserError, json_writer, text_writer

# The keys every reader relies on, and their types (bool is not a number here, though Python says so).
CONFIG_KEYS = {"model": str, "dataset": str, "dropout_num": int, "dropout_p": (int, float), "seed": int, "epochs": int,
               "precision": str, "device": str, "setup": str, "data_source": str, "data_dir": str,
               "rdrop_alpha": (int, float), "valid_split": int, "head_hidden": int, "pool": str, "diversity": str,
               "msd_reduce": str, "msd_heads": str, "compile": bool}
OPTIONAL_CONFIG_KEYS = {"earlier": list,  # a resumed run's: where its earlier epochs ran
                        "cuda_graph": bool}  # written since --cuda_graph exists; without it, off
# Keys that older versions of this code did not write: a run without one is old, not damaged.
OLDER_FORMAT = {"data_source", "data_dir", "rdrop_alpha", "valid_split", "head_hidden", "pool", "diversity",
                "msd_reduce", "msd_heads", "compile", "rank_rng"}
EARLIER_KEYS = {"until_epoch": int, "device": str}  # and the other fields of provenance.PLACE, as the run had them
ROW_KEYS = {"epoch": int, "lr": (int, float), "train_loss": (int, float), "train_acc": (int, float),
            "valid_loss": (int, float), "valid_acc": (int, float), "seconds": (int, float)}
CHECKPOINT_KEYS = {"epoch": int, "config": dict, "history": list, "model": dict, "optimizer": dict,
                   "rank_rng": list}  # each rank's generator state, so a resume draws what the run would have
FIELDS = ["epoch", "lr", "train_loss", "train_acc", "valid_loss", "valid_acc", "seconds"]  # a row's, in order
ROW_NUMBERS = FIELDS[1:]  # the floats, each of which must be finite


def metrics_files(run_dir, history):
    """[(path, write)] for tools.atomic_writes: metrics.csv and .json, a row per epoch, floats at full precision."""
    out = io.StringIO()
    writer = csv.DictWriter(out, FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return [(run_dir / "metrics.csv", text_writer(out.getvalue())),
            (run_dir / "metrics.json", json_writer(history))]


def damaged(path, problem):
    return UserError(f"{path}: {problem}; restore it from where it came from, or move its run folder away")


def read_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise damaged(path, f"not valid JSON ({e}): it may be truncated") from None
    except UnicodeDecodeError:
        raise damaged(path, "not UTF-8 text") from None
    except OSError as e:
        raise damaged(path, f"cannot be read ({e.strerror or e})") from None


def check_keys(path, values, keys, what, optional=None):
    """Every key of `keys` present and of its type; each of `optional` of its type where present."""
    if not isinstance(values, dict):
        raise damaged(path, f"{what} is a {type(values).__name__}, not a JSON object")
    for key, kind in {**keys, **{k: v for k, v in (optional or {}).items() if k in values}}.items():
        if key in OLDER_FORMAT and key not in values:
            raise UserError(f"{path}: {what} has no {key!r}, so an older version of this code wrote it; finish or "
                            "redraw the run with that version (its config.json names the git commit), or train it "
                            "afresh with --overwrite")
        if key not in values:
            raise damaged(path, f"{what} has no {key!r}")
        if isinstance(values[key], bool) != (kind is bool) or not isinstance(values[key], kind):
            raise damaged(path, f"{what}'s {key!r} is {values[key]!r}, not of the type a run writes")


def check_config(path, config, what="the config"):
    check_keys(path, config, CONFIG_KEYS, what, OPTIONAL_CONFIG_KEYS)
    for i, place in enumerate(config.get("earlier", []), 1):  # where a resumed run's earlier epochs ran
        check_keys(path, place, EARLIER_KEYS, f"{what}'s earlier place {i}")
    return config


def read_config(path):
    return check_config(path, read_json(path))


def check_history(path, history):
    """Rows with every key a reader needs, numbers that are numbers, and all of them finite."""
    if not isinstance(history, list):
        raise damaged(path, f"the metrics are a {type(history).__name__}, not a list of rows")
    for i, row in enumerate(history, 1):
        check_keys(path, row, ROW_KEYS, f"row {i}")
        for key in ROW_NUMBERS:
            value = row.get(key, 0.0)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise damaged(path, f"row {i}'s {key!r} is {value!r}, not a number")
            if not math.isfinite(value):
                raise damaged(path, f"row {i}'s {key!r} is {value}: a non-finite metric is not drawn or compared")
    return history


def read_history(path):
    return check_history(path, read_json(path))


def check_checkpoint(path, checkpoint):
    """A checkpoint torch could read, with what resuming and evaluating take from it."""
    check_keys(path, checkpoint, CHECKPOINT_KEYS, "the checkpoint")
    check_config(path, checkpoint["config"], "the checkpoint's config")
    check_history(path, checkpoint["history"])
    last = checkpoint["history"][-1]["epoch"] if checkpoint["history"] else 0
    if last != checkpoint["epoch"]:
        raise damaged(path, f"the checkpoint says epoch {checkpoint['epoch']} but its metrics end at epoch {last}")
    return checkpoint


def saved_run_dirs(output_dir):
    """The folders under output_dir that hold a run's saved rows: metrics.json or last.pt, even as a broken link."""
    try:
        folders = sorted(p for p in Path(output_dir).iterdir() if p.is_dir())
    except FileNotFoundError:
        return []
    except OSError as e:  # a name too long for the file system, a loop of links, say
        raise UserError(f"cannot read {output_dir} ({e.strerror or e}); give another folder") from None
    return [d for d in folders if any(os.path.lexists(d / name) for name in ("metrics.json", "last.pt"))]


def finished_runs(output_dir):
    """Every run under output_dir that reached the epochs it was asked for: dir, config, history, test. A folder
    with saved rows has its config.json and metrics.json (training writes them together): one without is damaged."""
    runs = []
    for run_dir in saved_run_dirs(output_dir):  # training renames the checkpoint into place last: each has both files
        config = read_config(run_dir / "config.json")
        history = read_history(run_dir / "metrics.json")
        if history and history[-1]["epoch"] >= config["epochs"]:
            test = read_json(run_dir / "test.json") if os.path.lexists(run_dir / "test.json") else None
            runs.append({"dir": run_dir, "config": config, "history": history, "test": test})
    return runs


def final_accuracies(runs):
    """{seed: final valid accuracy} of {seed: run}."""
    return {seed: r["history"][-1]["valid_acc"] for seed, r in runs.items()}


def one_per_identity(runs):
    """The runs, refused if two are the same run (a copied folder, say): a comparison counts each run once."""
    seen = {}
    for r in runs:
        name = run_identity(r["config"])[0]
        if name in seen:
            raise UserError(f"{seen[name]} and {r['dir']} are the same run ({name}): a comparison counts each run "
                            "once, so move one of them out of the folder")
        seen[name] = r["dir"]
    return runs
