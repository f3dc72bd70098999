"""Small helpers with no torch in them (so --help stays instant): user errors, stop signals, atomic files, git state."""
import contextlib
import errno
import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path


class UserError(Exception):
    """Bad input: run.py prints the message as one line and exits 2."""


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; the training loop stopped at a step boundary."""


STOP = {}  # {'signal': name} once SIGINT or SIGTERM arrived


def stop_on_signals(second_stops_at_once=True):
    """SIGINT/SIGTERM ask the training loop to stop at the next step; a second one stops at once, unless
    second_stops_at_once is off (under torchrun a Ctrl-C reaches a worker twice: from the terminal and the launcher)."""
    def request_stop(signum, frame):
        if STOP and second_stops_at_once:
            raise KeyboardInterrupt
        STOP["signal"] = signal.Signals(signum).name

    return _on_signals(request_stop)


def interrupts():
    """For commands that only read and draw: SIGTERM raises KeyboardInterrupt as SIGINT does, so either stops the
    command at once and atomic_write removes its temporary file on the way out. STOP records which it was."""
    def interrupt(signum, frame):
        STOP["signal"] = signal.Signals(signum).name
        raise KeyboardInterrupt

    return _on_signals(interrupt)


@contextlib.contextmanager
def _on_signals(handler):
    """handler for SIGINT and SIGTERM during the block, with STOP cleared first; the previous handlers after."""
    STOP.clear()
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def quiet_start(prog):
    """For an entry point, before its heavy imports (torch, matplotlib, scipy: seconds): SIGINT or SIGTERM meanwhile
    ends the command with one line, not an import's traceback. main() calls started() to take signals back."""
    def stop(signum, frame):
        print(f"{prog}: stopped by {signal.Signals(signum).name} while starting; nothing was done", file=sys.stderr)
        sys.exit(128 + signum)

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, stop)


def started():
    """For main(): Python's own signal handling back (a KeyboardInterrupt for SIGINT), under the handlers it sets;
    and a file name that is not UTF-8 printed with its odd bytes escaped, as the reports write it, not a crash."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def stopped_status():
    """The exit status of a command stopped by a signal: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + signal.Signals[STOP.get("signal", "SIGINT")].value


def atomic_write(path, write):
    """Call write(tmp_path), then rename over `path`: a crash leaves the old file whole."""
    atomic_writes([(path, write)])


def atomic_writes(files):
    """atomic_write for several (path, write) at once: each written and synced to a temporary file first, then all
    renamed in their order, one right after the other, so that a stop can fall between two only for microseconds."""
    temps = []
    try:
        for path, write in files:
            fd, tmp = tempfile.mkstemp(dir=Path(path).parent, prefix=f".{Path(path).name}.", suffix=".tmp")
            os.close(fd)
            temps.append((tmp, path))
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it owner-only; the user gets what open() would give
            write(tmp)
            with open(tmp, "rb+") as f:  # on disk before the rename, so a power cut cannot leave an empty file
                os.fsync(f.fileno())
        for tmp, path in temps:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in temps:
            Path(tmp).unlink(missing_ok=True)
        raise


def _umask():
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def json_writer(obj):
    return text_writer(json.dumps(obj, indent=2) + "\n")


def text_writer(text):
    """What atomic_write calls to write text: UTF-8, whatever the file names in it. A name the file system took that
    is not UTF-8 (Python holds its odd bytes as lone surrogates) is written with them as backslash escapes."""
    return lambda tmp: Path(tmp).write_bytes(text.encode("utf-8", errors="backslashreplace"))


def require_path(value, flag):
    """An empty string is refused, never read as 'not given'; so is a name longer than the file system takes."""
    if value == "":
        raise UserError(f"{flag} needs a path, got an empty string")
    if value is not None:
        try:
            os.stat(value)
        except OSError as e:  # a missing path is for the command to judge: it may be about to make it
            if e.errno == errno.ENAMETOOLONG:
                raise UserError(f"{flag} {value[:40]}...: a name too long for the file system; give a shorter path")
            if e.errno == errno.ELOOP:
                raise UserError(f"{flag} {value}: a symbolic link that leads back to itself; point it at a folder, "
                                "or give another path")
    return value


def check_writable(folder, flag="--output_dir", advice=None):
    """Refuse a folder that cannot be written, before any work, saying `advice` (default: choose another `flag`);
    nothing is left behind (the folder is not made: the first save makes it). A temporary file, not os.access: root
    passes os.access on a read-only mount."""
    folder = Path(folder)
    try:
        existing = next(p for p in [folder, *folder.parents] if p.exists())  # where the first mkdir would write
        if not existing.is_dir():
            raise NotADirectoryError(20, f"{existing} is not a folder")
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        raise UserError(f"cannot write to {folder} ({e.strerror or e}); {advice or f'choose another {flag}'}")


def missing_folders(folder):
    """folder and those of its parents that do not exist yet, deepest first: what making it would make."""
    folder = Path(folder)
    return [p for p in [folder, *folder.parents] if not p.exists()]


def remove_if_empty(folders):
    """Remove the folders a failed step made (missing_folders, from before it), deepest first, where nothing came to
    be in them: an error leaves no empty folder behind. rmdir removes empty folders only, so nothing is lost."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # something is in it (a saved epoch, another run's lock): it stays, and so do its parents
            return


@functools.cache  # read once: a long grid records the code it started with, even if HEAD moves meanwhile
def git_state():
    """(commit, dirty) of the repo this file lives in when the process first asks, or (None, None) outside git."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, check=True).stdout.strip()
    try:
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain"))
    except (OSError, subprocess.CalledProcessError):
        return None, None


def threads_per_worker(workers):
    """CPU threads for each of `workers` processes sharing this machine: the CPUs it may use, split evenly."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cpus // workers)
