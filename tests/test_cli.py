"""The command line end to end, on a small real CIFAR-10 subset (in-process calls of run.main)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import run
import tools
from bookkeeping import experiment, hardware
from conftest import ROOT, cli, result_tables, rows, run_dirs

# 400 real images (300 train, 100 test), batch 32: about a second an epoch
TINY = ["--batch_size", "32", "--lr_milestone", "1", "--epochs", "2"]


@pytest.fixture(scope="module")
def trained(small_cifar, tmp_path_factory):
    """dropout_num 0, 1 and 8 trained for two epochs into one output folder."""
    out = tmp_path_factory.mktemp("outputs")
    for m in (0, 1, 8):
        assert run.main(["--data_dir", str(small_cifar), "--output_dir", str(out), "--dropout_num", str(m), *TINY]) == 0
    return out


@pytest.mark.slow
def test_each_run_writes_metrics_config_curves_and_checkpoint(trained):
    for m in (0, 1, 8):
        (run_dir,) = run_dirs(trained, m)
        assert run_dir.name.startswith(f"miniresnet_cifar10_m{m}_p0.5_s42-")
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert [r["epoch"] for r in metrics] == [1, 2]
        assert [r["lr"] for r in metrics] == [0.01, 0.01 * 0.1]  # --lr_milestone 1: epoch 2 is decayed
        assert rows(run_dir, drop=()) == [{k: repr(v) for k, v in r.items()} for r in metrics]  # full precision
        for r in metrics:
            assert 0 <= r["train_acc"] <= 1 and 0 <= r["valid_acc"] <= 1 and r["valid_loss"] > 0
        config = json.loads((run_dir / "config.json").read_text())
        assert config["dropout_num"] == m and config["device"] == str(hardware.pick_device("auto"))
        assert config["precision"] == hardware.resolve_precision("auto", hardware.pick_device("auto"))
        assert config["train_images"] == 300 and config["test_images"] == 100
        for key in ("torch", "torchvision", "numpy", "threads", "git_commit", "git_dirty", "data_source", "hardware"):
            assert key in config
        assert not {"resume", "eval", "compare"} & set(config)  # what a command did, not what the run is
        for name in ("loss.png", "acc.png", "last.pt"):
            assert (run_dir / name).stat().st_size > 1000


@pytest.mark.slow
def test_comparison_overlays_the_three_runs(trained):
    (compare_dir,) = (trained / "compare").iterdir()
    for name in ("train_loss.png", "valid_loss.png", "valid_acc.png", "valid_acc_vs_time.png", "final_acc_vs_m.png"):
        assert (compare_dir / name).stat().st_size > 1000
    assert not (compare_dir / "final_acc_vs_p.png").exists()  # one p only
    table = result_tables(compare_dir / "summary.md")[0]
    assert [line.split("|")[1].strip() for line in table] == ["0", "1", "8"]


@pytest.mark.slow
def test_rerunning_a_finished_run_does_not_train(trained, small_cifar, tmp_path, capsys):
    (run_dir,) = run_dirs(trained, 8)
    before = (run_dir / "last.pt").stat().st_mtime_ns, (run_dir / "metrics.csv").read_text()
    rc, out, err = cli(capsys, "--data_dir", small_cifar, "--output_dir", trained, "--dropout_num", 8, *TINY)
    assert rc == 0, err
    assert "nothing to do" in out and str(run_dir) in out and "--overwrite starts it afresh" in out
    assert ((run_dir / "last.pt").stat().st_mtime_ns, (run_dir / "metrics.csv").read_text()) == before

    copy = shutil.copytree(run_dir, tmp_path / run_dir.name)
    rc, out, err = cli(capsys, "--resume", copy)  # --resume takes no --overwrite, so it is not offered
    assert rc == 0 and "nothing to do (--epochs above 2 continues it)\n" in out, out + err
    assert (copy / "metrics.csv").read_text() == before[1]


@pytest.mark.slow
def test_same_command_same_numbers_and_another_seed_others(trained, small_cifar, tmp_path, capsys):
    (reference,) = run_dirs(trained, 8)
    args = ["--data_dir", small_cifar, "--dropout_num", 8, *TINY]
    assert cli(capsys, *args, "--output_dir", tmp_path / "again")[0] == 0
    (again,) = run_dirs(tmp_path / "again", 8)
    assert again.name == reference.name and rows(again) == rows(reference)
    assert cli(capsys, *args, "--output_dir", tmp_path / "seed", "--seed", 7)[0] == 0
    (other,) = run_dirs(tmp_path / "seed", 8)
    assert other.name != reference.name and rows(other) != rows(reference)


@pytest.mark.slow
def test_more_epochs_continue_a_finished_run_exactly(trained, small_cifar, tmp_path, capsys):
    args = ["--data_dir", small_cifar, "--dropout_num", 1, "--batch_size", 32, "--lr_milestone", 1, "--epochs", 3]
    rc, out, _ = cli(capsys, *args, "--output_dir", tmp_path / "fresh")
    assert rc == 0 and "resumed" not in out
    continued = tmp_path / "continued"
    (finished,) = run_dirs(trained, 1)
    shutil.copytree(finished, continued / finished.name)
    rc, out, _ = cli(capsys, *args, "--output_dir", continued)
    assert rc == 0 and "resumed from epoch 2" in out
    assert rows(run_dirs(continued, 1)[0]) == rows(run_dirs(tmp_path / "fresh", 1)[0])


@pytest.mark.slow
def test_overwrite_starts_afresh(trained, small_cifar, tmp_path, capsys):
    (finished,) = run_dirs(trained, 0)
    shutil.copytree(finished, tmp_path / finished.name)
    (tmp_path / finished.name / "stale.txt").write_text("from before")
    rc, out, err = cli(capsys, "--data_dir", small_cifar, "--output_dir", tmp_path, "--dropout_num", 0, *TINY, "--overwrite")
    assert rc == 0 and "resumed" not in out and "nothing to do" not in out
    assert "train_loss  train_acc" in out and "\r" not in out + err  # no TTY: table lines, no bar redraws
    assert not (tmp_path / finished.name / "stale.txt").exists()
    assert rows(tmp_path / finished.name) == rows(finished)


@pytest.mark.parametrize("flags,message", [
    (["--dropout_num", "-1"], "(--dropout_num) must be 0 or more, got -1"),
    (["--dropout_num", "two"], "invalid int value"),
    (["--dropout_p", "1.0"], "(--dropout_p) must be in [0, 1), got 1.0"),
    (["--epochs", "0"], "--epochs must be positive"),
    (["--batch_size", "0"], "--batch_size must be positive"),
    (["--lr", "-0.1"], "--lr must be positive"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--seed", "1", "-1"], "--seed must be in [0, 2**32), got -1"),
    (["--data_seed", str(2**32)], "--data_seed must be in [0, 2**32)"),
    (["--test_size", "0"], "--test_size must be positive"),
    (["--test_size", "101"], "and 101 test images of 100"),
    (["--device", "mps"], "MPS is not available here"),
    (["--train_size", "0"], "--train_size must be positive"),
    (["--model", "vgg"], "unknown --model 'vgg'"),
    (["--dataset", "mnist"], "unknown --dataset 'mnist'"),
    (["--device", "cuda:7"], "no such CUDA device"),
    (["--device", "meta"], "unknown --device 'meta'"),
    (["--device", "xpu"], "unknown --device 'xpu'"),
    (["--valid_split", "300"], "--valid_split 300 leaves none of the 300 training images"),
    (["--train_size", "301"], "asked for 0 validation + 301 training images of 300"),
    (["--valid_split", "100", "--train_size", "250"], "asked for 100 validation + 250 training images of 300"),
    (["--data_dir", "no/such.tar.gz"], "no such archive"),
    (["--rdrop_alpha", "1"], "R-Drop (--rdrop_alpha) needs 2 or more dropout samples (--dropout_num), got 0"),
    (["--rdrop_alpha", "0", "1", "--dropout_num", "1", "2"], "needs 2 or more dropout samples (--dropout_num), got 1"),
    (["--msd_reduce", "logits", "--dropout_num", "1"], "the mean of logits (--msd_reduce logits) needs 2 or more"),
    (["--msd_heads", "separate", "--dropout_num", "0"], "separate heads (--msd_heads separate) needs 2 or more"),
    (["--rdrop_alpha", "-1", "--dropout_num", "2"], "R-Drop's weight (--rdrop_alpha) must be 0 (off) or a positive number"),
    (["--rdrop_alpha", "inf", "--dropout_num", "2"], "R-Drop's weight (--rdrop_alpha) must be 0 (off) or a positive number"),
])
def test_bad_input_is_one_line_and_exit_2(flags, message, small_cifar, tmp_path, capsys):
    rc, out, err = cli(capsys, "--data_dir", small_cifar, "--output_dir", tmp_path / "out", *TINY, *flags)
    assert rc == 2 and err.startswith("run.py: error:") and message in err and err.count("\n") == 1
    assert not list((tmp_path).glob("out/*/metrics.csv"))


@pytest.mark.slow
@pytest.mark.parametrize("modes", [["--resume", "--overwrite"], ["--eval", "--resume"], ["--eval", "--overwrite"]])
def test_eval_resume_and_overwrite_contradict_each_other_and_nothing_is_touched(modes, trained, tmp_path, capsys):
    (finished,) = run_dirs(trained, 1)
    run_dir = shutil.copytree(finished, tmp_path / finished.name)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    argv = [a for mode in modes for a in ([mode, run_dir] if mode != "--overwrite" else [mode])]
    rc, out, err = cli(capsys, *argv, "--epochs", 3)
    assert rc == 2 and "contradict each other" in err and err.count("\n") == 1 and out == ""
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


@pytest.mark.slow
def test_resuming_in_a_read_only_folder_says_what_helps(trained, tmp_path, capsys, monkeypatch):
    (finished,) = run_dirs(trained, 1)
    run_dir = shutil.copytree(finished, tmp_path / finished.name)

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")
    monkeypatch.setattr(tools.tempfile, "TemporaryFile", read_only)
    rc, out, err = cli(capsys, "--resume", run_dir, "--epochs", 3)
    assert rc == 2 and "Read-only file system" in err and "make it writable, or --resume a copy" in err
    assert "--output_dir" not in err and err.count("\n") == 1


@pytest.mark.slow
def test_rdrop_runs_sit_beside_the_others_labelled(trained, small_cifar, tmp_path, capsys):
    (plain,) = run_dirs(trained, 8)
    shutil.copytree(plain, tmp_path / plain.name)
    rc, out, err = cli(capsys, "--data_dir", small_cifar, "--output_dir", tmp_path, "--dropout_num", 8, "--rdrop_alpha", 0, 1, *TINY)
    assert rc == 0, err
    assert "nothing to do" in out  # alpha 0 is the plain run, which keeps its name
    (rdrop,) = [d for d in run_dirs(tmp_path, 8) if d != tmp_path / plain.name]
    assert rdrop.name.startswith("miniresnet_cifar10_m8_p0.5_r1.0_s42-")
    assert json.loads((rdrop / "config.json").read_text())["rdrop_alpha"] == 1.0
    assert rows(rdrop) != rows(tmp_path / plain.name)
    (compare_dir,) = (tmp_path / "compare").iterdir()
    table = result_tables(compare_dir / "summary.md")[0]
    assert [[cell.strip() for cell in line.split("|")[1:4]] for line in table] == [["8", "0.5", "0.0"], ["8", "0.5", "1.0"]]


def test_unwritable_output_is_found_before_training(small_cifar, tmp_path, capsys):
    (tmp_path / "file").write_text("a regular file")
    rc, _, err = cli(capsys, "--data_dir", small_cifar, "--output_dir", tmp_path / "file" / "out", *TINY)
    assert rc == 2 and "cannot write to" in err and err.count("\n") == 1


@pytest.mark.slow
def test_the_real_command_line_exits_2_without_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "run.py", "--dropout_p", "2", "--output_dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_help_shows_every_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # one line per flag, so no default is wrapped
    with pytest.raises(SystemExit):
        run.main(["--help"])
    help_text = capsys.readouterr().out
    for default in ("(default: 0)", "(default: 0.5)", "(default: miniresnet)", "(default: 20)", "(default: 128)",
                    "(default: 0.01)", "(default: 10)", "(default: 42)", "(default: auto)", "(default: outputs)",
                    "(default: 0.0)"):
        assert default in help_text
    entries = {entry.split()[0]: entry for entry in help_text.split("\n  --")[1:]}  # flag: its whole help
    for flag in ("head_hidden", "data_seed", "valid_split", "diversity", "msd_reduce", "msd_heads"):
        assert "(default: " in entries[flag], entries[flag]  # 0 is a default too, not 'no default'


@pytest.mark.slow
def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(small_cifar, tmp_path, capsys, monkeypatch):
    class NanAtCall13(torch.nn.CrossEntropyLoss):  # 9 steps an epoch: training's call 13 is epoch 2, step 4
        calls = 0

        def forward(self, logits, target):
            NanAtCall13.calls += self.reduction == "mean"  # training's mean; evaluation sums
            return super().forward(logits, target) * (float("nan") if NanAtCall13.calls == 13 else 1.0)

    monkeypatch.setattr(torch.nn, "CrossEntropyLoss", NanAtCall13)
    rc, _, err = cli(capsys, "--data_dir", small_cifar, "--output_dir", tmp_path, *TINY)
    assert rc == 2 and "the run diverged: non-finite training loss at step 4 of epoch 2" in err and "epoch 1" in err
    (run_dir,) = run_dirs(tmp_path, 0)
    assert torch.load(run_dir / "last.pt", weights_only=True)["epoch"] == 1
    assert [r["epoch"] for r in json.loads((run_dir / "metrics.json").read_text())] == [1]


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_starts_afresh(trained, small_cifar, tmp_path, capsys):
    (finished,) = run_dirs(trained, 0)
    shutil.copytree(finished, tmp_path / finished.name)
    (tmp_path / finished.name / "last.pt").unlink()  # config.json and curves, but no checkpoint
    rc, out, _ = cli(capsys, "--data_dir", small_cifar, "--output_dir", tmp_path, "--dropout_num", 0, *TINY)
    assert rc == 0 and "resumed" not in out
    assert rows(tmp_path / finished.name) == rows(finished)


@pytest.mark.slow
def test_help_and_flag_errors_do_not_import_torch():
    """--help and bad flags answer at once: torch (seconds to import) is imported only for a run, or for the
    head's own rules (nn.head_problem), which come last."""
    for argv, status in ((["--dropout_num", "x"], 2), (["--epochs", "0"], 2), (["--seed", "-1"], 2), (["--help"], 0)):
        code = (f"import sys, run\ntry:\n    rc = run.main({argv!r})\nexcept SystemExit as e:\n    rc = e.code\n"
                "print(rc, 'torch' in sys.modules or 'matplotlib' in sys.modules)")
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
        assert result.stdout.splitlines()[-1] == f"{status} False", (argv, result.stderr[-300:])


def test_the_model_names_of_the_flags_are_the_networks_nn_builds():
    import nn
    assert run.IMAGE_MODELS == list(nn.MODEL_WIDTHS)


@pytest.mark.parametrize("flags, refused", [(["--dataset", "cifar100"], "--dataset"), (["--dataset", "svhn"], "--dataset"),
                                            (["--model", "resnet18"], "--model"), (["--dropout_p", "0.3"], "--dropout_p")])
@pytest.mark.slow
def test_eval_refuses_flags_that_contradict_the_run(trained, capsys, flags, refused):
    (run_dir,) = run_dirs(trained, 8)
    rc, out, err = cli(capsys, "--eval", run_dir, *flags)
    assert rc == 2 and f"its {refused} is" in err and "--eval evaluates the run as it was trained" in err
    assert err.count("\n") == 1 and out == ""


@pytest.mark.slow
def test_eval_accepts_flags_that_cannot_change_the_evaluation(trained, capsys):
    (run_dir,) = run_dirs(trained, 8)
    saved = json.loads((run_dir / "config.json").read_text())
    rc, out, err = cli(capsys, "--eval", run_dir, "--device", "cpu", "--dataset", "cifar10", "--dropout_num", 8,
                       "--precision", saved["precision"], "--epochs", 99, "--output_dir", "elsewhere")
    assert rc == 0 and err == "" and "epoch 2, 100 test images" in out


@pytest.mark.slow
def test_eval_may_choose_how_many_test_images_and_the_precision_and_says_so(trained, capsys):
    (run_dir,) = run_dirs(trained, 8)
    other = {"bf16": "fp32", "fp32": "bf16"}[json.loads((run_dir / "config.json").read_text())["precision"]]
    rc, out, err = cli(capsys, "--eval", run_dir, "--test_size", 50, "--precision", other)
    assert rc == 0 and err == "" and "epoch 2, 50 test images" in out
    assert "--eval with --test_size 50 (the run was trained with None)" in out and f"--eval with --precision {other}" in out



@pytest.mark.parametrize("flags, message", [(["--test_size", 0], "--test_size must be positive, got 0"),
                                            (["--test_size", -5], "--test_size must be positive, got -5")])
@pytest.mark.slow
def test_eval_checks_its_flags_as_training_does(trained, capsys, flags, message):
    (run_dir,) = run_dirs(trained, 8)
    rc, out, err = cli(capsys, "--eval", run_dir, *flags)
    assert rc == 2 and message in err and err.count("\n") == 1 and out == ""


@pytest.mark.slow
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_files_get_the_permissions_open_gives_under_the_umask(small_cifar, tmp_path, capsys, umask, mode):
    old = os.umask(umask)
    try:
        rc, _, _ = cli(capsys, "--data_dir", small_cifar, "--output_dir", tmp_path, *TINY, "--epochs", 1)
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert rc == 0 and {p.name for p in files} >= {"config.json", "metrics.csv", "last.pt", "summary.md", "valid_acc.png"}
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(mode) for p in files}


def test_a_run_stopped_before_its_first_row_leaves_no_folder(small_cifar, tmp_path, capsys, monkeypatch):
    import tools
    import train
    monkeypatch.setattr(train, "train_epoch", lambda *args: tools.STOP.update(signal="SIGINT") or
                        (_ for _ in ()).throw(tools.Interrupted("stopped by SIGINT at step 1")))
    rc, _, err = cli(capsys, "--data_dir", small_cifar, "--output_dir", tmp_path, *TINY)
    assert rc == 130 and "no checkpoint was written" in err
    assert [p.name for p in tmp_path.iterdir()] == []  # no folder that later looks like a run


@pytest.mark.slow
def test_resumed_is_said_on_the_run_line_after_nothing_else(trained, small_cifar, tmp_path, capsys):
    (finished,) = run_dirs(trained, 1)
    shutil.copytree(finished, tmp_path / finished.name)
    rc, out, _ = cli(capsys, "--data_dir", small_cifar, "--output_dir", tmp_path, "--dropout_num", 1, *TINY, "--epochs", 3)
    lines = out.splitlines()
    assert rc == 0 and lines[0].startswith(str(tmp_path / finished.name)) and lines[0].endswith("; resumed from epoch 2")
    assert lines[1].split()[:2] == ["epoch", "lr"] and lines[2].split()[0] == "3"


@pytest.mark.parametrize("argv", [["--dropout_num=0", "1", "8"], ["--dropout_num=0,1,8"], ["--dropout_num", "0", "1", "8"]])
def test_a_grid_flag_takes_its_values_after_the_equals_sign_too(argv):
    args, given = run.parse_args([*argv, "--seed=3", "--epochs=2"])
    assert args.dropout_num == [0, 1, 8] and args.seed == [3] and args.epochs == 2 and given["dropout_num"] == [0, 1, 8]


def test_help_names_the_sources_and_shows_defaults_as_typed(capsys):
    with pytest.raises(SystemExit):
        run.main(["--help"])
    text = capsys.readouterr().out
    assert "seed 00" not in text and "the seed" not in text and "==SUPPRESS==" not in text
    assert "[42]" not in text and "(default: 42)" in text and "--dropout_num=0 1 8" in text.replace("\n", " ")


def test_a_run_on_other_data_is_named_by_its_data_flag_not_an_internal_key():
    saved = {"dataset": "cifar10", "model": "miniresnet", "data_source": "archive-0123"}
    with pytest.raises(run.UserError, match=r"its data \(--data_dir\) is 'archive-0123', this command's 'torchvision-cifar10'"):
        experiment.check_same_experiment(saved, {**saved, "data_source": "torchvision-cifar10"}, "RUN/last.pt")
    with pytest.raises(run.UserError, match="its --model is 'miniresnet', this command's 'resnet18'"):
        experiment.check_same_experiment(saved, {**saved, "model": "resnet18"}, "RUN/last.pt")
