"""Where a run ran: the machine, its threads, the versions and the commit, and where a resumed run's earlier epochs ran.

A CPU run's bits depend on the machine and its thread count, so the tables say where each pair ran, and a resumed
run keeps the record of every place its epochs ran.
"""
from importlib.metadata import version

import numpy as np
import torch

import hardware
import tools

PLACE = ("device", "hardware", "threads", "torch", "torchvision", "numpy", "git_commit", "git_dirty")  # where it ran


def place_now(device):
    """config.json's fields for where this process trains: PLACE's, and on CUDA whether TF32 was on."""
    commit, dirty = tools.git_state()
    return dict(device=str(device), hardware=hardware.describe(device), threads=torch.get_num_threads(),
                torch=str(torch.__version__), torchvision=version("torchvision"), numpy=np.__version__,
                **hardware.tf32_state(device), git_commit=commit, git_dirty=dirty)


def earlier_places(saved, config, epoch):
    """Where the epochs up to this resume ran, one entry per change of machine, threads, versions or commit: a run
    resumed elsewhere keeps the record of each place, while config.json's own fields say where it runs now."""
    place = {k: saved[k] for k in PLACE if k in saved}  # an older run may lack some: not a move
    moved = any(place[k] != config[k] for k in place)
    return [*saved.get("earlier", []), *([{"until_epoch": epoch, **place}] if moved else [])]


def resume_threads(saved, device):
    """On a CPU a run's bits depend on its thread count, so on the machine it began on it resumes with the count it
    began with (elsewhere the bits differ anyway, and the cores may be fewer): '' or a note saying so."""
    began, now = saved.get("threads"), torch.get_num_threads()
    if device.type != "cpu" or began in (None, now) or saved.get("hardware") != hardware.describe(device):
        return ""
    torch.set_num_threads(began)
    return f" with the {began} thread(s) it began with, not this process's {now}"
