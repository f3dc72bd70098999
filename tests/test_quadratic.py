"""The dropout post's regression (y = x^2 from ten noisy points), with multi-sample dropout: --dataset quadratic."""
import json
import shutil

import pytest
import torch
from torch import nn as tnn

import run
from conftest import cli, result_tables, rows
from nn import DropoutMLP

FAST = ["--dataset", "quadratic", "--epochs", "200"]  # 2 rows of 100 epochs, 2000 steps: a few seconds


def test_defaults_are_the_posts():
    (args,) = run.grid(run.parse_args(["--dataset", "quadratic"])[0])
    assert (args.model, args.dropout_p, args.lr, args.lr_milestone, args.epochs, args.batch_size) == ("mlp", 0.4, 0.005, 0, 3000, 1)
    (args,) = run.grid(run.parse_args([])[0])  # the image sets keep theirs
    assert (args.model, args.dropout_p, args.lr, args.epochs, args.batch_size) == ("miniresnet", 0.5, 0.01, 20, 128)


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
def quadratic_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("quadratic")
    assert run.main([*FAST, "--dropout_num", "0", "1", "8", "--output_dir", str(out)]) == 0
    return out


@pytest.mark.slow
def test_rows_come_every_100_epochs_without_accuracy(quadratic_runs):
    for m in (0, 1, 8):
        (run_dir,) = quadratic_runs.glob(f"mlp_quadratic_m{m}_p0.4_s42-*")
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert [r["epoch"] for r in metrics] == [100, 200]
        assert (run_dir / "metrics.csv").read_text().splitlines()[0] == "epoch,lr,train_loss,valid_loss,seconds"
        assert all(r["valid_loss"] > 0 for r in metrics)
        for name in ("loss.png", "prediction.png", "last.pt"):
            assert (run_dir / name).stat().st_size > 1000
        assert not (run_dir / "acc.png").exists()
        prediction = json.loads((run_dir / "prediction.json").read_text())
        assert len(prediction["x"]) == 1001 and prediction["x"][0] == 0 and prediction["x"][-1] == 10
        grid_mse = sum((p - t) ** 2 for p, t in zip(prediction["prediction"], prediction["target"])) / 1001
        assert grid_mse == pytest.approx(metrics[-1]["valid_loss"], rel=1e-4)  # the valid loss is the MSE to x^2
    (compare,) = (quadratic_runs / "compare").iterdir()
    for name in ("train_loss.png", "valid_loss.png", "predictions.png"):
        assert (compare / name).stat().st_size > 1000
    summary, per_run = result_tables(compare / "summary.md")
    assert [line.split("|")[1].strip() for line in summary] == ["0", "1", "8"]
    assert [line.split("|")[1].strip() for line in per_run] == ["0", "1", "8"]  # one seed each


@pytest.mark.slow
def test_compare_redraws_runs_kept_without_their_prediction(quadratic_runs, tmp_path, capsys):
    for run_dir in quadratic_runs.glob("mlp_quadratic_m*"):  # config.json and metrics.json are enough to compare
        shutil.copytree(run_dir, tmp_path / run_dir.name, ignore=shutil.ignore_patterns("*.pt", "*.png"))
    (tmp_path / next(quadratic_runs.glob("mlp_quadratic_m8_*")).name / "prediction.json").unlink()
    assert cli(capsys, "--compare", tmp_path)[0] == 0
    (compare,) = (tmp_path / "compare").iterdir()
    assert (compare / "predictions.png").stat().st_size > 1000 and len(result_tables(compare / "summary.md")[1]) == 3
    for prediction in tmp_path.glob("mlp_quadratic_m*/prediction.json"):
        prediction.unlink()
    assert cli(capsys, "--compare", tmp_path)[0] == 0  # the losses alone: no predictions to draw
    assert (compare / "valid_loss.png").exists()


def test_the_table_shows_losses_only(tmp_path, capsys):
    rc, out, _ = cli(capsys, *FAST, "--epochs", "100", "--output_dir", tmp_path)
    header = [line for line in out.splitlines() if line.lstrip().startswith("epoch")]
    assert rc == 0 and header[0].split() == ["epoch", "lr", "train_loss", "valid_loss", "seconds"]


@pytest.mark.slow
def test_rerun_and_resume_give_the_same_numbers(quadratic_runs, tmp_path, capsys):
    (reference,) = quadratic_runs.glob("mlp_quadratic_m8_*")
    assert cli(capsys, *FAST[:-1], "100", "--dropout_num", 8, "--output_dir", tmp_path)[0] == 0  # stop at 100
    rc, out, _ = cli(capsys, *FAST, "--dropout_num", 8, "--output_dir", tmp_path)  # then go on to 200
    assert rc == 0 and "resumed from epoch 100" in out
    assert rows(tmp_path / reference.name) == rows(reference)


@pytest.mark.slow
def test_a_run_extended_from_a_rows_middle_keeps_the_rows_and_learning_rates_of_one_trained_at_once(tmp_path, capsys):
    flags = ["--dataset", "quadratic", "--dropout_num", 1, "--lr_milestone", 100]
    assert cli(capsys, *flags, "--epochs", 200, "--output_dir", tmp_path / "at_once")[0] == 0
    assert cli(capsys, *flags, "--epochs", 50, "--output_dir", tmp_path / "extended")[0] == 0  # half a row
    assert cli(capsys, *flags, "--epochs", 200, "--output_dir", tmp_path / "extended")[0] == 0
    (at_once,), (extended,) = (list((tmp_path / name).glob("mlp_quadratic_m1_*")) for name in ("at_once", "extended"))
    at_once, extended = (json.loads((d / "metrics.json").read_text()) for d in (at_once, extended))
    assert [(r["epoch"], r["lr"]) for r in extended] == [(50, 0.005), (100, 0.005), (200, 0.0005)]
    assert [(r["epoch"], r["lr"], r["valid_loss"]) for r in at_once] == [(r["epoch"], r["lr"], r["valid_loss"])
                                                                         for r in extended[1:]]


@pytest.mark.parametrize("flags,message", [
    (["--augment"], "--augment is for the image data sets"),
    (["--train_size", "5"], "--train_size is for the image data sets"),
    (["--model", "miniresnet"], "--dataset quadratic trains the post's network"),
    (["--batch_size", "11"], "--batch_size 11 is larger than the 10 training examples"),
    (["--lr_milestone", "150"], "--lr_milestone must be a multiple of 100 with --dataset quadratic"),
    (["--rdrop_alpha", "1"], "R-Drop (--rdrop_alpha) compares class distributions: the regression's mlp has none"),
    (["--pool", "avg2"], "are options of the ResNet head; the regression's mlp has its own: drop them"),
    (["--head_hidden", "16"], "are options of the ResNet head; the regression's mlp has its own: drop them"),
])
def test_image_flags_are_refused(flags, message, tmp_path, capsys):
    rc, _, err = cli(capsys, *FAST, *flags, "--output_dir", tmp_path)
    assert rc == 2 and message in err and err.count("\n") == 1
