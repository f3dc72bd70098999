"""The post on torch.nn.Dropout, its regression (y = x^2 from ten noisy points) with multi-sample dropout:
regression.py, a script of its own beside the classification path."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn as tnn

import regression
from conftest import ROOT, result_tables
from regression import DropoutMLP

FAST = ["--epochs", "200", "--dropout_num", "0", "1", "8"]  # 2 rows of 100 epochs, 2000 steps a run: seconds


def dropouts(model):
    return [m for m in model.modules() if isinstance(m, tnn.Dropout)]


@pytest.mark.parametrize("m", [0, 1, 8])
def test_the_network_and_where_its_dropouts_sit(m):
    model = DropoutMLP(m, 0.4)
    widths = [(l.in_features, l.out_features) for l in model.modules() if isinstance(l, tnn.Linear)]
    assert widths == [(1, 3), (3, 5), (5, 10), (10, 5), (5, 1)]
    assert len(dropouts(model)) == (1 if m else 0)  # dropout A after the 5-unit layer
    assert model.head.num_samples == m  # dropout B after the 10-unit layer, multi-sample for m >= 2
    assert isinstance(model.head.head[-1], tnn.ReLU)


def test_multi_sample_loss_is_the_mean_over_the_samples_of_the_squared_error():
    torch.manual_seed(0)
    model = DropoutMLP(8, 0.4).train()
    x, y = torch.tensor([[3.0], [7.0]]), torch.tensor([[9.0], [49.0]])
    seen = {}
    model.head.head.register_forward_hook(lambda mod, inp, out: seen.update(out=out))
    _, loss = model(x, y, tnn.MSELoss())
    per_sample = ((seen["out"].view(8, 2, 1) - y) ** 2).mean((1, 2))
    assert seen["out"].shape == (16, 1) and torch.allclose(loss, per_sample.mean())


def test_setting_p_to_zero_as_the_post_does_leaves_dropout_on_and_eval_switches_it_off():
    torch.manual_seed(0)
    model = DropoutMLP(1, 0.4).train()
    model.p = 0  # the post's `linear.p = 0`: the Dropout modules copied p = 0.4 when built, and keep it
    x = torch.linspace(0, 10, 50)[:, None]
    assert not torch.equal(model(x), model(x))  # still random
    model.eval()
    assert torch.equal(model(x), model(x))
    body_without_dropout = [layer for layer in model.body if not isinstance(layer, tnn.Dropout)]
    expected = model.head.head(torch.nn.Sequential(*body_without_dropout)(x))
    assert torch.equal(model(x), expected)


@pytest.fixture(scope="module")
def regression_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("regression")
    assert regression.main([*FAST, "--output_dir", out]) == 0
    return out


def test_a_row_every_100_epochs_whose_valid_loss_is_the_predictions_mse(regression_runs):
    for m in (0, 1, 8):
        record = json.loads((regression_runs / f"m{m}_p0.4_s42_e200_lr0.005.json").read_text())
        assert [row["epoch"] for row in record["rows"]] == [100, 200]
        assert all(row["valid_loss"] > 0 and row["train_loss"] > 0 for row in record["rows"])
        grid = torch.linspace(0, 10, 1001)
        assert len(record["prediction"]) == 1001
        mse = ((torch.tensor(record["prediction"]) - grid ** 2) ** 2).mean().item()
        assert mse == pytest.approx(record["rows"][-1]["valid_loss"], rel=1e-5)
    assert (regression_runs / "regression.png").stat().st_size > 10000
    summary, per_run = result_tables(regression_runs / "summary.md")
    assert [line.split("|")[1].strip() for line in summary] == ["0", "1", "8"]
    assert [line.split("|")[1].strip() for line in per_run] == ["0", "1", "8"]  # one seed each


def test_the_settings_differ_and_a_rerun_draws_the_same_bits(regression_runs, tmp_path):
    finals = [json.loads((regression_runs / f"m{m}_p0.4_s42_e200_lr0.005.json").read_text())["rows"]
              for m in (0, 1, 8)]
    assert len({json.dumps(rows) for rows in finals}) == 3  # dropout changes the run
    rows, prediction = regression.train(8, 0.4, 42, 200, 0.005)
    assert rows == finals[2] and len(prediction) == 1001


def test_a_rerun_skips_the_runs_it_finds_and_adds_new_seeds(regression_runs, capsys):
    before = {p.name: p.read_bytes() for p in regression_runs.glob("m*.json")}
    assert regression.main([*FAST, "--seed", "42", "43", "--output_dir", regression_runs]) == 0
    out = capsys.readouterr().out
    assert "seed=42" not in out and out.count("seed=43") == 3  # only the new runs train
    assert all((regression_runs / name).read_bytes() == data for name, data in before.items())
    summary, per_run = result_tables(regression_runs / "summary.md")
    assert [line.split("|")[3].strip() for line in summary] == ["2", "2", "2"] and len(per_run) == 6


@pytest.mark.parametrize("flags,message", [
    (["--epochs", "150"], "--epochs must be a positive multiple of 100"),
    (["--dropout_num", "-1"], "--dropout_num must be 0 or more"),
    (["--dropout_p", "1"], "--dropout_p must be in [0, 1), got 1.0"),
    (["--lr", "0"], "--lr must be a positive number"),
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--epochs", "ten"], "invalid int value"),
])
def test_bad_input_is_one_line_and_exit_2(flags, message, tmp_path, capsys):
    assert regression.main([*flags, "--output_dir", tmp_path / "out"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_a_damaged_run_file_is_named_not_a_traceback(tmp_path, capsys):
    (tmp_path / "m0_p0.4_s42_e100_lr0.005.json").write_text("{ not json")
    assert regression.main(["--epochs", "100", "--dropout_num", "0", "--output_dir", tmp_path]) == 2
    err = capsys.readouterr().err
    assert "m0_p0.4_s42_e100_lr0.005.json" in err and "delete it" in err and err.count("\n") == 1


def test_the_classification_path_knows_nothing_of_the_regression():
    for name in ("run.py", "train.py", "datasource.py", "nn.py", "trainingmonitor.py", "progressbar.py",
                 "bookkeeping/runfiles.py"):
        text = (ROOT / name).read_text().lower()
        assert "quadratic" not in text and "regression" not in text and "mlp" not in text, name


@pytest.mark.slow
def test_the_script_runs_from_a_shell(tmp_path):
    proc = subprocess.run([sys.executable, "regression.py", "--epochs", "100", "--dropout_num", "8", "--output_dir",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == "" and "m=8 seed=42: final train MSE" in proc.stdout


def test_the_committed_runs_redraw_their_table_and_figure_byte_for_byte(tmp_path, capsys):
    committed = ROOT / "docs" / "regression-zen4"
    for run_file in committed.glob("m*.json"):
        shutil.copy(run_file, tmp_path)
    assert regression.main(["--seed", "42", "43", "44", "--output_dir", tmp_path]) == 0
    assert "seed=" not in capsys.readouterr().out  # nothing trained: every run was found
    for name in ("summary.md", "regression.png"):
        assert (tmp_path / name).read_bytes() == (committed / name).read_bytes(), name


def test_the_caller_keeps_its_thread_count(tmp_path):
    threads = torch.get_num_threads()
    assert regression.main(["--epochs", "100", "--dropout_num", "0", "--output_dir", tmp_path]) == 0
    assert torch.get_num_threads() == threads
