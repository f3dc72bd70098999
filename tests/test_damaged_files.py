"""Every way a run's files can be damaged, at every entry point that reads them: one line on stderr and exit 2."""
import json
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, cli, run_dirs, write_runs


import blog
import run
import study
import trainingmonitor
from bookkeeping import runfiles
from studies import figures

DAMAGES = {  # what is done to a finished run's files -> what the one line says
    "metrics cut short": (lambda run: (run / "metrics.json").write_text('[{"epoch": 1, "valid_'), "not valid JSON"),
    "metrics not UTF-8": (lambda run: (run / "metrics.json").write_bytes(b'[{"epoch": 1, "\xff\xfe"}]'), "not UTF-8"),
    "config a folder": (lambda run: ((run / "config.json").unlink(), (run / "config.json").mkdir()), "cannot be read"),
    "config without seed": (lambda run: edit(run / "config.json", lambda c: c.pop("seed")), "has no 'seed'"),
    "config without epochs": (lambda run: edit(run / "config.json", lambda c: c.pop("epochs")), "has no 'epochs'"),
    "config without setup": (lambda run: edit(run / "config.json", lambda c: c.pop("setup")), "has no 'setup'"),
    "precision null": (lambda run: edit(run / "config.json", lambda c: c.update(precision=None)), "'precision' is None"),
    "epochs a string": (lambda run: edit(run / "config.json", lambda c: c.update(epochs="2")), "'epochs' is '2'"),
    "metrics an object": (lambda run: (run / "metrics.json").write_text('{"epoch": 1}'), "not a list of rows"),
    "a row without epoch": (lambda run: edit(run / "metrics.json", lambda h: h[0].pop("epoch")), "row 1 has no 'epoch'"),
    "accuracy a string": (lambda run: edit(run / "metrics.json", lambda h: h[1].update(valid_acc="0.5")), "'valid_acc' is '0.5'"),
    "rows without accuracy": (lambda run: edit(run / "metrics.json", lambda h: [r.pop("valid_acc") for r in h]),
                              "row 1 has no 'valid_acc'"),
    "rdrop_alpha null": (lambda run: edit(run / "config.json", lambda c: c.update(rdrop_alpha=None)),
                         "'rdrop_alpha' is None"),
    "data_source null": (lambda run: edit(run / "config.json", lambda c: c.update(data_source=None)),
                         "'data_source' is None"),
    "earlier place without its device": (lambda run: edit(run / "config.json", lambda c: c.update(earlier=[{"until_epoch": 1}])),
                                         "the config's earlier place 1 has no 'device'"),
    "earlier places not a list": (lambda run: edit(run / "config.json", lambda c: c.update(earlier="cpu")), "'earlier' is 'cpu'"),
    "config deleted": (lambda run: (run / "config.json").unlink(), "config.json: cannot be read (No such file"),
    "config a loop of links": (lambda run: loop(run / "config.json"), "config.json: cannot be read (Too many levels"),
    "metrics a loop of links": (lambda run: loop(run / "metrics.json"), "metrics.json: cannot be read (Too many levels"),
    "a row without lr": (lambda run: edit(run / "metrics.json", lambda h: h[1].pop("lr")), "row 2 has no 'lr'"),
    "NaN accuracy": (lambda run: edit(run / "metrics.json", lambda h: h[1].update(valid_acc=float("nan"))), "non-finite"),
    "infinite loss": (lambda run: edit(run / "metrics.json", lambda h: h[0].update(valid_loss=float("inf"))), "non-finite"),
}


def loop(path):
    """path becomes a symbolic link to itself."""
    path.unlink()
    path.symlink_to(path.name)


def edit(path, change):
    values = json.loads(path.read_text())
    change(values)
    path.write_text(json.dumps(values))


def blog_like_runs(folder):
    """Finished runs that each entry point reads: a study's setting folder, run.py's and blog.py's run folder."""
    write_runs(folder / "blog-head", {0: [0.5, 0.5, 0.5], 1: [0.50, 0.52, 0.54], 8: [0.51, 0.55, 0.53]})
    return sorted((folder / "blog-head").glob("m8_*"))[0]


ENTRY_POINTS = {
    "run.py --compare": lambda folder: run.main(["--compare", folder / "blog-head"]),
    "study.py --compare": lambda folder: study.main(["convergence", "--compare", folder]),
    "blog.py": lambda folder: blog.main([folder / "blog-head"]),
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_run_file_is_one_line_naming_it_and_exit_2(entry, damage, tmp_path, capsys):
    damaged = blog_like_runs(tmp_path)
    change, message = DAMAGES[damage]
    change(damaged)
    assert ENTRY_POINTS[entry](tmp_path) == 2
    err = capsys.readouterr().err
    assert message in err and damaged.name in err and err.count("\n") == 1, err
    assert not list(tmp_path.rglob("*.md")) and not list(tmp_path.rglob("*.png"))  # nothing drawn from it


def test_a_copied_run_folder_is_refused_not_counted_twice(tmp_path, capsys):
    damaged = blog_like_runs(tmp_path)
    shutil.copytree(damaged, damaged.with_name(damaged.name + " (copy)"))
    assert run.main(["--compare", tmp_path / "blog-head"]) == 2
    err = capsys.readouterr().err
    assert "are the same run" in err and f"{damaged.name} (copy)" in err and err.count("\n") == 1


@pytest.mark.slow
@pytest.mark.parametrize("key", ["config", "epoch", "history", "model"])
def test_a_checkpoint_without_a_key_is_one_line_for_resume_and_eval(key, small_cifar, tmp_path, capsys):
    assert cli(capsys, "--data_dir", small_cifar, "--output_dir", tmp_path, "--epochs", 1, "--batch_size", 100)[0] == 0
    (run_dir,) = run_dirs(tmp_path, 0)
    checkpoint = torch.load(run_dir / "last.pt", weights_only=True)
    del checkpoint[key]
    torch.save(checkpoint, run_dir / "last.pt")
    for flag in ("--resume", "--eval"):
        rc, _, err = cli(capsys, flag, run_dir)
        assert rc == 2 and f"has no {key!r}" in err and err.count("\n") == 1, err


@pytest.mark.slow
@pytest.mark.parametrize("part", ["model", "optimizer"])
def test_a_checkpoint_of_another_network_is_one_line_for_resume_and_eval(part, small_cifar, tmp_path, capsys):
    assert cli(capsys, "--data_dir", small_cifar, "--output_dir", tmp_path, "--epochs", 1, "--batch_size", 100)[0] == 0
    (run_dir,) = run_dirs(tmp_path, 0)
    checkpoint = torch.load(run_dir / "last.pt", weights_only=True)
    if part == "model":
        checkpoint["model"].pop(sorted(checkpoint["model"])[-1])  # as a later version of the head would find it
    else:
        checkpoint["optimizer"]["param_groups"][0]["params"].pop()
    torch.save(checkpoint, run_dir / "last.pt")
    for flag in ("--resume", "--eval")[:2 if part == "model" else 1]:  # --eval loads no optimizer
        rc, _, err = cli(capsys, flag, run_dir, "--epochs", 2)
        assert rc == 2 and "does not fit this code's" in err and "git_commit" in err and err.count("\n") == 1, err


@pytest.mark.slow
def test_a_checkpoint_whose_metrics_stop_short_of_its_epoch_is_one_line(small_cifar, tmp_path, capsys):
    assert cli(capsys, "--data_dir", small_cifar, "--output_dir", tmp_path, "--epochs", 2, "--batch_size", 100)[0] == 0
    (run_dir,) = run_dirs(tmp_path, 0)
    checkpoint = torch.load(run_dir / "last.pt", weights_only=True)
    checkpoint["history"] = checkpoint["history"][:1]
    torch.save(checkpoint, run_dir / "last.pt")
    rc, _, err = cli(capsys, "--resume", run_dir, "--epochs", 3)
    assert rc == 2 and "says epoch 2 but its metrics end at epoch 1" in err


@pytest.mark.parametrize("argv", [["--resume", ""], ["--compare", ""], ["--eval", ""], ["--output_dir", ""], ["--data_dir", ""]])
def test_an_empty_path_is_refused_not_taken_for_none(argv, capsys, tmp_path):
    rc, _, err = cli(capsys, *argv)
    assert rc == 2 and "needs a path, got an empty string" in err and not list(tmp_path.iterdir())


@pytest.mark.parametrize("argv", [["--output_dir", "{long}"], ["--data_dir", "{long}"], ["--resume", "{long}"],
                                  ["--eval", "{long}"], ["--compare", "{long}"], ["blog.py", "{long}"],
                                  ["study.py", "--data_dir", "{long}", "--workers", "2"],
                                  ["study.py", "--output_dir", "{long}"], ["study.py", "--compare", "{long}"]])
def test_a_path_name_too_long_is_one_line_before_any_work(argv, tmp_path, capsys):
    argv = [a.format(long=tmp_path / ("x" * 300)) for a in argv]  # a name over the 255 bytes a file system takes
    main = {"study.py": lambda a: study.main(["samples", *a]), "blog.py": blog.main}.get(argv[0])
    status = main(argv[1:]) if main else run.main(argv)
    err = capsys.readouterr().err
    assert status == 2 and "a name too long for the file system" in err and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir())


def test_runs_of_different_lengths_in_one_study_are_refused(tmp_path, capsys):
    blog_like_runs(tmp_path)
    run_dir = sorted((tmp_path / "blog-head").glob("m1_*"))[0]  # continued to 3 epochs (--epochs is not in the name)
    edit(run_dir / "config.json", lambda c: c.update(epochs=3))
    edit(run_dir / "metrics.json", lambda h: h.append({**h[-1], "epoch": 3}))
    assert study.main(["convergence", "--compare", tmp_path]) == 2
    err = capsys.readouterr().err
    assert "runs of different lengths (2 epochs: " in err and f"3 epochs: {run_dir}" in err


@pytest.mark.parametrize("entry, argv", [
    ("run.py", ["--compare", "{folder}/blog-head"]),
    ("study.py", ["convergence", "--compare", "{folder}"]),
    ("blog.py", ["{folder}/blog-head"]),
])
def test_a_name_too_long_or_a_read_only_folder_is_one_line(entry, argv, tmp_path, capsys, monkeypatch):
    blog_like_runs(tmp_path)
    import tools

    def too_long(path, write):
        raise OSError(36, "File name too long")
    for module in (tools, blog, trainingmonitor, figures):
        monkeypatch.setattr(module, "atomic_write", too_long, raising=False)
    monkeypatch.setattr(blog, "blog_recipe_runs", runfiles.finished_runs)  # 2 epochs suffice here
    main = {"run.py": run.main, "study.py": study.main, "blog.py": blog.main}[entry]
    assert main([a.format(folder=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "File name too long" in err and err.count("\n") == 1


SLOW_DRAWING = """
import pathlib, sys, time, matplotlib.figure
def slow(*args, **kwargs):  # called by tools.atomic_write with its temporary file in place
    print("drawing", flush=True)
    time.sleep(30)
matplotlib.figure.Figure.savefig = pathlib.Path.write_text = pathlib.Path.write_bytes = slow
import blog, run, study
from bookkeeping import runfiles
blog.blog_recipe_runs = runfiles.finished_runs  # two-epoch runs stand in for the blog's recipe
main = {"run.py": run.main, "study.py": study.main, "blog.py": blog.main}[sys.argv[1]]
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("entry, argv", [("run.py", ["--compare", "{folder}/blog-head"]),
                                         ("study.py", ["convergence", "--compare", "{folder}"]),
                                         ("blog.py", ["{folder}/blog-head"])])
@pytest.mark.slow
def test_a_signal_while_drawing_is_one_line_its_status_and_no_temporary_file(sig, entry, argv, tmp_path):
    blog_like_runs(tmp_path)
    process = subprocess.Popen([sys.executable, "-c", SLOW_DRAWING, entry, *[a.format(folder=tmp_path) for a in argv]], cwd=ROOT,
                               text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout.readline().strip() == "drawing"
    assert list(tmp_path.rglob("*.tmp"))  # a temporary file exists while it draws
    process.send_signal(sig)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + sig and err.count("\n") == 1 and f"stopped by {sig.name}" in err, err
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.slow
def test_a_stop_during_the_last_runs_last_redraw_is_said_and_exits_143(small_cifar, tmp_path, capsys, monkeypatch):
    import tools
    import train
    real = train.report_comparison
    monkeypatch.setattr(train, "report_comparison", lambda *a: (real(*a), tools.STOP.update(signal="SIGTERM")))
    rc, _, err = cli(capsys, "--data_dir", small_cifar, "--output_dir", tmp_path, "--epochs", 1, "--batch_size", 100)
    assert rc == 143 and "stopped by SIGTERM as the last run finished (it is complete)" in err and err.count("\n") == 1
