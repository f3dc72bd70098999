"""Where a run ran: the machine, its threads, the versions and the commit, and where a resumed run's earlier epochs ran;
as a run records it, and as the study tables show it.

A CPU run's bits depend on the machine and its thread count, so the tables say where each pair ran, and a resumed
run keeps the record of every place its epochs ran.
"""
from importlib.metadata import version

import tools

PLACE = ("device", "hardware", "threads", "torch", "torchvision", "numpy", "git_commit", "git_dirty")  # where it ran


def trains_now(device, checkpoint=None):
    """config.json's fields for where the run trains now, and, resumed, where its earlier epochs ran if elsewhere."""
    now = place_now(device)
    earlier = earlier_places(checkpoint["config"], now, checkpoint["epoch"]) if checkpoint else []
    return {**now, **({"earlier": earlier} if earlier else {})}


def place_now(device):
    """config.json's fields for where this process trains: PLACE's, and on CUDA whether TF32 was on."""
    import numpy as np  # here, not above: the tables read where finished runs ran without torch
    import torch

    from bookkeeping import hardware
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
    import torch

    from bookkeeping import hardware
    began, now = saved.get("threads"), torch.get_num_threads()
    if device.type != "cpu" or began in (None, now) or saved.get("hardware") != hardware.describe(device):
        return ""
    torch.set_num_threads(began)
    return f" with the {began} thread(s) it began with, not this process's {now}"


def kind_and_precision(config):
    """(kind of device, precision): what both runs of a pair share, or they are two draws. A run resumed on another
    kind of device names each kind its epochs ran on."""
    return "+".join(sorted({c["device"].split(":")[0] for c in [*config.get("earlier", []), config]})), config["precision"]


def where(run):
    """The machine, precision and (on a CPU, where they change the bits) threads a run used, as the tables show it,
    and the machines its earlier epochs ran on where it was resumed on another."""
    threads, c = cpu_threads(run), run["config"]
    moves = [f"; epochs {first}-{last} on {hardware}, {c['precision']}" for first, last, hardware in elsewhere(c)]
    return machine(run) + (f", {threads} thread{'s' * (threads != 1)}" if threads else "") + "".join(moves)


def elsewhere(config):
    """(first epoch, last epoch, machine) of each stretch of a resumed run's epochs on a machine other than its latest
    (neighbouring entries on one machine, after a change of commit say, make one stretch)."""
    stretches, first = [], 1
    for e in config.get("earlier", []):
        hardware = e.get("hardware")  # None: the run did not record its machine then
        if stretches and stretches[-1][2] == hardware:
            stretches[-1][1] = e["until_epoch"]
        else:
            stretches.append([first, e["until_epoch"], hardware])
        first = e["until_epoch"] + 1
    return [tuple(s) for s in stretches if s[2] not in (None, config.get("hardware"))]


def machine(run):
    c = run["config"]
    return f"{c.get('hardware') or c['device']}, {c['precision']}"


def cpu_threads(run):
    c = run["config"]
    return c.get("threads") if str(c.get("device", "")).startswith("cpu") else None


def where_pair(a, b):
    """Where a pair ran: one place if both ran there; the machine once if only the threads differ."""
    threads = cpu_threads(a), cpu_threads(b)
    if machine(a) == machine(b) and None not in threads and threads[0] != threads[1]:
        return f"{machine(a)}, {threads[0]} / {threads[1]} threads"
    return " / ".join(dict.fromkeys([where(a), where(b)]))
