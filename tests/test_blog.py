"""blog.py: the blog's numbers beside ours, from finished run folders."""
import numpy as np
import pytest

import blog
from conftest import fake_run, write_json


def write_run(folder, m, seed, final_acc, **changes):
    config = {**fake_run(m, seed, [final_acc])["config"], **blog.RECIPE, "setup": "miniresnet_cifar10-abc",
              "precision": "fp32", "device": "cuda", **changes}
    history = [{"epoch": e, "lr": 0.01, "train_loss": 1.0, "train_acc": 0.5, "valid_loss": 1.0,
                "valid_acc": final_acc - 0.1 + 0.1 * (e == 20) + 0.2 * (e == 12), "seconds": 1.0} for e in range(1, 21)]
    run_dir = folder / f"m{m}_s{seed}"
    run_dir.mkdir(parents=True)
    write_json(run_dir / "config.json", config)
    write_json(run_dir / "metrics.json", history)


def test_the_table_sets_our_mean_beside_the_blog_figures_values(tmp_path, capsys):
    for seed, acc in ((1, 0.80), (2, 0.82)):
        write_run(tmp_path, 0, seed, acc)
    write_run(tmp_path, 8, 1, 0.85)
    write_run(tmp_path, 8, 2, 0.85, epochs=10)  # another recipe: left out
    assert blog.main([tmp_path]) == 0
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in (tmp_path / "blog.md").read_text().splitlines()[2:]]
    final_0 = np.array([0.80, 0.82])
    assert rows[0] == ["0", "final (epoch 20)", "0.778", f"{final_0.mean():.4f} ± {final_0.std(ddof=1):.4f} (2)",
                       f"{final_0.mean() - 0.778:+.4f}"]
    assert rows[1][:3] == ["0", "best", "0.785"] and rows[1][3].startswith(f"{final_0.mean() + 0.1:.4f}")
    assert rows[2] == ["8", "final (epoch 20)", "0.843", "0.8500 (1)", "+0.0070"]
    assert (tmp_path / "blog_vs_ours.png").stat().st_size > 0


def test_the_csv_holds_the_three_settings_of_the_three_figures():
    curves = blog.blog_curves()
    assert set(curves) == {(m, s) for m in ("valid_acc", "train_loss", "valid_loss") for s in (0, 1, 8)}
    assert curves[("valid_acc", 1)][-1] == pytest.approx(0.835) and all(len(v) == 20 for v in curves.values())


def test_help_says_what_the_command_writes(capsys):
    with pytest.raises(SystemExit) as exit:
        blog.main(["--help"])
    assert exit.value.code == 0 and "Write blog.md" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [([], "arguments are required: RUNS_DIR"), (["a", "b"], "unrecognized"),
                                           ([""], "needs a path"), (["EMPTY"], "no finished run")])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    args = [tmp_path if a == "EMPTY" else a for a in args]
    assert blog.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "blog.md").exists()


def test_runs_of_two_setups_are_refused(tmp_path, capsys):
    write_run(tmp_path, 0, 1, 0.8)
    write_run(tmp_path, 1, 1, 0.8, setup="miniresnet_cifar10-def")
    assert blog.main([tmp_path]) == 2 and "2 setups" in capsys.readouterr().err


def test_the_figure_names_the_data_our_runs_read():
    assert blog.data_in_words({"data_source": "torchvision-cifar10", "data_dir": "data"}) == "official CIFAR-10"
    assert blog.data_in_words({"data_source": "archive-0123", "data_dir": "../x/cifar10-jpeg.tar.gz"}) == \
        "CIFAR-10 from cifar10-jpeg.tar.gz"
