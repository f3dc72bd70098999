"""Faults that once ended in a traceback: sizes that cannot fit, a run that diverges, a damaged finished run, Ctrl-C
while starting, a full disk, looping paths and file names that are not UTF-8. Each is one line, and nothing is lost."""
import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch
from PIL import Image

import bench
import datasource
from bookkeeping import checkpointing
from conftest import ROOT, cli, run_dirs
from nn import fit_problem

TINY = ["--batch_size", "32", "--lr_milestone", "1", "--epochs", "2"]


@pytest.mark.parametrize("flags", [["--head_hidden", "1000000000000"], ["--dropout_num", "100000000"]])
def test_a_size_that_cannot_fit_is_refused_before_it_is_allocated(flags, small_cifar, tmp_path, capsys):
    rc, _, err = cli(capsys, "--data_dir", small_cifar, "--output_dir", tmp_path / "out", *TINY, *flags)
    assert rc == 2 and "GiB to train" in err and "more than the device's" in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_the_size_check_is_a_lower_bound_that_counts_each_separate_head():
    """Refused only where even the head's weights (16 bytes each to train: weights, gradients, Adam's two moments) and
    its dropped features (3 bytes an element: bf16 and a 1-byte mask) do not fit; M sets of weights with separate heads."""
    weights = (128 + 10) * 1000  # miniresnet's 128 features -> 1000 hidden -> 10 classes
    copies = 8 * 32 * (3 * 128 + 2 * 1000)  # bytes: 8 samples of a batch of 32
    fits = lambda memory, **options: fit_problem("miniresnet", 10, 8, 1000, memory=memory, **options) is None
    assert fits(16 * weights + copies, batch_size=32) and not fits(16 * weights + copies - 1, batch_size=32)
    assert not fits(16 * weights + copies, batch_size=32, heads="separate")
    assert fits(8 * 16 * weights + copies, batch_size=32, heads="separate")
    assert fits(4 * weights, batch_size=0) and not fits(4 * weights - 1, batch_size=0)
    model = __import__("nn").build_model("miniresnet", 10, 8, 0.5, head_hidden=1000)
    head = sum(p.numel() for p in model.classifier.parameters()) - 1000 - 10  # the biases are not counted
    assert head == weights  # the bound counts the weights the model has


def test_the_bench_refuses_a_size_that_cannot_fit_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "measure", lambda *args: pytest.fail("measured"))  # it would grow until killed
    argv = ["--quick", "--device", "cpu", "--dropout_num", "100000000", "--batch_size", "2", "--out", tmp_path / "b"]
    assert bench.main(argv) == 2
    err = capsys.readouterr().err
    assert err.endswith("lower --dropout_num or --batch_size\n") and err.count("\n") == 1
    assert not (tmp_path / "b").exists()


class NanEvaluationAtEpoch2(torch.nn.CrossEntropyLoss):
    """Evaluation's loss (a sum) is NaN from its second call: epoch 2's, while training stays finite."""
    calls = 0

    def forward(self, logits, target):
        NanEvaluationAtEpoch2.calls += self.reduction == "sum"
        return super().forward(logits, target) * (float("nan") if NanEvaluationAtEpoch2.calls >= 2 else 1.0)


@pytest.mark.slow
def test_a_run_whose_evaluation_diverges_stops_at_that_epoch_and_a_rerun_or_overwrite_goes_on(
        small_cifar, tmp_path, capsys, monkeypatch):
    argv = ["--data_dir", small_cifar, "--output_dir", tmp_path, *TINY]
    with monkeypatch.context() as patched:
        patched.setattr(torch.nn, "CrossEntropyLoss", NanEvaluationAtEpoch2)
        rc, _, err = cli(capsys, *argv)
    assert rc == 2 and "the run diverged: non-finite test loss (nan) after epoch 2" in err and err.count("\n") == 1
    assert "the checkpoint of epoch 1" in err and "lower --lr and run again" in err
    (run_dir,) = run_dirs(tmp_path, 0)
    assert [r["epoch"] for r in json.loads((run_dir / "metrics.json").read_text())] == [1]  # no NaN row saved
    rc, out, _ = cli(capsys, *argv)  # the same command resumes from epoch 1 (here with a finite loss): not damaged
    assert rc == 0 and "resumed from epoch 1" in out
    assert cli(capsys, *argv, "--overwrite")[0] == 0


@pytest.mark.slow
def test_a_finished_run_without_its_config_is_named_as_damaged_on_a_rerun(small_cifar, tmp_path, capsys):
    argv = ["--data_dir", small_cifar, "--output_dir", tmp_path, *TINY]
    assert cli(capsys, *argv)[0] == 0
    (run_dir,) = run_dirs(tmp_path, 0)
    (run_dir / "config.json").unlink()
    rc, _, err = cli(capsys, *argv)
    assert rc == 2 and f"{run_dir / 'config.json'}: cannot be read" in err and err.count("\n") == 1, err
    assert (run_dir / "last.pt").exists() and (run_dir / "metrics.json").exists()


# Sends SIGINT to the process at its first import of a heavy library, so the stop falls inside it every time.
STOP_WHILE_IMPORTING = """
import builtins, os, signal
real_import = builtins.__import__
def stopping_import(name, *args, **kwargs):
    if name.split(".")[0] in ("torch", "matplotlib", "scipy", "numpy") and not os.environ.get("STOPPED"):
        os.environ["STOPPED"] = "1"
        os.kill(os.getpid(), signal.SIGINT)
    return real_import(name, *args, **kwargs)
builtins.__import__ = stopping_import
"""


@pytest.mark.parametrize("argv", [["bench.py", "--quick"], ["blog.py", "docs/blog-full-h200"],
                                  ["study.py", "convergence", "--compare", "docs/study-converged"],
                                  ["run.py", "--compare", "docs/blog-full-h200"]])
@pytest.mark.slow
def test_ctrl_c_while_an_entry_point_starts_is_one_line_and_exit_130(argv, tmp_path):
    (tmp_path / "sitecustomize.py").write_text(STOP_WHILE_IMPORTING)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 130 and "stopped by SIGINT" in result.stderr, result.stderr[-800:]
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.slow
def test_a_save_that_fails_is_one_line_saying_the_disk_is_full_and_the_last_epoch_stays(
        small_cifar, tmp_path, capsys, monkeypatch):
    argv = ["--data_dir", small_cifar, "--output_dir", tmp_path, *TINY]
    assert cli(capsys, *argv, "--epochs", "1")[0] == 0
    (run_dir,) = run_dirs(tmp_path, 0)
    before = {f: (run_dir / f).read_bytes() for f in ("metrics.json", "config.json", "last.pt")}

    def save_on_a_full_disk(obj, path):
        open(path, "wb").write(b"PK")  # torch writes part of the file, then fails as it does on a full disk
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")
    monkeypatch.setattr(torch, "save", save_on_a_full_disk)
    monkeypatch.setattr(checkpointing.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 0}))
    rc, _, err = cli(capsys, *argv)
    assert rc == 2 and "could not save epoch 2" in err and "No space left on device" in err and err.count("\n") == 1
    assert {f: (run_dir / f).read_bytes() for f in before} == before and not list(run_dir.glob(".*.tmp"))


def test_a_failed_save_with_room_left_is_an_io_error_naming_torchs_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", lambda obj, path: (_ for _ in ()).throw(RuntimeError("unexpected pos 64 vs 0")))
    with pytest.raises(OSError) as raised:
        checkpointing.checkpoint_writer({})(tmp_path / "last.pt")
    assert "torch.save failed: unexpected pos 64 vs 0" in str(raised.value)
    monkeypatch.setattr(torch, "save", lambda obj, path: (_ for _ in ()).throw(RuntimeError("CUDA error: unspecified")))
    with pytest.raises(RuntimeError, match="CUDA error"):  # not a failed write: a bug keeps its traceback
        checkpointing.checkpoint_writer({})(tmp_path / "last.pt")


@pytest.mark.parametrize("flag", ["--output_dir", "--data_dir"])
def test_a_path_that_loops_is_one_line_before_any_work(flag, small_cifar, tmp_path, capsys):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    flags = {"--output_dir": tmp_path / "out", "--data_dir": small_cifar, flag: tmp_path / "loop"}
    rc, _, err = cli(capsys, *[a for pair in flags.items() for a in pair], *TINY)
    assert rc == 2 and f"{flag} {tmp_path / 'loop'}: a symbolic link that leads back to itself" in err
    assert err.count("\n") == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["loop"]


@pytest.mark.slow
def test_a_data_dir_whose_name_is_not_utf8_trains_reruns_and_compares(small_cifar, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(datasource, "CACHE_DIR", tmp_path / "cache")  # empty: the name is printed as it is decoded
    odd = os.fsdecode(bytes(tmp_path) + b"/caf\xe9")  # Latin-1, as an older file system would have written it
    os.mkdir(odd)
    shutil.copy(small_cifar, os.path.join(odd, "c.tar.gz"))
    argv = ["--data_dir", os.path.join(odd, "c.tar.gz"), "--output_dir", tmp_path / "out", *TINY]
    rc, out, _ = cli(capsys, *argv)  # capsys's stream is strict UTF-8, as a terminal's is under most locales
    assert rc == 0 and "caf\\udce9" in out and "decoding" in out
    assert cli(capsys, *argv)[0] == 0 and cli(capsys, "--compare", tmp_path / "out")[0] == 0
    (summary,) = (tmp_path / "out" / "compare").glob("*/summary.md")
    assert "caf\\udce9" in summary.read_text()  # as an ordinary open() reads it: UTF-8, the odd byte escaped


@pytest.mark.slow
def test_a_stop_signal_while_starting_ends_with_its_status(tmp_path):
    script = ("import os, signal, sys, tools\ntools.quiet_start('x.py')\nos.kill(os.getpid(), signal.SIGTERM)\n"
              "import time; time.sleep(5)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 143 and result.stderr == "x.py: stopped by SIGTERM while starting; nothing was done\n"


def test_an_archive_lacking_a_test_class_is_named_not_its_temporary_folder(tmp_path, capsys):
    image = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(image)
    archive = tmp_path / "two-classes.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("train/cat/1.png", "train/dog/1.png", "test/cat/1.png"):
            tar.add(image, name)
    rc, _, err = cli(capsys, "--data_dir", archive, "--output_dir", tmp_path / "out", *TINY)
    assert rc == 2 and f"{archive}: test classes ['cat'] differ from train classes ['cat', 'dog']" in err, err
    assert ".extract-" not in err and err.count("\n") == 1
