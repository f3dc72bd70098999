"""One run, one trainer: a lock per run folder, held for as long as a process trains it.

The lock is an flock on a hidden file beside the run folder (the folder itself appears only with the
first saved epoch; folders the lock had to make go again if nothing was saved in them). The kernel releases it when the process ends, however it ends, so a lock left by
a killed process never blocks a rerun. The file says who holds it, for the refusal's message.
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
def hold(run_dir, rank=0):
    """Hold run_dir's lock for the block, or raise RunHeld naming the process that holds it. The file goes when
    the block ends; a killed holder leaves it behind, unlocked, and the next process takes it over."""
    path = lock_path(run_dir, rank)
    made = tools.missing_folders(path.parent)  # ours to remove if nothing is saved in them
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            f = open(path, "a+")
        except FileNotFoundError:  # another process's clean-up removed the folder it made, between mkdir and open
            continue
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunHeld(f"{run_dir} is being trained by {holder}; wait for it to finish (a rerun then skips the "
                          "run), or stop that process") from None
        if path.exists() and os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
            break  # still the file at `path`: not one a finishing holder removed while we opened it
        f.close()
    try:
        f.truncate(0)
        f.write(f"process {os.getpid()} on {socket.gethostname()} (since {datetime.datetime.now():%Y-%m-%d %H:%M:%S})\n")
        f.flush()
        yield
    finally:
        path.unlink(missing_ok=True)  # before the flock goes, so no one takes over a file that is about to vanish
        f.close()
        tools.remove_if_empty(made)

