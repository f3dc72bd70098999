"""Bit-identical reruns, exact resume after SIGKILL/SIGINT/SIGTERM, grids, --resume, --eval, --valid_split."""
import pickle
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import run
import train
import trainingmonitor
from bookkeeping import experiment, provenance, runfiles
from conftest import ROOT, cli, fake_run, result_tables, rows, run_dirs
from studies import tables

FOUR_EPOCHS = ["--epochs", "4", "--batch_size", "32", "--lr_milestone", "2"]


@pytest.fixture(scope="module")
def whole(small_cifar, tmp_path_factory):
    """The reference: the same run, never interrupted."""
    out = tmp_path_factory.mktemp("whole")
    assert run.main(["--data_dir", small_cifar, "--output_dir", out, *FOUR_EPOCHS]) == 0
    (run_dir,) = run_dirs(out, 0)
    return run_dir


def start_and_stop(args, output_dir, sig):
    """Start run.py in a subprocess, send `sig` while epoch 2 or later trains, return (returncode, stderr)."""
    proc = subprocess.Popen([sys.executable, "run.py", *map(str, args)], cwd=ROOT, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not list(Path(output_dir).glob("*/last.pt")):  # the first checkpoint: epoch 1 is done
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.02)
    time.sleep(np.random.default_rng(sig).uniform(0.05, 0.3))  # somewhere inside epoch 2 (or 3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


@pytest.mark.slow
def test_sigkill_mid_epoch_then_the_same_command_resumes_to_identical_metrics(whole, small_cifar, tmp_path, capsys):
    args = ["--data_dir", small_cifar, "--output_dir", tmp_path, *FOUR_EPOCHS]
    returncode, _ = start_and_stop(args, tmp_path, signal.SIGKILL)
    assert returncode == -9
    rc, out, err = cli(capsys, *args)
    assert rc == 0, err
    k = int(out.split("resumed from epoch ")[1].split()[0])
    assert 1 <= k < 4
    assert rows(run_dirs(tmp_path, 0)[0]) == rows(whole)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_keep_the_checkpoint_and_print_the_resume_command(sig, whole, small_cifar, tmp_path, capsys):
    args = ["--data_dir", small_cifar, "--output_dir", tmp_path, *FOUR_EPOCHS]
    returncode, err = start_and_stop(args, tmp_path, sig)
    assert returncode == 128 + sig.value, err
    assert f"stopped by {sig.name}" in err and "is intact" in err
    (run_dir,) = run_dirs(tmp_path, 0)
    kept = torch.load(run_dir / "last.pt", weights_only=True)["epoch"]
    assert 1 <= kept < 4 and len(rows(run_dir)) == kept
    command = err.split("resume with: ")[1].strip()
    assert command.startswith("python run.py ")
    if sig == signal.SIGINT:  # the printed command
        rc, out, _ = cli(capsys, *shlex.split(command)[2:])
    else:  # or the run directory by hand
        rc, out, _ = cli(capsys, "--resume", run_dir)
    assert rc == 0 and f"resumed from epoch {kept}" in out
    assert rows(run_dir) == rows(whole)


@pytest.mark.slow
def test_resume_refuses_a_flag_that_differs_from_the_run(whole, capsys):
    rc, _, err = cli(capsys, "--resume", whole, "--dropout_num", 8)
    assert rc == 2 and "its --dropout_num is 0, this command's 8" in err


def test_resume_of_a_folder_without_checkpoint_is_an_error(tmp_path, capsys):
    rc, _, err = cli(capsys, "--resume", tmp_path)
    assert rc == 2 and "holds no checkpoint" in err


@pytest.mark.slow
def test_eval_reports_the_saved_model_on_the_test_set(whole, capsys):
    rc, out, _ = cli(capsys, "--eval", whole)
    last = runfiles.read_json(whole / "metrics.json")[-1]
    assert rc == 0 and f"accuracy {last['valid_acc']:.4f}" in out and f"loss {last['valid_loss']:.4f}" in out


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_checkpoint_is_one_clear_error(damage, whole, tmp_path, capsys, small_cifar):
    shutil.copytree(whole, tmp_path / whole.name)
    checkpoint = tmp_path / whole.name / "last.pt"
    checkpoint.write_bytes(b"not a checkpoint" if damage == "garbage" else checkpoint.read_bytes()[:100_000])
    rc, _, err = cli(capsys, "--data_dir", small_cifar, "--output_dir", tmp_path, *FOUR_EPOCHS)
    assert rc == 2 and "cannot read checkpoint" in err and "--overwrite" in err and err.count("\n") == 1
    rc, _, err = cli(capsys, "--eval", tmp_path / whole.name)  # --overwrite cannot help --eval: it needs the weights
    assert rc == 2 and "restore it from a copy" in err and "--overwrite" not in err and err.count("\n") == 1


@pytest.mark.slow
def test_grid_runs_every_combination_then_skips_finished_and_resumes_unfinished(small_cifar, tmp_path, capsys):
    grid = ["--data_dir", small_cifar, "--output_dir", tmp_path, "--batch_size", 64, "--dropout_num", 0, 1, "--seed", 1, 2]
    rc, out, _ = cli(capsys, *grid, "--epochs", 1)
    assert rc == 0 and len(list(tmp_path.glob("miniresnet_*"))) == 4
    rc, out, _ = cli(capsys, *grid, "--epochs", 1)
    assert rc == 0 and out.count("nothing to do") == 4 and "resumed" not in out
    rc, out, _ = cli(capsys, *grid, "--epochs", 2)
    assert rc == 0 and out.count("resumed from epoch 1") == 4
    (compare_dir,) = (tmp_path / "compare").iterdir()
    table = result_tables(compare_dir / "summary.md")[0]
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in table]
    assert [(c[0], c[2], c[3], c[4]) for c in cells] == [("0", "0.0", "2", "2"), ("1", "0.0", "2", "2")]  # M, α, seeds, epochs
    assert all("±" in c[5] for c in cells)  # mean +- std over the two seeds


@pytest.mark.slow
def test_valid_split_holds_out_training_images_and_tests_once(small_cifar, tmp_path, capsys):
    rc, out, _ = cli(capsys, "--data_dir", small_cifar, "--output_dir", tmp_path, "--epochs", 1, "--batch_size", 64,
                     "--valid_split", 60)
    assert rc == 0 and "test set, once" in out
    (run_dir,) = run_dirs(tmp_path, 0)
    config = runfiles.read_json(run_dir / "config.json")
    assert (config["train_images"], config["valid_images"], config["test_images"]) == (240, 60, 100)
    assert 0 <= runfiles.read_json(run_dir / "test.json")["test_acc"] <= 1


def test_summary_statistics_and_epochs_to_the_m1_runs_best():
    runs = [fake_run(1, 1, [0.5, 0.6, 0.7]), fake_run(1, 2, [0.5, 0.7, 0.7]),  # mean curve 0.5 0.65 0.7: target 0.7
            fake_run(8, 1, [0.6, 0.7, 0.8]), fake_run(8, 2, [0.6, 0.8, 0.8]),  # mean 0.6 0.75 0.8: reaches it at 2
            fake_run(0, 1, [0.1, 0.2, 0.3])]
    summary = tables.summary_markdown(trainingmonitor.group_runs(runs))
    assert "| epochs to M=1's best |" in summary and "M=1's best: the best point of the mean valid accuracy" in summary
    table = summary.split("\n\n")[0].splitlines()[2:]
    cells = {int(line.split("|")[1]): [c.strip() for c in line.split("|")[1:-1]] for line in table}
    assert cells[8][3] == "2" and cells[8][4] == "3" and cells[8][5] == "0.8000 ± 0.0000" and cells[8][6] == "0.8000 ± 0.0000"
    assert cells[1][5] == "0.7000 ± 0.0000" and cells[1][9] == "3"
    assert cells[8][9] == "2" and cells[0][9] == "not reached"
    assert cells[0][5] == "0.3000" and cells[0][3] == "1"  # one seed: no spread
    std = np.std([0.6, 0.7], ddof=1)
    runs[3]["history"][-1]["valid_acc"] = 0.7
    table = tables.summary_markdown(trainingmonitor.group_runs(runs))
    assert f"0.7500 ± {std:.4f}" in table


@pytest.mark.slow
def test_a_failed_checkpoint_write_keeps_the_previous_one_and_a_rerun_resumes(whole, small_cifar, tmp_path, capsys,
                                                                                monkeypatch):
    real_save, calls = torch.save, []

    def disk_full_on_second_save(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as f:  # a partial write, then the error a full disk gives
                f.write(b"partial")
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_on_second_save)
    args = ["--data_dir", small_cifar, "--output_dir", tmp_path, *FOUR_EPOCHS]
    rc, _, err = cli(capsys, *args)
    assert rc == 2 and "No space left on device" in err and "rerun the command to resume" in err
    (run_dir,) = run_dirs(tmp_path, 0)
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == 1
    assert not list(run_dir.glob(".*.tmp"))  # the partial file is gone
    monkeypatch.setattr(torch, "save", real_save)
    rc, out, _ = cli(capsys, *args)
    assert rc == 0 and "resumed from epoch 1" in out and rows(run_dir) == rows(whole)


@pytest.mark.slow
def test_a_checkpoint_cannot_run_code(whole, tmp_path, capsys, small_cifar):
    class RunsCode:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    shutil.copytree(whole, tmp_path / whole.name)
    (tmp_path / whole.name / "last.pt").write_bytes(pickle.dumps({"epoch": RunsCode()}, protocol=2))
    rc, _, err = cli(capsys, "--data_dir", small_cifar, "--output_dir", tmp_path, *FOUR_EPOCHS)
    assert rc == 2 and "cannot read checkpoint" in err
    assert not (tmp_path / "pwned").exists()


def saved_epochs(output_dir):
    metrics = list(Path(output_dir).glob("*/metrics.json"))
    return len(runfiles.read_json(metrics[0])) if metrics else 0


@pytest.mark.slow
def test_five_sigkills_at_random_moments_still_end_with_identical_metrics(small_cifar, tmp_path, capsys):
    """Killed anywhere (start-up, training, evaluation, checkpoint writing), the same command picks up the run."""
    six = ["--data_dir", small_cifar, "--epochs", 6, "--batch_size", 32, "--lr_milestone", 3]
    assert cli(capsys, *six, "--output_dir", tmp_path / "whole")[0] == 0
    command = [sys.executable, "run.py", *map(str, six), "--output_dir", str(tmp_path / "killed")]
    rng = np.random.default_rng(5)
    for attempt in range(5):
        proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while saved_epochs(tmp_path / "killed") < attempt:  # each kill after one more saved epoch than the last
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3) if attempt else rng.uniform(0.5, 3.0))  # the first: during start-up, maybe
        proc.kill()
        assert proc.wait() == -9, "the run ended before it was killed"
    rc, out, _ = cli(capsys, *command[2:])
    assert rc == 0 and "resumed from epoch" in out
    assert rows(run_dirs(tmp_path / "killed", 0)[0]) == rows(run_dirs(tmp_path / "whole", 0)[0])


@pytest.mark.slow
def test_a_cpu_run_resumes_with_the_thread_count_it_began_with(whole, small_cifar, tmp_path, capsys):
    began = torch.get_num_threads()
    args = ["--data_dir", small_cifar, "--output_dir", tmp_path, *FOUR_EPOCHS]
    assert cli(capsys, *args, "--epochs", 2)[0] == 0  # the first two of whole's four epochs
    other = 2 if began == 1 else 1
    torch.set_num_threads(other)
    try:
        rc, out, err = cli(capsys, *args)
        assert torch.get_num_threads() == other  # given back: the next run of a grid is not resumed
    finally:
        torch.set_num_threads(began)
    (run_dir,) = run_dirs(tmp_path, 0)
    assert rc == 0 and f"resumed from epoch 2 with the {began} thread(s) it began with, not this process's {other}" in out
    assert runfiles.read_config(run_dir / "config.json")["threads"] == began
    assert "earlier" not in runfiles.read_config(run_dir / "config.json")  # it resumed where it began: one place
    assert rows(run_dir) == rows(whole)


def test_a_field_an_older_run_did_not_record_is_no_move():
    now = {k: "same" for k in provenance.PLACE}
    older = {k: "same" for k in provenance.PLACE if k != "hardware"}  # before the machine was recorded
    assert provenance.earlier_places(older, now, 5) == []
    assert provenance.earlier_places({**older, "threads": 1}, now, 5) == [{"until_epoch": 5, **older, "threads": 1}]


@pytest.mark.slow
def test_a_run_resumed_on_another_machine_keeps_where_its_earlier_epochs_ran(small_cifar, tmp_path, capsys, monkeypatch):
    args = ["--data_dir", small_cifar, "--output_dir", tmp_path, *FOUR_EPOCHS]
    assert cli(capsys, *args, "--epochs", 2)[0] == 0
    (run_dir,) = run_dirs(tmp_path, 0)
    first = runfiles.read_config(run_dir / "config.json")
    monkeypatch.setattr(train.hardware, "describe", lambda device: "Another CPU (family 9 model 9)")
    assert cli(capsys, *args, "--epochs", 3)[0] == 0 and cli(capsys, *args)[0] == 0  # the second: no move, no entry
    config = runfiles.read_config(run_dir / "config.json")
    assert config["hardware"] == "Another CPU (family 9 model 9)"  # where it runs now; before, all of it was lost
    assert config["earlier"] == [{"until_epoch": 2, **{k: first[k] for k in provenance.PLACE}}]
    threads = f"{config['threads']} thread{'s' * (config['threads'] != 1)}"
    assert provenance.where({"config": config}) == (f"Another CPU (family 9 model 9), {config['precision']}, {threads}; "
                                               f"epochs 1-2 on {first['hardware']}, {config['precision']}")


@pytest.mark.parametrize("saved, device", [
    ({}, "cpu"),  # a run from before threads were recorded
    ({"threads": 64, "hardware": "Another CPU (family 1)"}, "cpu"),  # other bits anyway, and maybe fewer cores
    ({"threads": 64}, "cuda")])  # the threads do not change a GPU run's bits
def test_a_resume_keeps_this_process_threads_without_a_count_on_other_hardware_or_off_the_cpu(saved, device):
    now = torch.get_num_threads()
    assert provenance.resume_threads(saved, torch.device(device)) == "" and torch.get_num_threads() == now


def test_every_committed_run_keeps_its_name():
    """A run's folder name is a function of its config.json: a new defining flag at its default changes no name."""
    configs = list((ROOT / "docs").rglob("config.json"))
    assert len(configs) > 200
    for path in configs:
        assert experiment.run_identity(runfiles.read_json(path))[0] == path.parent.name, path


@pytest.mark.slow
def test_a_compiled_run_reruns_to_the_bit_resumes_exactly_and_is_another_experiment(whole, small_cifar, tmp_path, capsys):
    """inductor draws its own dropout masks: a compiled run is named apart from the eager run of its seed, differs
    from it, and is resumed only as a compiled run; within the mode, reruns and resumes are bit for bit."""
    args = ["--data_dir", small_cifar, "--compile", *FOUR_EPOCHS]
    assert run.main([*args, "--epochs", "2", "--output_dir", tmp_path / "resumed"]) == 0  # the last --epochs wins
    assert run.main([*args, "--output_dir", tmp_path / "resumed"]) == 0  # continues it from epoch 2
    assert run.main([*args, "--output_dir", tmp_path / "again"]) == 0
    (resumed,), (again,) = run_dirs(tmp_path / "resumed", 0), run_dirs(tmp_path / "again", 0)
    assert "_compiled_s" in resumed.name and resumed.name == again.name != whole.name
    assert rows(resumed) == rows(again) != rows(whole)
    capsys.readouterr()
    rc, _, err = cli(capsys, "--resume", whole, "--compile")
    assert rc == 2 and "its --compile is False, this command's True" in err and len(err.splitlines()) == 1
