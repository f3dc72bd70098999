"""Nothing a run wrote is replaced without --overwrite, and one run has one trainer at a time."""
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

import run
import study
import tools
import train
import trainingmonitor
from bookkeeping import runlock
from conftest import ROOT, cli, rows, run_dirs
from studies import catalogue

TINY = ["--epochs", 2, "--train_size", 200, "--test_size", 100, "--batch_size", 50]


def run_dir_of(*argv):
    """The folder run.py would train argv's (single) run into."""
    args = run.grid(run.parse_args([str(a) for a in argv])[0])[0]
    return train.identity(args, torch.device("cpu"))[1]


@pytest.mark.slow
def test_a_committed_run_without_checkpoint_is_finished_and_a_partial_one_is_refused(small_cifar, tmp_path, capsys):
    argv = ["--data_dir", small_cifar, "--output_dir", tmp_path, *TINY, "--dropout_num", 8]
    assert cli(capsys, *argv)[0] == 0
    (run_dir,) = run_dirs(tmp_path, 8)
    before = (run_dir / "metrics.json").read_text()
    (run_dir / "last.pt").unlink()  # as committed under docs/: config.json and metrics.json alone
    rc, out, _ = cli(capsys, *argv)
    assert rc == 0 and "nothing to do" in out and (run_dir / "metrics.json").read_text() == before
    assert "comparison of 1 finished run" in out  # it still counts
    rc, _, err = cli(capsys, *argv, "--epochs", 3)  # continue it: there is no checkpoint to do so
    assert rc == 2 and "holds metrics up to epoch 2 of this run but no checkpoint" in err and err.count("\n") == 1
    assert (run_dir / "metrics.json").read_text() == before
    assert cli(capsys, *argv, "--epochs", 3, "--overwrite")[0] == 0  # unless asked
    assert len(rows(run_dir)) == 3


@pytest.mark.slow
def test_a_finished_grid_on_a_read_only_file_system_is_skipped(small_cifar, tmp_path, capsys, monkeypatch):
    argv = ["--data_dir", small_cifar, "--output_dir", tmp_path, *TINY, "--dropout_num", 1]
    assert cli(capsys, *argv)[0] == 0

    def read_only(*args, **kwargs):  # every write the rerun could try fails, as on a read-only mount (root included)
        raise OSError(30, "Read-only file system")
    for module, name in ((tools, "atomic_write"), (tools, "check_writable"), (runlock, "hold"),
                         (trainingmonitor, "compare_setup")):
        monkeypatch.setattr(module, name, read_only)
    rc, out, err = cli(capsys, *argv)
    assert rc == 0 and "nothing to do" in out and "comparison not redrawn (Read-only file system)" in out, err


HOLD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from bookkeeping import runlock
    with runlock.hold({run_dir!r}):
        print("held", flush=True)
        time.sleep(600)
""")


@pytest.mark.slow
def test_a_second_trainer_is_refused_naming_the_first_and_a_killed_one_never_blocks(small_cifar, tmp_path, capsys):
    argv = ["--data_dir", small_cifar, "--output_dir", tmp_path, *TINY, "--dropout_num", 8]
    run_dir = run_dir_of(*argv)
    holder = subprocess.Popen([sys.executable, "-c", HOLD.format(root=str(ROOT), run_dir=str(run_dir))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        rc, _, err = cli(capsys, *argv)
        assert rc == runlock.HELD and f"is being trained by process {holder.pid} on " in err and err.count("\n") == 1
        assert not run_dir.exists()
    finally:
        holder.kill()  # SIGKILL: no clean-up ran, the lock file stays behind
        holder.wait()
    assert runlock.lock_path(run_dir).exists()
    rc, _, _ = cli(capsys, *argv)
    assert rc == 0 and len(rows(run_dir)) == 2


def test_the_lock_takes_away_the_folders_it_made_only_while_they_are_empty(tmp_path):
    (tmp_path / "kept").mkdir()
    with runlock.hold(tmp_path / "kept" / "new" / "deeper" / "run"):
        assert runlock.lock_path(tmp_path / "kept" / "new" / "deeper" / "run").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and list((tmp_path / "kept").iterdir()) == []
    with runlock.hold(tmp_path / "new" / "deeper" / "run"):
        (tmp_path / "new" / "deeper" / "run").mkdir()  # the first saved epoch
    assert (tmp_path / "new" / "deeper" / "run").is_dir() and not runlock.lock_path(tmp_path / "new" / "deeper" / "run").exists()


@pytest.mark.slow
def test_folders_several_locks_found_missing_go_with_the_last_lock_out_whichever_made_them(tmp_path):
    """torchrun's ranks: each holds its own lock in a folder one of them made; the maker may leave first."""
    run_dir = tmp_path / "new" / "deeper" / "run"
    made = tools.missing_folders(run_dir.parent)  # as every rank saw it before any made it
    maker, other = runlock.hold(run_dir, 0, made), runlock.hold(run_dir, 1, made)
    maker.__enter__()
    other.__enter__()
    maker.__exit__(None, None, None)  # the rank that made the folders leaves first: the other's lock is still there
    assert runlock.lock_path(run_dir, 1).exists()
    other.__exit__(None, None, None)
    assert list(tmp_path.iterdir()) == []


def test_a_process_that_finds_the_download_lock_held_says_who_holds_it_and_waits_for_it(tmp_path, capsys):
    lock, entered = tmp_path / "data" / ".download-cifar10.lock", []

    def second():
        with runlock.waiting(lock, "download CIFAR-10 into data/"):
            entered.append("second")
    with runlock.waiting(lock, "download CIFAR-10 into data/"):
        waiter = threading.Thread(target=second)  # flock tells apart each open() of the file, threads' too
        waiter.start()
        said, deadline = "", time.monotonic() + 30
        while "waiting for" not in said and time.monotonic() < deadline:
            time.sleep(0.05)
            said += capsys.readouterr().out
        assert said.startswith(f"waiting for process {os.getpid()} on {socket.gethostname()} (since ")
        assert said.endswith(") to download CIFAR-10 into data/\n") and said.count("\n") == 1 and entered == []
    waiter.join(30)
    assert entered == ["second"] and not lock.exists()  # the second's lock file went too


@pytest.mark.slow
def test_study_workers_train_each_run_once_and_leave_a_held_run_to_its_holder(small_cifar, tmp_path, capsys, monkeypatch):
    small = catalogue.Study("three runs", 1, [("avg2", [1, 8], [0.5]), ("avg2-flip", [8], [0.5])],
                        study.STUDIES["where"].pairs, "gain")
    monkeypatch.setitem(study.STUDIES, "where", small)
    argv = ["where", "--data_dir", small_cifar, "--output_dir", tmp_path, "--protocol", "smoke", "--seed", 1, "--workers", 2]
    commands = study.run_commands(study.parse_args([str(a) for a in argv]), study.study_points(small))
    held = run_dir_of(*commands["avg2-m8-p0.5-s1"])
    with runlock.hold(held):  # this process holds it: the workers' run.py processes are refused and move on
        assert study.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("started") == 3 and "run 2/3 exited 75 (another process trains it)" in out
    assert not held.exists() and len(run_dirs(tmp_path / "avg2", 1)) == len(run_dirs(tmp_path / "avg2-flip", 8)) == 1
    logs = sorted((tmp_path / "logs").iterdir())  # named by the run, not by its place in one study's list
    assert [log.name for log in logs] == ["avg2-flip-m8-p0.5-s1.log", "avg2-m1-p0.5-s1.log", "avg2-m8-p0.5-s1.log"]
    assert "is being trained by process" in logs[2].read_text()
    assert study.main(argv) == 0  # released: the held run trains now; the finished ones start no process
    out = capsys.readouterr().out
    assert "2 of 3 runs are finished; 1 to train" in out and out.count("started") == 1 and "run 2/3 started" in out
    assert held.exists() and len(rows(held)) == 2
    assert not any("nothing to do" in log.read_text() for log in logs)
    assert "is being trained by process" in logs[2].read_text()  # its log is added to, not replaced
    table = (tmp_path / "where.md").read_text()
    assert "| --pool avg2: M=8 − M=1 | 1 |" in table


def test_a_stopped_study_names_the_study_command_that_resumes_it(small_cifar, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(run, "main", lambda argv, resume_command=None: print(f"resume with: {resume_command}") or 130)
    assert study.main(["samples", "--data_dir", small_cifar, "--output_dir", tmp_path, "--seed", 3]) == 130
    assert f"resume with: python study.py samples --data_dir {small_cifar} --output_dir {tmp_path} --seed 3" in capsys.readouterr().out
