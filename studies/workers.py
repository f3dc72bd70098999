"""K run.py processes at once, each taking the next run: study.py --workers K. A stop request reaches each worker
(each in its own session), which stops at a step boundary and keeps its last epoch."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import run
import tools
from bookkeeping import runlock
from tools import UserError


def train_in_workers(numbered, total, workers, log_dir, resume):
    """K run.py processes at once for the (number, name, command) runs, each run's output in log_dir/NAME.log; a stop
    request stops them all at a step boundary."""
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(tools.threads_per_worker(workers))}  # the cores, shared
    pending, active, failed, stopping, took = list(numbered), {}, [], set(), []
    with tools.stop_on_signals(second_stops_at_once=False):
        while (pending and not tools.STOP and not failed) or active:
            while pending and len(active) < workers and not tools.STOP and not failed:
                i, name, command = pending.pop(0)
                log = open(log_dir / f"{name}.log", "a")  # a resumed run keeps its earlier output
                active[i] = (subprocess.Popen([sys.executable, str(Path(run.__file__)), *command], stdout=log,
                                              stderr=subprocess.STDOUT, env=env, start_new_session=True), log,
                             time.monotonic())
                print(f"study.py: run {i}/{total} started (log: {log.name})", flush=True)
            time.sleep(0.2)
            for i, (process, log, started) in list(active.items()):
                if tools.STOP and i not in stopping:  # its own session: a Ctrl-C reaches only us, so we pass it on once
                    process.send_signal(signal.Signals[tools.STOP["signal"]])
                    stopping.add(i)
                if process.poll() is not None:
                    log.close()
                    del active[i]
                    held = " (another process trains it)" if process.returncode == runlock.HELD else ""
                    failed += [log] if process.returncode not in (0, runlock.HELD) and i not in stopping else []
                    took += [time.monotonic() - started] if process.returncode == 0 else []
                    left = "" if failed or tools.STOP else pace(took, len(pending) + len(active), workers)
                    print(f"study.py: run {i}/{total} exited {process.returncode}{held}{left}", flush=True)
    if tools.STOP:
        raise tools.Interrupted(f"stopped by {tools.STOP['signal']}; resume with: {resume}")
    if failed:
        raise UserError(f"{len(failed)} run(s) failed, see {', '.join(log.name for log in failed)}; the first ends "
                        f"\"{last_line(failed[0].name)}\"; fix the cause and rerun: {resume}")
    return 0


def last_line(path):
    lines = Path(path).read_text(errors="replace").strip().splitlines()
    return lines[-1] if lines else "nothing"


def pace(took, left, workers):
    """'; 14.8 min a run, 30 left: about 3.7 h more' from the runs this process saw finish, the left ones (running
    ones counted whole) taken workers at a time: a rough guide, as a resumed run reports only the part it trained."""
    if not took or not left:
        return ""
    minutes = sum(took) / len(took) / 60
    more = minutes * -(-left // workers)
    return f"; {minutes:.1f} min a run, {left} left: about {f'{more / 60:.1f} h' if more >= 60 else f'{more:.0f} min'} more"
