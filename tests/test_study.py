"""The head options from the command line, and the study that compares them."""
import json
import shlex
import shutil

import numpy as np
import pytest
import torch

import datasource
import experiment
import hardware
import provenance
import run
import stats
import studies
import study
import studyfigures
import train
import trainingmonitor
import workers
from conftest import ROOT, cli, fake_run, run_dirs, write_json

T_975_2DF = 4.302652729749464  # Student t, 97.5th percentile, 2 degrees of freedom
T_975_1DF = 12.706204736174698  # and with 1


def test_default_head_keeps_the_names_of_earlier_runs_and_other_heads_say_theirs():
    before = {"model": "miniresnet", "dataset": "cifar10", "dropout_num": 8, "dropout_p": 0.5, "seed": 42,
              "data_source": "archive-x", "batch_size": 128, "lr": 0.01, "lr_milestone": 10, "augment": False,
              "data_seed": 0, "train_size": None, "test_size": None, "precision": "fp32"}
    now = {**before, "head_hidden": 0, "pool": "avg4", "diversity": "none", "rdrop_alpha": 0.0, "valid_split": 0}
    assert experiment.run_identity(now) == experiment.run_identity(before)
    name, setup = experiment.run_identity({**now, "head_hidden": 512, "pool": "avg2", "diversity": "flip+pad"})
    assert name.startswith("miniresnet_cifar10_m8_p0.5_h512_avg2_flip+pad_s42-") and setup != experiment.run_identity(now)[1]


@pytest.mark.parametrize("flags, message", [
    (["--diversity", "flip", "--dropout_num", "8"], "diversity 'flip' needs --pool avg2"),
    (["--pool", "avg2", "--diversity", "pad", "--dropout_num", "1"], "needs 2 or more dropout samples (--dropout_num), got 1"),
    (["--head_hidden", "-1"], "(--head_hidden) must be 0 (a single linear layer) or more, got -1"),
    (["--pool", "avg3"], "invalid choice"),
])
def test_refused_head_options_are_one_line_and_exit_2(small_cifar, tmp_path, capsys, flags, message):
    rc, _, err = cli(capsys, "--data_dir", small_cifar, "--output_dir", tmp_path, *flags)
    assert rc == 2 and message in err and err.count("\n") == 1 and not list(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("flag, value, part", [("--msd_reduce", "logits", "_logits_s42-"), ("--msd_heads", "separate", "_separate_s42-")])
def test_each_variant_trains_from_the_command_line_and_names_its_run(small_cifar, tmp_path, capsys, flag, value, part):
    rc, _, err = cli(capsys, "--data_dir", small_cifar, "--output_dir", tmp_path, "--epochs", 1, "--batch_size", 100,
                     "--dropout_num", 8, flag, value)
    (run_dir,) = run_dirs(tmp_path, 8)
    assert rc == 0, err
    assert run_dir.name.startswith("miniresnet_cifar10_m8_p0.5" + part)
    default = experiment.run_identity({**json.loads((run_dir / "config.json").read_text()), flag[2:]: {
        "--msd_reduce": "loss", "--msd_heads": "shared"}[flag]})[0]
    assert default.startswith("miniresnet_cifar10_m8_p0.5_s42-") and default[-8:] != run_dir.name[-8:]  # name and hash


@pytest.mark.slow
def test_every_head_option_trains_from_the_command_line(small_cifar, tmp_path, capsys):
    rc, out, err = cli(capsys, "--data_dir", small_cifar, "--output_dir", tmp_path, "--epochs", 1, "--batch_size", 100,
                       "--dropout_num", 4, "--head_hidden", 64, "--pool", "avg2", "--diversity", "flip+pad",
                       "--rdrop_alpha", 1)
    (run_dir,) = run_dirs(tmp_path, 4)
    config = json.loads((run_dir / "config.json").read_text())
    assert rc == 0 and (config["head_hidden"], config["pool"], config["diversity"]) == (64, "avg2", "flip+pad")
    assert "_r1.0_h64_avg2_flip+pad_s42-" in run_dir.name


def write_runs(folder, finals, seeds=(42, 43, 44), precision="fp32", train_size=5000):
    """Finished runs whose final valid accuracies are finals[(m, p)][seed index] (or finals[m] at p = 0.5)."""
    for key, values in finals.items():
        m, p = key if isinstance(key, tuple) else (key, 0.5)
        for seed, final in zip(seeds, values):
            run = fake_run(m, seed, [0.3, final], p)
            run["config"].update(epochs=2, dataset="cifar10", model="miniresnet", data_source="x", batch_size=128,
                                 lr=0.01, lr_milestone=1, augment=False, data_seed=0, train_size=train_size,
                                 test_size=5000, precision=precision, train_images=5000, valid_images=5000, device="cpu",
                                 hardware="Some CPU (family 1)", setup="miniresnet_cifar10-x")
            name = f"m{m}_p{p}_s{seed}-{precision}"
            (folder / name).mkdir(parents=True)
            write_json(folder / name / "config.json", run["config"])
            write_json(folder / name / "metrics.json", run["history"])


def set_curves(folder, m, seed, **per_epoch):
    """Give a write_runs run these per-epoch values (train_loss=[...], ...), as many epochs as they have."""
    run = folder / f"m{m}_p0.5_s{seed}-fp32"
    n = len(next(iter(per_epoch.values())))
    history = [{**row, **{k: v[e] for k, v in per_epoch.items()}} for e, row in enumerate(fake_run(m, seed, [0.5] * n)["history"])]
    write_json(run / "metrics.json", history)
    write_json(run / "config.json", {**json.loads((run / "config.json").read_text()), "epochs": n})


def comparisons(folder, name):
    s = study.STUDIES[name]
    return {c.label: c.difference for c in study.compare(study.collect(folder, s), s.pairs, study.own_seeds(s))
            if c.difference}


def test_the_comparisons_are_paired_differences_with_a_hand_computed_interval(tmp_path):
    write_runs(tmp_path / "blog-head", {1: [0.50, 0.52, 0.54], 8: [0.51, 0.55, 0.53]})  # differences .01 .03 -.01
    write_runs(tmp_path / "avg2", {1: [0.50, 0.50, 0.50], 8: [0.52, 0.52, 0.52]})
    write_runs(tmp_path / "avg2-flip", {8: [0.49, 0.50, 0.51]})  # paired with avg2's one-sample runs
    found = comparisons(tmp_path, "where")
    assert set(found) == {"the blog's head: M=8 − M=1", "--pool avg2: M=8 − M=1",  # no runs: left out
                          "--pool avg2 --diversity flip: M=8 − avg2's M=1", "--pool avg2 --diversity flip: M=8 − avg2's M=8"}
    assert found["--pool avg2 --diversity flip: M=8 − avg2's M=1"]["mean"] == pytest.approx(0.0)
    half = T_975_2DF * 0.02 / np.sqrt(3)
    assert found["the blog's head: M=8 − M=1"]["mean"] == pytest.approx(0.01)
    assert found["the blog's head: M=8 − M=1"]["interval"] == pytest.approx((0.01 - half, 0.01 + half))
    assert found["--pool avg2: M=8 − M=1"]["interval"] == pytest.approx((0.02, 0.02))
    flip_without = found["--pool avg2 --diversity flip: M=8 − avg2's M=8"]  # -.03 -.02 -.01
    assert flip_without["mean"] == pytest.approx(-0.02) and (flip_without["higher"], flip_without["lower"]) == (0, 3)
    assert flip_without["interval"] == pytest.approx((-0.02 - T_975_2DF * 0.01 / np.sqrt(3), -0.02 + T_975_2DF * 0.01 / np.sqrt(3)))
    assert study.main(["where", "--compare", tmp_path]) == 0
    table = (tmp_path / "where.md").read_text()
    assert f"| the blog's head: M=8 − M=1 | 3 | +0.0100 [{0.01 - half:+.4f}, {0.01 + half:+.4f}] | ±{half:.4f} | 2 / 1 | " \
           "Some CPU (family 1), fp32 ×3 |" in table
    assert "| flip: M=8 − avg2's M=8 | 3 | -0.0200 [" not in table and "M=8 − avg2's M=8 | 3 | -0.0200 [-0.0448, +0.0048] |" in table
    assert "| blog-head | 1 | 0.5 | 3 | 0.5200 ± 0.0200 | 0.4800 ± 0.0200 | 0.5200 ± 0.0200 |" in table  # train acc: as valid here
    assert "custom protocol: 5000/5000 images, 2 epochs, fp32; seeds 42-44" in table
    # sds 0.02, 0, 0.01, 0.01 at 2 degrees of freedom each: (0.0004 + 0 + 0.0001 + 0.0001) * 2 / 8 = 0.00015
    assert (f"standard deviation, pooled over these comparisons, is {np.sqrt(0.00015):.4f} (the comparisons' n − 1 "
            "summed: 8; they share reference runs, so fewer are independent); at that spread a 95% half-width of "
            f"±0.0050 (half a point) takes {stats.seeds_for_half_width(np.sqrt(0.00015), 0.005)} seeds a comparison.") in table


def test_the_where_figure_says_each_label_names_its_reference_and_its_title_stays_inside_the_figure(tmp_path, monkeypatch):
    write_runs(tmp_path / "avg2", {1: [0.50, 0.50, 0.50], 8: [0.52, 0.52, 0.52]})
    write_runs(tmp_path / "avg2-flip", {8: [0.49, 0.50, 0.51]})  # against avg2's M=8 too: not "minus dropout_num=1's"
    drawn, real_save = {}, trainingmonitor.save_figure

    def record(fig, path, title=None):
        real_save(fig, path, title)
        (suptitle,) = [text for text in fig.texts if text.get_text() == title]  # suptitle is one of the figure's texts
        drawn.update(title=title, box=suptitle.get_window_extent(fig.canvas.get_renderer()), width=fig.bbox.width)
    monkeypatch.setattr(trainingmonitor, "save_figure", record)
    assert study.main(["where", "--compare", tmp_path]) == 0
    assert drawn["title"].startswith("differences in final valid accuracy, as each label says, paired by seed")
    assert "dropout_num=1" not in drawn["title"] and 0 <= drawn["box"].x0 < drawn["box"].x1 <= drawn["width"]


def test_the_table_gives_the_seconds_a_run_took_by_where_it_ran(tmp_path):
    write_runs(tmp_path / "blog-head", {1: [0.50, 0.52, 0.54], 8: [0.51, 0.55, 0.53]})  # two epochs of 1 s each
    run = tmp_path / "blog-head" / "m8_p0.5_s44-fp32"
    write_json(run / "config.json", {**json.loads((run / "config.json").read_text()), "threads": 1})
    write_json(run / "metrics.json", [{**row, "seconds": s} for row, s in
                                      zip(json.loads((run / "metrics.json").read_text()), (10.5, 1200.0))])
    assert study.main(["samples", "--compare", tmp_path]) == 0
    table = (tmp_path / "samples.md").read_text()
    assert "| Some CPU (family 1), fp32 | 5 | 2 (2 - 2) |\n| Some CPU (family 1), fp32, 1 thread | 1 | 1,210 (1,210 - 1,210) |" in table


def test_an_interval_that_excludes_zero_is_marked_and_more_seeds_show_the_first_five_and_all(tmp_path):
    seeds = range(42, 52)
    write_runs(tmp_path / "blog-head", {1: [0.50] * 10, 8: [0.51, 0.52] * 5}, seeds)
    assert study.main(["samples", "--compare", tmp_path]) == 0
    table = (tmp_path / "samples.md").read_text()
    assert "| M=8 − M=1 | 10 | +0.0150 [+0.0112, +0.0188] * | ±0.0038 | 10 / 0 |" in table
    assert "| M=8 − M=1 (first 5 seeds) | 5 | +0.0140 [+0.0072, +0.0208] * |" in table and "seeds 42-51" in table
    assert study.main(["convergence", "--compare", tmp_path]) == 0  # ten seeds are its own: no "first" row
    table = (tmp_path / "convergence.md").read_text()
    assert "| M=8 − M=1 | 10 | +0.0150 [+0.0112, +0.0188] * |" in table and "(first" not in table
    assert "interval over the study's own 10 seeds excludes 0 (marked *) gets 5 more seeds" in table
    assert "| blog-head | 8 | 10 | 2.0 ± 0.0 | 0 |" in table  # epochs to target 0.49: the second epoch
    assert "| epoch | M=8 − M=1: Δ valid acc (10 seeds) | M=8 − M=1: Δ train loss (10 seeds) |" in table  # the figure's numbers
    assert "| 1 | +0.0000 [+0.0000, +0.0000] | +0.0000 [+0.0000, +0.0000] |\n| 2 | +0.0150 [+0.0112, +0.0188] * |" in table
    assert (tmp_path / "convergence.png").stat().st_size > 0
    write_runs(tmp_path / "six" / "blog-head", {1: [0.50] * 6, 8: [0.51, 0.52] * 3}, range(42, 48))  # the rule's first seed in
    assert study.main(["samples", "--compare", tmp_path / "six"]) == 0
    assert "| M=8 − M=1 (the seed after them) | 1 | +0.0200 (one seed: no interval) |" in (tmp_path / "six" / "samples.md").read_text()


def test_convergence_gives_epochs_to_target_paired_with_a_hand_computed_interval_and_counts_runs_never_reaching_it(tmp_path):
    curves = {1: ([0.3, 0.5, 0.59, 0.6], [0.3, 0.4, 0.5, 0.6], [0.3, 0.59, 0.6, 0.6]),  # target 0.59: epochs 3, 4, 2
              8: ([0.59, 0.6, 0.6, 0.6], [0.3, 0.4, 0.59, 0.6], [0.3, 0.4, 0.5, 0.58])}  # 1, 3, never
    write_runs(tmp_path / "blog-head", {m: [0.5, 0.5, 0.5] for m in curves})
    for m, per_seed in curves.items():
        for seed, accs in zip((42, 43, 44), per_seed):
            set_curves(tmp_path / "blog-head", m, seed, valid_acc=accs)
    assert study.main(["convergence", "--compare", tmp_path]) == 0
    table = (tmp_path / "convergence.md").read_text()
    assert "reaches 0.5900 (one point below the M=1 runs' mean final valid accuracy over seeds 42, 43, 44)" in table
    assert "| blog-head | 1 | 3 | 3.0 ± 1.0 | 0 |" in table and "| blog-head | 8 | 3 | 2.0 ± 1.4 | 1 |" in table
    half = T_975_1DF * np.std([-2, -1], ddof=1) / np.sqrt(2)  # seed 44 never reached it with M=8: one pair fewer
    assert f"| M=8 − M=1 | 2 | -1.50 [{-1.5 - half:+.2f}, {-1.5 + half:+.2f}] | ±{half:.2f} | 2 / 0 |" in table
    write_runs(tmp_path / "blog-head", {0: [0.7], 1: [0.9]}, seeds=(52,))  # the rule's seed: M=1's target stays
    for m in (0, 1):
        set_curves(tmp_path / "blog-head", m, 52, valid_acc=[0.3, 0.4, 0.5, 0.9])  # over all four seeds: 0.6650
    assert study.main(["convergence", "--compare", tmp_path]) == 0
    table = (tmp_path / "convergence.md").read_text()
    assert "reaches 0.5900 (one point below" in table and "| blog-head | 1 | 4 | 3.2 ± 1.0 | 0 |" in table
    write_runs(tmp_path / "other-seeds" / "blog-head", {1: [0.5, 0.7], 8: [0.6, 0.6]}, seeds=(7, 8))  # none of its own
    assert study.main(["convergence", "--compare", tmp_path / "other-seeds"]) == 0
    assert "reaches 0.5900 (one point below the M=1 runs' mean final valid accuracy over all seeds)" in \
        (tmp_path / "other-seeds" / "convergence.md").read_text()


def write_rule_runs(folder):
    """samples runs: M=16 − M=1 and M=32 − M=1 exclude zero over seeds 42-46 (M=16 not over all ten), M=2 − M=1
    does not, and M=4 has four seeds."""
    write_runs(folder, {1: [0.50] * 10, 16: [0.52, 0.53, 0.52, 0.53, 0.52] + [0.45] * 5}, range(42, 52))
    write_runs(folder, {2: [0.52, 0.48, 0.51, 0.49, 0.50], 4: [0.6] * 4, 32: [0.51, 0.52] * 2 + [0.51]}, range(42, 47))


def seeds_and_samples(commands):
    return [(c[c.index("--seed") + 1], c[c.index("--dropout_num") + 1]) for c in commands]


def test_more_seeds_goes_to_the_two_points_of_each_comparison_that_excludes_zero_over_the_first_five(tmp_path, capsys):
    write_rule_runs(tmp_path / "blog-head")
    args = study.parse_args(["samples", "--more_seeds", "--output_dir", str(tmp_path)])
    assert args.seed == [47, 48, 49, 50, 51]
    points = study.points_by_the_rule(args)
    assert points == [study.Point("blog-head", m, 0.5) for m in (16, 1, 32)]  # M=1 once, for both
    out = capsys.readouterr().out
    assert "M=16 − M=1: +0.0240 [" in out and "over seeds 42-46 excludes zero: seeds 47 48 49 50 51 for both" in out
    assert "M=2 − M=1: +0.0000 [" in out and "includes zero: no more seeds" in out
    assert "M=4 − M=1: not all of seeds 42-46 are paired yet: undecided" in out
    assert seeds_and_samples(study.run_commands(args, points).values()) == [(str(s), m) for s in range(47, 52) for m in ("16", "1", "32")]


def test_more_seeds_decides_over_the_studys_own_seeds_ten_for_convergence(tmp_path, capsys):
    write_runs(tmp_path / "blog-head", {1: [0.50] * 10, 8: [0.52] * 5 + [0.48] * 5, 0: [0.5] * 9}, range(42, 52))
    args = study.parse_args(["convergence", "--more_seeds", "--output_dir", str(tmp_path)])
    assert args.seed == [52, 53, 54, 55, 56] and study.points_by_the_rule(args) == []  # over 42-46 alone, M=8 would
    out = capsys.readouterr().out
    assert "M=8 − M=1: +0.0000 [" in out and "over seeds 42-51 includes zero" in out
    assert "M=0 − M=1: not all of seeds 42-51 are paired yet: undecided" in out
    assert "the rule adds no seeds now: no decided comparison excludes zero, and 1 wait for the study's own seeds" in out
    write_runs(tmp_path / "blog-head", {0: [0.5]}, [51])  # now decided: 0.5 against 0.5 at every seed
    assert study.points_by_the_rule(args) == []
    assert capsys.readouterr().out.endswith("study.py: no comparison's interval excludes zero: the rule adds no seeds\n")


def test_more_seeds_trains_only_the_rules_runs_or_nothing_and_then_draws(tmp_path, capsys, monkeypatch):
    write_rule_runs(tmp_path / "blog-head")
    trained = []
    monkeypatch.setattr(study.run, "main", lambda argv, resume_command: trained.append(argv) or 0)
    monkeypatch.setattr(datasource, "download", lambda data_dir: None)  # nothing trains, so no data is needed
    assert study.main(["samples", "--more_seeds", "--output_dir", tmp_path, "--seed", "60"]) == 0
    assert seeds_and_samples(trained) == [("60", "16"), ("60", "1"), ("60", "32")]
    table = (tmp_path / "samples.md").read_text()
    assert "| M=16 − M=1 | 10 | -0.0130 [" in table and "| M=16 − M=1 (first 5 seeds) | 5 | +0.0240 [" in table
    assert "| M=16 − M=1 (the 5 seeds after them) | 5 | -0.0500 [-0.0500, -0.0500] * |" in table
    assert "| M=2 − M=1 (" not in table  # five seeds: one row
    trained.clear()
    for folder in (tmp_path / "blog-head").glob("m16_p0.5_s4[2-6]*"):
        folder.rename(tmp_path / folder.name)  # M=16 keeps only seeds 47-51: undecided
    for folder in (tmp_path / "blog-head").glob("m32_p0.5_s*"):
        folder.rename(tmp_path / folder.name)
    assert study.main(["samples", "--more_seeds", "--output_dir", tmp_path]) == 0 and not trained
    out = capsys.readouterr().out
    assert "M=16 − M=1: not all of seeds 42-46 are paired yet: undecided" in out
    assert ("the rule adds no seeds now: no decided comparison excludes zero, and 5 wait for the study's own seeds "
            "(python study.py samples)") in out


@pytest.mark.parametrize("argv, message", [
    (["--seed", "46", "47"], "--more_seeds adds seeds after the study's own (42 to 46); leave out --seed, or give others"),
    ([], "holds no finished runs of the samples study, and --more_seeds decides from them: run the study first"),
])
def test_more_seeds_refuses_the_studys_own_seeds_or_a_folder_without_runs_in_one_line(tmp_path, capsys, argv, message):
    assert study.main(["samples", "--more_seeds", "--output_dir", tmp_path, *argv]) == 2
    out, err = capsys.readouterr()
    assert message in err and err.count("\n") == 1 and not out


def test_samples_and_rate_draw_error_against_m_and_p_with_paired_differences(tmp_path):
    write_runs(tmp_path / "blog-head", {(m, 0.5): [0.5 + 0.001 * m, 0.51 + 0.001 * m] for m in (1, 2, 4, 8, 16, 32, 64)}, (42, 43))
    write_runs(tmp_path / "blog-head", {(m, p): [0.4 + p / 10 + m / 1000, 0.41 + p / 10]
                                        for m in (1, 8) for p in (0.1, 0.3, 0.7, 0.9)}, (42, 43))
    samples = comparisons(tmp_path, "samples")
    assert samples["M=64 − M=1"]["mean"] == pytest.approx(0.063) and samples["M=2 − M=1"]["n"] == 2
    rate = comparisons(tmp_path, "rate")
    assert set(rate) == {f"p={p}: M=8 − M=1" for p in (0.1, 0.3, 0.5, 0.7, 0.9)}
    assert rate["p=0.9: M=8 − M=1"]["mean"] == pytest.approx(0.0035) and rate["p=0.9: M=8 − M=1"]["interval"] is not None
    for name in ("samples", "rate"):
        assert study.main([name, "--compare", tmp_path]) == 0
        assert (tmp_path / f"{name}.png").stat().st_size > 0
    assert "| blog-head | 64 | 0.5 | 2 | 0.5690 ± 0.0071 | 0.4310 ± 0.0071 |" in (tmp_path / "samples.md").read_text()


def test_the_samples_figure_labels_each_point_with_its_seeds_when_the_rule_gave_some_more(tmp_path, monkeypatch):
    write_runs(tmp_path / "blog-head", {1: [0.50] * 10, 16: [0.52, 0.53] * 5}, range(42, 52))
    write_runs(tmp_path / "blog-head", {2: [0.51, 0.50, 0.52, 0.49, 0.50]}, range(42, 47))
    drawn = {}
    monkeypatch.setattr(studyfigures, "save_figure", lambda fig, path, title: drawn.update(
        texts=[t.get_text() for ax in fig.axes for t in ax.texts], legend=[t.get_text() for t in fig.axes[2].get_legend().get_texts()],
        title=title))
    assert study.main(["samples", "--compare", tmp_path]) == 0
    assert sorted(drawn["texts"]) == sorted(["n=10", "n=5", "n=10"] + ["n=5", "n=10"])  # points M=1 2 16; differences
    assert drawn["legend"] == ["dropout (n=10)", "2 samples (n=5)", "16 samples (n=10)"]
    assert "n: seeds of a point, pairs of a difference" in drawn["title"]


def test_the_samples_table_gives_train_accuracy_and_loss_before_the_lr_drop_at_the_end_and_since_below_m1(tmp_path):
    losses = {1: {42: [1.0, 0.5, 0.4], 43: [1.0, 0.7, 0.4]},  # mean 1.0 0.6 0.4
              2: {42: [1.1, 0.4, 0.3], 43: [1.1, 0.2, 0.3]},  # above, below, below: from epoch 2
              4: {42: [0.9, 0.5, 0.3], 43: [0.9, 0.5, 0.3]},  # below throughout: 1
              8: {42: [0.9, 0.8, 0.3], 43: [0.9, 0.8, 0.3]},  # below, above, below: from 3, not from its first
              16: {42: [0.9, 0.5, 0.5], 43: [0.9, 0.5, 0.5]},  # ends above: -
              32: {43: [0.9, 0.65, 0.35]}}  # below seed 43's M=1 throughout (not below the two seeds' 0.6)
    for m, runs in losses.items():
        write_runs(tmp_path / "blog-head", {m: [0.5] * len(runs)}, list(runs))
        for seed, curve in runs.items():
            set_curves(tmp_path / "blog-head", m, seed, train_loss=curve, valid_loss=[x + m for x in curve],
                       train_acc=[1 - x for x in curve])
    assert study.main(["samples", "--compare", tmp_path]) == 0
    table = (tmp_path / "samples.md").read_text()
    assert "| M | seeds | train loss, epoch 1 | train loss, final | below M=1 from epoch | final valid loss |" in table
    assert "| blog-head | 1 | 0.5 | 2 | 0.5000 ± 0.0000 | 0.5000 ± 0.0000 | 0.6000 ± 0.0000 |" in table  # train acc
    assert "| 1 | 2 | 1.0000 ± 0.0000 | 0.4000 ± 0.0000 | - | 1.4000 ± 0.0000 |" in table
    assert "| 2 | 2 | 1.1000 ± 0.0000 | 0.3000 ± 0.0000 | 2 | 2.3000 ± 0.0000 |" in table
    assert "| 4 | 2 | 0.9000 ± 0.0000 | 0.3000 ± 0.0000 | 1 | 4.3000 ± 0.0000 |" in table
    assert "| 8 | 2 | 0.9000 ± 0.0000 | 0.3000 ± 0.0000 | 3 | 8.3000 ± 0.0000 |" in table
    assert "| 16 | 2 | 0.9000 ± 0.0000 | 0.5000 ± 0.0000 | - | 16.5000 ± 0.0000 |" in table
    assert "| 32 | 1 | 0.9000 | 0.3500 | 1 | 32.3500 |" in table
    for m, runs in losses.items():  # a protocol whose lr never drops within the runs (smoke's): no such column
        for seed in runs:
            config = tmp_path / "blog-head" / f"m{m}_p0.5_s{seed}-fp32" / "config.json"
            write_json(config, {**json.loads(config.read_text()), "lr_milestone": 10})
    assert study.main(["samples", "--compare", tmp_path]) == 0
    table = (tmp_path / "samples.md").read_text()
    assert "| train loss before the lr drop |" in table and "| 8 | 2 | - | 0.3000 ± 0.0000 | 3 |" in table


def test_the_workers_say_how_long_a_run_took_and_how_long_the_runs_left_will_take():
    assert workers.pace([600, 1200], 3, 2) == "; 15.0 min a run, 3 left: about 30 min more"  # two rounds of two
    assert workers.pace([900], 30, 2) == "; 15.0 min a run, 30 left: about 3.8 h more"
    assert workers.pace([], 5, 2) == "" and workers.pace([600], 0, 2) == ""


def test_a_run_resumed_on_another_kind_of_device_pairs_only_with_one_that_moved_alike():
    gpu = {"device": "cuda:0", "precision": "fp32"}
    moved = {**gpu, "earlier": [{"until_epoch": 3, "device": "cpu"}, {"until_epoch": 5, "device": "cuda:1"}]}
    back = {"device": "cpu", "precision": "fp32", "earlier": [{"until_epoch": 3, "device": "cuda:0"}]}
    assert provenance.place(gpu) == ("cuda", "fp32") and provenance.place(moved) == provenance.place(back) == ("cpu+cuda", "fp32")


def test_the_tables_name_each_stretch_of_epochs_a_resumed_run_ran_elsewhere():
    a, b = "CPU A (family 1 model 1)", "CPU B (family 2 model 2)"
    config = {"device": "cpu", "hardware": a, "precision": "bf16", "threads": 1, "earlier": [
        {"until_epoch": 2, "device": "cpu", "hardware": a},  # then the commit changed: still A
        {"until_epoch": 4, "device": "cpu", "hardware": b}, {"until_epoch": 6, "device": "cpu", "hardware": b},
        {"until_epoch": 7, "device": "cpu"}]}  # a run that did not record its machine yet: none to name
    assert provenance.elsewhere(config) == [(3, 6, b)]  # A, B, B, back on A: one stretch on B, merged
    assert provenance.where({"config": config}) == f"{a}, bf16, 1 thread; epochs 3-6 on {b}, bf16"


def test_a_pair_across_precisions_or_two_runs_of_one_seed_are_refused(tmp_path, capsys):
    write_runs(tmp_path / "blog-head", {1: [0.50, 0.52, 0.54]})
    write_runs(tmp_path / "blog-head", {8: [0.51, 0.55, 0.53]}, precision="bf16")
    assert study.main(["convergence", "--compare", tmp_path]) == 2
    err = capsys.readouterr().err
    assert "a pair must share its kind of device and precision" in err and err.count("\n") == 1
    write_runs(tmp_path / "blog-head", {8: [0.40]}, precision="fp32")  # a second run of m8, seed 42
    assert study.main(["convergence", "--compare", tmp_path]) == 2
    err = capsys.readouterr().err
    assert "m8_p0.5_s42-bf16 and " in err and "two runs of blog-head, dropout_num 8, p 0.5, seed 42" in err
    assert not (tmp_path / "convergence.md").exists()


SMALL_STUDY = studies.Study("a small study", 1, [("avg2", [1, 8], [0.5]), ("avg2-flip", [8], [0.5])],
                          study.STUDIES["where"].pairs, "gain")


def test_a_study_downloads_the_official_release_once_before_its_workers_and_offline_stops_in_one_line(
        small_cifar, tmp_path, capsys, monkeypatch, no_network):
    steps = []
    monkeypatch.setattr(study, "train_in_workers", lambda *a: steps.append("workers") or 0)
    splits = (np.zeros((1, 32, 32, 3), np.uint8), np.zeros(1, np.int64))
    with monkeypatch.context() as downloads:
        downloads.setattr(datasource, "_official_splits", lambda root, dataset, download: steps.append(root) or (splits, splits, []))
        for data_dir in (tmp_path / "data", small_cifar):  # torchvision's root, then an image-folder copy: none to fetch
            argv = [str(a) for a in ["samples", "--protocol", "smoke", "--data_dir", data_dir, "--output_dir",
                                     tmp_path / "out", "--seed", "1", "--workers", "2"]]
            assert study.train_all(study.parse_args(argv), argv) == 0
    assert steps == [tmp_path / "data", "workers", "workers"]
    capsys.readouterr()  # now torchvision itself, offline (no_network)
    assert study.main(["samples", "--protocol", "smoke", "--data_dir", tmp_path / "none", "--output_dir",
                       tmp_path / "out", "--workers", "2"]) == 2
    out, err = capsys.readouterr()
    assert "CIFAR-10 is not in" in err and "could not be downloaded" in err and err.count("\n") == 1
    assert "runs are finished" not in out and not (tmp_path / "none").exists()  # before the plan, and nothing made


def test_ctrl_c_outside_a_run_says_how_to_go_on_not_how_to_draw_again(tmp_path, capsys, monkeypatch):
    def interrupted(args, argv):
        raise KeyboardInterrupt
    monkeypatch.setattr(study, "train_all", interrupted)  # as while planning or fetching the data
    assert study.main(["samples", "--output_dir", tmp_path, "--seed", 3]) == 130
    err = capsys.readouterr().err
    assert err == (f"study.py: stopped by SIGINT outside a run (planning, fetching data or between runs); the finished "
                   f"runs are kept; go on with: python study.py samples --output_dir {tmp_path} --seed 3\n")


@pytest.mark.slow
def test_a_study_runs_each_setting_into_its_folder_then_draws_and_a_rerun_trains_nothing(small_cifar, tmp_path, capsys,
                                                                                          monkeypatch):
    monkeypatch.setitem(study.STUDIES, "where", SMALL_STUDY)
    argv = ["where", "--data_dir", small_cifar, "--output_dir", tmp_path, "--protocol", "smoke", "--seed", "1"]
    assert study.main(argv) == 0
    assert len(run_dirs(tmp_path / "avg2", 1)) == 1 and not run_dirs(tmp_path / "avg2-flip", 1)  # avg2's is the reference
    assert "_avg2_flip_s1-" in run_dirs(tmp_path / "avg2-flip", 8)[0].name
    table = (tmp_path / "where.md").read_text()
    assert (tmp_path / "where.png").stat().st_size > 0 and "smoke protocol: 200/100 images, 2 epochs" in table
    (row,) = [line for line in table.splitlines() if line.startswith("| --pool avg2 --diversity flip: M=8 − avg2's M=1 |")]
    assert row.split(" | ")[1:3] == ["1", next(c for c in row.split(" | ") if "(one seed: no interval)" in c)]
    capsys.readouterr()
    assert study.main(argv) == 0  # a rerun trains nothing
    assert "3 of 3 runs are finished; 0 to train" in capsys.readouterr().out


def smoke_commands(data_dir, output_dir, protocol="smoke"):
    """SMALL_STUDY's run.py commands for seeds 1 and 2: avg2 M=1 and 8, avg2-flip M=8 (compared with both)."""
    args = study.parse_args(["where", "--data_dir", str(data_dir), "--output_dir", str(output_dir), "--protocol",
                             protocol, "--seed", "1", "2"])
    return study.run_commands(args, study.study_points(SMALL_STUDY))


def hold(command, precision, device="cpu", epochs=2):
    """The run of this command finished to `epochs` in `precision` on `device`, as its config.json and metrics.json
    say it; its folder."""
    (args,) = run.grid(run.parse_args(command + ["--precision", precision])[0])
    config, run_dir = train.identity(args, torch.device("cpu"))
    run_dir.mkdir(parents=True)
    write_json(run_dir / "config.json", {**config, "device": device, "epochs": epochs})
    write_json(run_dir / "metrics.json", fake_run(args.dropout_num, args.seed, [0.5] * epochs)["history"])
    return run_dir


def on_a_cpu(monkeypatch, native_bf16):
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: native_bf16)


def test_a_rerun_on_another_machine_trains_only_the_missing_runs_each_in_its_pairs_precision(small_cifar, tmp_path,
                                                                                             monkeypatch):
    commands = smoke_commands(small_cifar, tmp_path)
    names = list(commands)
    numbered = lambda *picked: [(names.index(n) + 1, n, commands[n]) for n in picked]
    on_a_cpu(monkeypatch, native_bf16=False)
    assert study.to_train(commands, SMALL_STUDY.pairs) == (numbered(*names), 0)
    flip_1 = [hold(commands[n], "fp32") for n in names[:3]][-1]  # seed 1 on an fp32 machine
    on_a_cpu(monkeypatch, native_bf16=True)  # auto is bf16 here: seed 1 is done; seed 2 has no runs, so bf16
    assert study.to_train(commands, SMALL_STUDY.pairs) == (numbered(*names[3:]), 0)
    shutil.rmtree(flip_1)
    hold(commands[names[2]], "fp32", epochs=1)  # its pairs ran in fp32, so it does, and one epoch is not its two
    assert study.to_train(commands, SMALL_STUDY.pairs)[0][0] == (3, names[2], commands[names[2]] + ["--precision", "fp32"])


@pytest.mark.parametrize("places, why", [
    ((("cpu", "bf16"), ("cpu", "bf16")), "its pairs of seed 2 ran in bf16, which this cpu lacks natively"),
    ((("cuda:0", "fp32"), ("cuda:0", "fp32")), "its pairs of seed 2 ran on a cuda, and --device auto picks cpu here"),
    ((("cpu", "bf16"), ("cpu", "fp32")), "its pairs of seed 2 ran on cpu, bf16 and cpu, fp32"),
])
def test_a_run_whose_pairs_this_machine_cannot_match_is_named_and_left(places, why, small_cifar, tmp_path, monkeypatch,
                                                                       capsys):
    commands = smoke_commands(small_cifar, tmp_path)
    on_a_cpu(monkeypatch, native_bf16=False)
    for name in list(commands)[:3]:
        hold(commands[name], "fp32")  # seed 1 complete
    for name, (device, precision) in zip(list(commands)[3:5], places):
        hold(commands[name], precision, device)  # seed 2's avg2 runs: flip's pairs
    capsys.readouterr()
    assert study.to_train(commands, SMALL_STUDY.pairs) == ([], 1)
    if "natively" in why:  # only the speed stands in the way: the line says how to train it here all the same
        why += ("; to train it here all the same, several times slower: python run.py "
                f"{shlex.join(commands['avg2-flip-m8-p0.5-s2'] + ['--precision', 'bf16'])}")
    assert capsys.readouterr().out == f"study.py: avg2-flip-m8-p0.5-s2 is left to another machine: {why}\n"


def test_a_protocol_that_fixes_the_precision_counts_only_its_own(small_cifar, tmp_path, monkeypatch):
    commands = smoke_commands(small_cifar, tmp_path, protocol="reduced")  # fp32
    on_a_cpu(monkeypatch, native_bf16=True)
    hold(commands["avg2-m1-p0.5-s1"], "bf16", epochs=10)
    left, _ = study.to_train(commands, SMALL_STUDY.pairs)
    assert [name for _, name, _ in left] == list(commands) and all("--precision" not in c[-2:] for _, _, c in left)


def test_the_protocols_say_their_sizes_and_the_defaults_follow_the_study():
    full = run.build_parser().parse_args(study.PROTOCOLS["full"][0])
    assert (full.epochs, full.lr_milestone, full.train_size, full.test_size, full.precision) == (20, 10, None, None, "auto")
    converged = run.build_parser().parse_args(study.PROTOCOLS["converged"][0])
    assert (converged.train_size, converged.test_size, converged.precision) == (10000, None, "auto")  # all test images
    args = study.parse_args(["samples", "--protocol", "full"])
    assert args.seed == [42, 43, 44, 45, 46] and args.output_dir == "outputs/study-full"
    assert study.parse_args(["convergence"]).seed == list(range(42, 52))
    commands = study.run_commands(study.parse_args(["rate", "--seed", "7"]), study.study_points(study.STUDIES["rate"]))
    assert list(commands)[:2] == ["blog-head-m1-p0.1-s7", "blog-head-m8-p0.1-s7"] and len(commands) == 10
    assert commands["blog-head-m1-p0.1-s7"][-6:] == ["--seed", "7", "--dropout_num", "1", "--dropout_p", "0.1"]


@pytest.mark.parametrize("argv, message", [
    (["samples", "--compare", "x", "--seed", "1"], "takes the folder of a study and no other flag but --output_dir"),
    (["samples", "--compare", ""], "takes the folder of a study"),
    (["samples", "--output_dir", ""], "--output_dir needs a path"),
    (["samples", "--workers", "0"], "--workers must be 1 or more"),
    (["nosuch"], "invalid choice"),
    (["samples", "--seed", "-1", "--workers", "2", "--protocol", "smoke"], "--seed must be in [0, 2**32), got -1"),
    (["samples", "--seed", "-1", "--protocol", "smoke"], "--seed must be in [0, 2**32), got -1"),
    (["samples", "--compare", "/nonexistent/empty"], "holds no finished pair of runs for the samples study"),
])
def test_bad_study_commands_are_one_line_and_exit_2(argv, message, capsys):
    assert study.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_failed_worker_is_one_line_with_the_end_of_its_log(tmp_path, capsys):
    (tmp_path / "cut.tar.gz").write_bytes(b"\x1f\x8b not the rest of an archive")  # found, so a worker starts; it fails
    argv = ["samples", "--protocol", "smoke", "--data_dir", tmp_path / "cut.tar.gz", "--output_dir", tmp_path / "out",
            "--seed", "1", "--workers", "2"]
    assert study.main(argv) == 2
    err = capsys.readouterr().err
    logs = tmp_path / "out" / "logs"
    assert "2 run(s) failed, see " in err and all(str(logs / f"blog-head-m{m}-p0.5-s1.log") in err for m in (1, 2))
    assert "it may be truncated or corrupt: fetch it again" in err and err.count("\n") == 1


def test_an_unwritable_figure_or_a_truncated_run_file_is_one_line_and_exit_2(tmp_path, capsys):
    write_runs(tmp_path / "blog-head", {1: [0.50, 0.52, 0.54], 8: [0.51, 0.55, 0.53]})
    (tmp_path / "convergence.png").mkdir()  # a folder where the figure goes: writing it fails, as root too
    assert study.main(["convergence", "--compare", tmp_path]) == 2
    err = capsys.readouterr().err
    assert err.startswith("study.py: error: cannot write") and err.count("\n") == 1
    metrics = next((tmp_path / "blog-head").glob("m8_p0.5_s43*/metrics.json"))
    metrics.write_text(metrics.read_text()[:40])  # cut by hand, or by a copy that failed
    assert study.main(["convergence", "--compare", tmp_path]) == 2
    err = capsys.readouterr().err
    assert "may be truncated" in err and err.count("\n") == 1


def test_a_pair_whose_runs_ran_on_two_machines_of_one_kind_names_both(tmp_path):
    write_runs(tmp_path / "blog-head", {1: [0.50, 0.52, 0.54], 8: [0.51, 0.55, 0.53]})
    for config in (tmp_path / "blog-head").glob("m8_p0.5_s42-*/config.json"):  # seed 42's M=8 ran elsewhere
        config.write_text(config.read_text().replace("Some CPU (family 1)", "Other CPU (family 2)"))
    assert study.main(["convergence", "--compare", tmp_path]) == 0
    row = next(line for line in (tmp_path / "convergence.md").read_text().splitlines() if line.startswith("| M=8 − M=1 |"))
    assert row.endswith("| Other CPU (family 2), fp32 / Some CPU (family 1), fp32 ×1; Some CPU (family 1), fp32 ×2 |")


def test_a_cpu_pair_names_its_thread_counts_which_change_a_runs_bits(tmp_path):
    write_runs(tmp_path / "blog-head", {1: [0.50, 0.52, 0.54], 8: [0.51, 0.55, 0.53]})
    for config in (tmp_path / "blog-head").glob("*/config.json"):  # seed 42's M=8 ran with one thread, the rest two
        threads = 1 if config.parent.name.startswith("m8_p0.5_s42") else 2
        config.write_text(config.read_text().replace('"device": "cpu"', f'"device": "cpu", "threads": {threads}'))
    assert study.main(["convergence", "--compare", tmp_path]) == 0
    row = next(line for line in (tmp_path / "convergence.md").read_text().splitlines() if line.startswith("| M=8 − M=1 |"))
    assert row.endswith("| Some CPU (family 1), fp32, 1 / 2 threads ×1; Some CPU (family 1), fp32, 2 threads ×2 |")


def test_a_gpu_run_is_named_without_threads_which_do_not_change_its_bits():
    config = {"device": "cuda:0", "hardware": "NVIDIA H200", "precision": "bf16", "threads": 8}
    assert provenance.where({"config": config}) == "NVIDIA H200, bf16"
    assert provenance.where({"config": {**config, "device": "cpu", "hardware": "Some CPU"}}) == "Some CPU, bf16, 8 threads"


COMMITTED_STUDIES = sorted((table.parent, table.stem) for table in (ROOT / "docs").glob("study-*/*.md")
                           if table.stem in study.STUDIES)


@pytest.mark.parametrize("folder, name", COMMITTED_STUDIES, ids=[f"{f.name}/{n}" for f, n in COMMITTED_STUDIES])
def test_each_committed_study_table_and_figure_is_what_its_committed_runs_draw_byte_for_byte(folder, name, tmp_path):
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("*.md", "*.png"))  # the runs alone
    assert study.main([name, "--compare", copy]) == 0
    for drawn in (f"{name}.md", f"{name}.png"):
        assert (copy / drawn).read_bytes() == (folder / drawn).read_bytes(), f"redraw {folder / drawn}"


def test_the_committed_studies_are_found():
    assert {n for _, n in COMMITTED_STUDIES} >= {"samples", "rate", "where"}
