"""File locks: one trainer per run, and one download per data folder.

A lock is an flock on a hidden file that says who holds it, for the others' messages. The kernel releases it when
the process ends, however it ends, so a lock left by a killed process never blocks a rerun. A run's lock file sits
beside the run folder (the folder itself appears only with the first saved epoch); folders a lock had to make go
again if nothing was saved in them.
"""
import contextlib
import datetime
import fcntl
import os
import socket
from pathlib import Path

import tools
from tools import UserError

HELD = 75  # run.py's exit status when another process trains the run (EX_TEMPFAIL: try again later)


class RunHeld(UserError):
    """Another process trains this run; study.py --workers moves on to the next run."""


def lock_path(run_dir, rank=0):
    """Each torchrun rank takes its own: two launches of one run collide on every rank, so all of the second stop."""
    run_dir = Path(run_dir)
    return run_dir.parent / f".{run_dir.name}{f'.rank{rank}' if rank else ''}.lock"


@contextlib.contextmanager
def hold(run_dir, rank=0, made=None):
    """Hold run_dir's lock for the block, or raise RunHeld naming the process that holds it. made: the folders to
    remove at the end if nothing is saved in them (default: those this process finds missing)."""
    path = lock_path(run_dir, rank)
    made = tools.missing_folders(path.parent) if made is None else made
    f, holder = _locked_file(path, wait=False)
    if f is None:
        raise RunHeld(f"{run_dir} is being trained by {holder or 'another process'}; wait for it to finish (a rerun "
                      "then skips the run), or stop that process")
    with _holding(f, path, made):
        yield


@contextlib.contextmanager
def waiting(path, what, made=None):
    """Hold the lock at path for the block; while another process holds it (to `what`: download X, say), say so
    and wait for it. made: as for hold."""
    path = Path(path)
    made = tools.missing_folders(path.parent) if made is None else made
    f, holder = _locked_file(path, wait=False)
    if f is None:
        print(f"waiting for {holder or 'another process'} to {what}", flush=True)
        f, _ = _locked_file(path, wait=True)
    with _holding(f, path, made):
        yield


def _locked_file(path, wait):
    """(the lock file at path, open and flocked by us, None), or (None, what its holder wrote) if not waiting."""
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            f = open(path, "a+")
        except FileNotFoundError:  # another process's clean-up removed the folder it made, between mkdir and open
            continue
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip()
            f.close()
            return None, holder
        if path.exists() and os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
            return f, None  # still the file at `path`: not one a finishing holder removed while we opened it
        f.close()


@contextlib.contextmanager
def _holding(f, path, made):
    """Write who holds the lock; when the block ends the file goes, then the lock, then the folders made for it
    (where still empty). A killed holder leaves the file behind, unlocked, and the next process takes it over."""
    try:
        f.truncate(0)
        f.write(f"process {os.getpid()} on {socket.gethostname()} (since {datetime.datetime.now():%Y-%m-%d %H:%M:%S})\n")
        f.flush()
        yield
    finally:
        path.unlink(missing_ok=True)  # before the flock goes, so no one takes over a file that is about to vanish
        f.close()
        tools.remove_if_empty(made)
