"""What makes a run resumable bit for bit: its seeds, every RNG state it draws from, and the checkpoint file."""
import random

import numpy as np
import torch

import runfiles
from tools import UserError, atomic_write


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


def save_checkpoint(path, checkpoint):
    atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


def load_checkpoint(path):
    """weights_only=True: a checkpoint file can hold tensors and plain data, never code."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}); rerun with --overwrite to start afresh")
    return runfiles.check_checkpoint(path, checkpoint)
