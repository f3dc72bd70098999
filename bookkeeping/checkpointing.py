"""What makes a run resumable bit for bit: its seeds, every RNG state it draws from, and the checkpoint file."""
import errno
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from bookkeeping import experiment, runfiles
from tools import UserError


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state(generator):
    """Every RNG a run draws from, as tensors and lists so torch.load(weights_only=True) reads it."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": _to_lists(random.getstate()),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "mps": torch.mps.get_rng_state() if torch.backends.mps.is_available() else None,
        "generator": generator.get_state(),  # shuffling and augmentation
    }


def set_rng_state(state, generator):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if state["mps"] is not None and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])
    generator.set_state(state["generator"])


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


CHECKPOINT_SLACK = 64 << 20  # bytes: a failed save with less than this free is a full disk (a checkpoint is 10 to 135 MB)
TORCH_WRITE_FAILURES = ("unexpected pos", "PytorchStreamWriter failed")  # how torch.save reports a write that failed


def checkpoint_writer(checkpoint):
    """What tools.atomic_writes calls with the temporary file. torch.save reports a failed write as a RuntimeError:
    here it is an OSError, as any other failed write is, and says so when the disk is full."""
    def write(tmp):
        try:
            torch.save(checkpoint, tmp)
        except RuntimeError as e:
            full = shutil.disk_usage(Path(tmp).parent).free < CHECKPOINT_SLACK
            if not full and not any(failure in str(e) for failure in TORCH_WRITE_FAILURES):
                raise  # not a write that failed: a bug, with its traceback
            reason = os.strerror(errno.ENOSPC) if full else f"torch.save failed: {' '.join(str(e).split())}"
            raise OSError(errno.ENOSPC if full else errno.EIO, reason) from None
    return write


# What to do about a checkpoint that cannot be read, when training would continue it, and when a command names it.
RETRAIN = ("move it away to keep the run's metrics (a finished run is then skipped), or rerun with --overwrite to train "
           "the run afresh, deleting them")
RESTORE = "restore it from a copy: the weights are only in that file"


def load_checkpoint(path, advice=RETRAIN):
    """weights_only=True: a checkpoint file can hold tensors and plain data, never code."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}): {advice}")
    return runfiles.check_checkpoint(path, checkpoint)


def load_state(module, state, path):
    """module.load_state_dict(state) (a model's or an optimizer's); a checkpoint of another version of the network
    is one line, not a traceback."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} does not fit this code's {type(module).__name__} ({first_line}): use the code it was "
                        "trained with (the git_commit in its config.json)")


def epochs_done(run_dir, config):
    """The epochs run_dir holds of this run (0: none), after checking it is the same experiment. A folder with
    metrics but no checkpoint (a committed run, say) counts: it is never taken for a fresh run."""
    if (run_dir / "last.pt").exists():
        checkpoint = load_checkpoint(run_dir / "last.pt")
        experiment.check_same_experiment(checkpoint["config"], config, run_dir / "last.pt")
        return checkpoint["epoch"]
    if not os.path.lexists(run_dir / "metrics.json"):
        return 0
    saved = runfiles.read_config(run_dir / "config.json")
    experiment.check_same_experiment(saved, config, run_dir / "config.json")
    history = runfiles.read_history(run_dir / "metrics.json")
    return history[-1]["epoch"] if history else 0


def resumable_checkpoint(run_dir, config):
    """The checkpoint to continue from (None: a fresh run); metrics without a checkpoint are refused, not replaced."""
    path = run_dir / "last.pt"
    if not path.exists():
        if (run_dir / "metrics.json").exists():
            raise UserError(f"{run_dir} holds metrics up to epoch {epochs_done(run_dir, config)} of this run but no "
                            "checkpoint (last.pt) to continue from: use another --output_dir, or --overwrite to train "
                            "it afresh (deleting them)")
        return None
    checkpoint = load_checkpoint(path)
    saved = checkpoint["config"]
    if saved.get("world_size", 1) != config["world_size"]:  # each rank's RNG state is in the checkpoint
        raise UserError(f"{path} was trained by {saved.get('world_size', 1)} rank(s), this command runs "
                        f"{config['world_size']}: resume it with {saved.get('world_size', 1)} "
                        "(torchrun --nproc_per_node, or python run.py for 1)")
    if saved.get("sync_bn", False) != config["sync_bn"]:
        raise UserError(f"{path} was trained {'with' if saved.get('sync_bn') else 'without'} --sync_bn; "
                        "resume it the same way")
    return checkpoint


def saved_checkpoint(run_dir):
    """The checkpoint of a run directory named by hand (--resume, --eval)."""
    path = Path(run_dir) / "last.pt"
    if not path.is_file():
        raise UserError(f"{run_dir} holds no checkpoint (last.pt); give a run directory of an earlier run "
                        "(outputs/<run name>/, or the --output_dir it used)")
    return load_checkpoint(path, RESTORE)
