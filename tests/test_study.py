"""The head options from the command line, and the study that compares them."""
import json

import numpy as np
import pytest

import experiment
import run
import study
from conftest import cli, fake_run, run_dirs
from tools import write_json

T_975_2DF = 4.302652729749464  # Student t, 97.5th percentile, 2 degrees of freedom


def test_default_head_keeps_the_names_of_earlier_runs_and_other_heads_say_theirs():
    before = {"model": "miniresnet", "dataset": "cifar10", "dropout_num": 8, "dropout_p": 0.5, "seed": 42,
              "data_source": "archive-x", "batch_size": 128, "lr": 0.01, "lr_milestone": 10, "augment": False,
              "data_seed": 0, "train_size": None, "test_size": None, "precision": "fp32"}
    now = {**before, "head_hidden": 0, "pool": "avg4", "diversity": "none", "rdrop_alpha": 0.0, "valid_split": 0}
    assert experiment.run_identity(now) == experiment.run_identity(before)
    name, setup = experiment.run_identity({**now, "head_hidden": 512, "pool": "avg2", "diversity": "flip+pad"})
    assert name.startswith("miniresnet_cifar10_m8_p0.5_h512_avg2_flip+pad_s42-") and setup != experiment.run_identity(now)[1]


@pytest.mark.parametrize("flags, message", [
    (["--diversity", "flip", "--dropout_num", "8"], "--diversity flip needs --pool avg2"),
    (["--pool", "avg2", "--diversity", "pad", "--dropout_num", "1"], "needs --dropout_num 2 or more, got 1"),
    (["--head_hidden", "-1"], "--head_hidden must be 0"),
    (["--pool", "avg3"], "invalid choice"),
])
def test_refused_head_options_are_one_line_and_exit_2(small_cifar, tmp_path, capsys, flags, message):
    rc, _, err = cli(capsys, "--data_dir", small_cifar, "--output_dir", tmp_path, *flags)
    assert rc == 2 and message in err and err.count("\n") == 1 and not list(tmp_path.iterdir())


def test_every_head_option_trains_from_the_command_line(small_cifar, tmp_path, capsys):
    rc, out, err = cli(capsys, "--data_dir", small_cifar, "--output_dir", tmp_path, "--epochs", 1, "--batch_size", 100,
                       "--dropout_num", 4, "--head_hidden", 64, "--pool", "avg2", "--diversity", "flip+pad",
                       "--rdrop_alpha", 1)
    (run_dir,) = run_dirs(tmp_path, 4)
    config = json.loads((run_dir / "config.json").read_text())
    assert rc == 0 and (config["head_hidden"], config["pool"], config["diversity"]) == (64, "avg2", "flip+pad")
    assert "_r1.0_h64_avg2_flip+pad_s42-" in run_dir.name


def write_runs(folder, finals):
    """Finished runs of dropout_num 1 and 8 whose final valid accuracies are finals[m][seed index]."""
    for m, values in finals.items():
        for seed, final in zip((42, 43, 44), values):
            run = fake_run(m, seed, [0.3, final])
            run["config"].update(epochs=2, dataset="cifar10", model="miniresnet", data_source="x", batch_size=128,
                                 lr=0.01, lr_milestone=1, augment=False, data_seed=0, train_size=None, test_size=None,
                                 precision="fp32", train_images=5000, valid_images=5000, device="cpu")
            (folder / run["dir"].name).mkdir(parents=True)
            write_json(folder / run["dir"].name / "config.json", run["config"])
            write_json(folder / run["dir"].name / "metrics.json", run["history"])


def test_the_gains_are_paired_differences_with_a_hand_computed_interval(tmp_path):
    write_runs(tmp_path / "blog-head", {1: [0.50, 0.52, 0.54], 8: [0.51, 0.55, 0.53]})  # differences .01 .03 -.01
    write_runs(tmp_path / "avg2", {1: [0.50, 0.50, 0.50], 8: [0.52, 0.52, 0.52]})
    write_runs(tmp_path / "avg2-flip", {8: [0.49, 0.50, 0.51]})  # paired with avg2's one-sample runs
    found = {label: (d, without) for label, _, _, d, without in study.compared(tmp_path)}
    assert set(found) == {"the blog's head", "--pool avg2", "--pool avg2 --diversity flip"}  # no runs: left out
    assert found["--pool avg2 --diversity flip"][0]["mean"] == pytest.approx(0.0)
    half = T_975_2DF * 0.02 / np.sqrt(3)
    assert found["the blog's head"][0]["mean"] == pytest.approx(0.01)
    assert found["the blog's head"][0]["interval"] == pytest.approx((0.01 - half, 0.01 + half))
    assert found["--pool avg2"][0]["interval"] == pytest.approx((0.02, 0.02)) and found["--pool avg2"][1] is None
    flip_without = found["--pool avg2 --diversity flip"][1]  # against avg2's eight samples: -.03 -.02 -.01
    assert flip_without["mean"] == pytest.approx(-0.02) and (flip_without["higher"], flip_without["lower"]) == (0, 3)
    assert flip_without["interval"] == pytest.approx((-0.02 - T_975_2DF * 0.01 / np.sqrt(3), -0.02 + T_975_2DF * 0.01 / np.sqrt(3)))
    table = study.table(study.compared(tmp_path))
    assert (f"| the blog's head | 0.5200 ± 0.0200 | 0.5300 ± 0.0200 | 3 | +0.0100 [{0.01 - half:+.4f}, "
            f"{0.01 + half:+.4f}], 2 / 1 | - |") in table


def test_the_study_runs_each_setting_into_its_folder_and_draws_the_gains(small_cifar, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(study.PROTOCOLS, "reduced", (["--epochs", "1", "--batch_size", "100", "--precision", "fp32"], "unused"))
    monkeypatch.setattr(study, "SETTINGS", {k: study.SETTINGS[k] for k in ("avg2", "avg2-flip")})
    assert study.main(["--data_dir", small_cifar, "--output_dir", tmp_path, "--seed", "1"]) == 0
    assert len(run_dirs(tmp_path / "avg2", 1)) == 1 and not run_dirs(tmp_path / "avg2-flip", 1)  # avg2's is the reference
    assert "_avg2_flip_s1-" in run_dirs(tmp_path / "avg2-flip", 8)[0].name
    assert (tmp_path / "gain.png").stat().st_size > 0
    (flip,) = [line for line in (tmp_path / "study.md").read_text().splitlines() if line.startswith("| --pool avg2 --diversity flip |")]
    one, eight, seeds, difference = flip.split(" | ")[1:5]  # one seed: the difference is eight - one, no interval
    assert seeds == "1" and "(one seed: no interval), " in difference
    assert float(difference.split()[0]) == pytest.approx(float(eight) - float(one), abs=1.5e-4)  # each printed to 4 places
    assert study.main(["--data_dir", small_cifar, "--output_dir", tmp_path, "--seed", "1"]) == 0  # a rerun trains nothing
    assert capsys.readouterr().out.count("nothing to do") == 3


def test_the_full_protocol_is_the_blogs_recipe_and_the_reduced_one_says_its_sizes():
    full = run.build_parser().parse_args(study.PROTOCOLS["full"][0])
    assert (full.epochs, full.lr_milestone, full.train_size, full.test_size, full.precision) == (20, 10, None, None, "fp32")
    reduced = run.build_parser().parse_args(study.PROTOCOLS["reduced"][0])
    assert (reduced.epochs, reduced.lr_milestone, reduced.train_size, reduced.test_size) == (10, 5, 5000, 5000)
    args = study.parse_args(["--protocol", "full", "--seed", "43"])
    assert args.seed == [43] and args.output_dir == "outputs/study-full"  # its own folder: runs pair by seed alone
    assert study.parse_args([]).output_dir == "outputs/study"


def test_compare_draws_the_study_from_committed_files_alone_and_refuses_other_flags(tmp_path, capsys):
    write_runs(tmp_path / "blog-head", {1: [0.50, 0.52, 0.54], 8: [0.51, 0.55, 0.53]})
    assert study.main(["--compare", tmp_path]) == 0
    assert "| the blog's head | 0.5200 ± 0.0200 | 0.5300 ± 0.0200 | 3 | +0.0100 [" in (tmp_path / "study.md").read_text()
    assert (tmp_path / "gain.png").stat().st_size > 0 and not list((tmp_path / "blog-head").glob("*/last.pt"))
    assert study.caption(tmp_path) == "5000/5000 images, 2 epochs, fp32, seeds 42 43 44, cpu"
    capsys.readouterr()
    for argv, message in [(["--compare", tmp_path, "--seed", "1"], "takes no other flag"),
                          (["--compare", tmp_path / "empty"], "holds no setting with finished runs")]:
        assert study.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1


def test_two_runs_of_one_seed_in_a_folder_are_refused_not_silently_paired(tmp_path, capsys):
    write_runs(tmp_path / "blog-head", {1: [0.50, 0.52, 0.54], 8: [0.51, 0.55, 0.53]})
    write_runs(tmp_path / "other" / "blog-head", {8: [0.40, 0.41, 0.42]})  # another protocol's run of seed 42
    (tmp_path / "other" / "blog-head" / "m8_s42").rename(tmp_path / "blog-head" / "m8_s42-other")
    assert study.main(["--compare", tmp_path]) == 2
    err = capsys.readouterr().err
    assert "holds two runs of dropout_num 8 with seed 42" in err and err.count("\n") == 1
    assert not (tmp_path / "study.md").exists()


def test_an_unwritable_figure_is_one_line_and_exit_2(tmp_path, capsys):
    write_runs(tmp_path / "blog-head", {1: [0.50, 0.52, 0.54], 8: [0.51, 0.55, 0.53]})
    (tmp_path / "gain.png").mkdir()  # a folder where the figure goes: writing it fails, as root too
    assert study.main(["--compare", tmp_path]) == 2
    err = capsys.readouterr().err
    assert err.startswith("study.py: error: cannot write") and err.count("\n") == 1


def test_a_truncated_run_file_or_an_empty_folder_name_is_one_line_and_exit_2(tmp_path, capsys):
    write_runs(tmp_path / "blog-head", {1: [0.50, 0.52, 0.54], 8: [0.51, 0.55, 0.53]})
    metrics = next((tmp_path / "blog-head").glob("m8_s43/metrics.json"))
    metrics.write_text(metrics.read_text()[:40])  # cut by hand, or by a copy that failed
    for argv, message in [(["--compare", tmp_path], "may be truncated"), (["--compare", ""], "--compare needs the folder")]:
        assert study.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
