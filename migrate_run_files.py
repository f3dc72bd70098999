"""Once: bring every committed config.json to today's format, so the readers need no shims for older runs.

    python migrate_run_files.py docs

In config.json, adds the defining flags that came after a run was trained, at the value that run had in effect (their defaults:
no R-Drop, no validation split, the blog's head, eager, one process), and drops what the command did rather than
what the run is (--compare, --resume, --eval). Names, hashes and metrics stay as they are (the run's name is
checked before each write). In a checkpoint (last.pt) of a single process, the generator's state moves from
"rng" to "rank_rng", the list of every rank's that torchrun's checkpoints hold. Deleted once run: today's code
writes this format.
"""
import json
import sys
from pathlib import Path

import torch

from experiment import run_identity

ADDED_LATER = {"rdrop_alpha": 0.0, "valid_split": 0, "head_hidden": 0, "pool": "avg4", "diversity": "none",
               "msd_reduce": "loss", "msd_heads": "shared", "compile": False, "sync_bn": False, "world_size": 1}
COMMAND_ONLY = ("compare", "resume", "eval")


def migrate(path):
    text = path.read_text(encoding="utf-8")
    config = json.loads(text)
    name = run_identity(config)[0]
    new = {k: v for k, v in config.items() if k not in COMMAND_ONLY}
    new.update({k: v for k, v in ADDED_LATER.items() if k not in new})
    assert run_identity(new)[0] == name == path.parent.name, path
    out = json.dumps(new, indent=2) + "\n"
    if out != text:
        path.write_text(out, encoding="utf-8")
        return True
    return False


def migrate_checkpoint(path):
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if "rng" not in checkpoint:
        return False
    rng = checkpoint.pop("rng")
    checkpoint.setdefault("rank_rng", [rng])
    checkpoint["config"] = {k: v for k, v in checkpoint["config"].items() if k not in COMMAND_ONLY}
    checkpoint["config"].update({k: v for k, v in ADDED_LATER.items() if k not in checkpoint["config"]})
    torch.save(checkpoint, path)
    return True


if __name__ == "__main__":
    changed = [p for p in sorted(Path(sys.argv[1]).rglob("config.json")) if migrate(p)]
    print(f"{len(changed)} config.json brought to today's format")
    changed = [p for p in sorted(Path(sys.argv[1]).rglob("last.pt")) if migrate_checkpoint(p)]
    print(f"{len(changed)} last.pt brought to today's format")
