"""Comparisons: paired statistics over seeds, --compare from committed files, and what pairing rests on."""
import shutil

import numpy as np
import pytest
import torch

import datasource
import train
import trainingmonitor
from conftest import ROOT, cli, fake_run, run_dirs, write_json
from studies import stats, tables

T_975_2DF = 4.302652729749464  # Student t, 97.5th percentile, 2 degrees of freedom (from a printed table)


def test_paired_interval_matches_a_hand_computation():
    setting, reference = [0.62, 0.65, 0.60], [0.61, 0.62, 0.61]  # differences 0.01, 0.03, -0.01
    d = stats.paired_difference(setting, reference)
    half = T_975_2DF * 0.02 / np.sqrt(3)  # sd of (0.01, 0.03, -0.01) is 0.02
    assert d["n"] == 3 and d["mean"] == pytest.approx(0.01)
    assert d["interval"] == pytest.approx((0.01 - half, 0.01 + half))
    assert (d["higher"], d["lower"]) == (2, 1) and d["sd"] == pytest.approx(0.02)


def test_the_pooled_spread_weighs_each_comparison_by_its_degrees_of_freedom_and_gives_the_seeds_for_half_a_point():
    three, five, one = ({"n": 3, "sd": 0.01}, {"n": 5, "sd": 0.02}, {"n": 1, "sd": None})
    sd, df = stats.pooled_sd([three, five, one])  # (2 * 0.01² + 4 * 0.02²) / 6 = 0.0003
    assert df == 6 and sd == pytest.approx(np.sqrt(0.0003))
    assert stats.pooled_sd([one]) == (None, 0)
    # t(16) * 0.01 / sqrt(17) = 0.00514 > 0.005 >= t(17) * 0.01 / sqrt(18) = 0.00497
    assert stats.seeds_for_half_width(0.01, 0.005) == 18 and stats.seeds_for_half_width(0.0005, 0.005) == 2  # t(1) = 12.7


def test_one_pair_has_no_interval_and_equal_differences_have_no_spread():
    assert stats.paired_difference([0.7], [0.6])["interval"] is None
    assert stats.paired_difference([0.7, 0.8], [0.6, 0.7])["interval"] == pytest.approx((0.1, 0.1))


def paired_cells(groups):
    table = tables.paired_markdown(groups).split("\n\n")[1].splitlines()[2:]
    return {(c[0], c[1]): c for c in ([x.strip() for x in line.split("|")[1:-1]] for line in table)}


def test_paired_table_pairs_runs_by_seed_not_by_position():
    runs = [fake_run(8, 1, [0.5, 0.70]), fake_run(8, 2, [0.5, 0.80]), fake_run(8, 3, [0.9, 0.60]),
            fake_run(1, 2, [0.5, 0.75]), fake_run(1, 3, [0.5, 0.50])]  # seed 1 has no dropout_num=1 partner
    cells = paired_cells(trainingmonitor.group_runs(runs))
    row = cells[("dropout_num=8", "dropout_num=1")]
    half = 12.706204736174707 * np.std([0.05, 0.10], ddof=1) / np.sqrt(2)  # t(0.975, 1 df)
    assert row[2] == "2" and row[3] == f"{0.075:+.4f} [{0.075 - half:+.4f}, {0.075 + half:+.4f}]"
    assert row[4] == "2 / 0"
    assert row[5].startswith(f"{(0.05 + 0.4) / 2:+.4f}") and row[6] == "2 / 0"  # best: 0.8 - 0.75, 0.9 - 0.5
    assert ("dropout_num=1", "dropout_num=1") not in cells


def test_paired_table_with_one_seed_gives_no_interval():
    runs = [fake_run(0, 1, [0.6]), fake_run(1, 1, [0.5]), fake_run(8, 1, [0.55])]
    cells = paired_cells(trainingmonitor.group_runs(runs))
    assert set(cells) == {("dropout_num=0", "dropout_num=1"), ("dropout_num=8", "dropout_num=1"),
                          ("dropout_num=1", "dropout_num=0"), ("dropout_num=8", "dropout_num=0")}
    assert cells[("dropout_num=8", "dropout_num=1")][3] == "+0.0500 (one seed: no interval)"
    assert all("[" not in c[3] for c in cells.values())


@pytest.mark.slow
def test_same_seed_means_same_initial_weights_and_data_order_whatever_the_dropout(small_cifar, tmp_path, capsys,
                                                                                   monkeypatch):
    weights, batches, real_model, real_batches = {}, {}, train.make_model, datasource.train_batches

    def recording_model(args, *rest):
        model = real_model(args, *rest)
        weights[args.dropout_num] = {k: v.clone() for k, v in model.state_dict().items()}
        return model

    def recording_batches(*args):
        for xb, yb in real_batches(*args):
            batches.setdefault(len(weights) - 1, []).append((xb.sum().item(), yb.tolist()))
            yield xb, yb

    monkeypatch.setattr(train, "make_model", recording_model)
    monkeypatch.setattr(datasource, "train_batches", recording_batches)
    rc, _, _ = cli(capsys, "--data_dir", small_cifar, "--output_dir", tmp_path, "--epochs", 2, "--batch_size", 100,
                   "--dropout_num", 0, 1, 8, "--seed", 7)
    assert rc == 0 and sorted(weights) == [0, 1, 8] and len(batches[0]) == 6  # 3 steps x 2 epochs
    for m in (1, 8):
        assert weights[m].keys() == weights[0].keys()
        assert all(torch.equal(weights[m][k], weights[0][k]) for k in weights[0])
    assert batches[0] == batches[1] == batches[2]  # dropout masks draw from another generator than shuffling


@pytest.mark.slow
def test_compare_redraws_from_config_and_metrics_alone(small_cifar, tmp_path, capsys):
    rc, _, _ = cli(capsys, "--data_dir", small_cifar, "--output_dir", tmp_path / "runs", "--epochs", 1,
                   "--batch_size", 100, "--dropout_num", 1, 8, "--seed", 1, 2, "--precision", "fp32")
    assert rc == 0
    (original,) = (tmp_path / "runs" / "compare").iterdir()
    committed = tmp_path / "committed"
    for run_dir in run_dirs(tmp_path / "runs", 1) + run_dirs(tmp_path / "runs", 8):
        (committed / run_dir.name).mkdir(parents=True)
        for name in ("config.json", "metrics.json"):
            shutil.copy(run_dir / name, committed / run_dir.name / name)
    rc, out, err = cli(capsys, "--compare", committed)
    assert rc == 0 and err == "" and "comparison of 4 finished run(s)" in out
    redrawn = committed / "compare" / original.name
    assert (redrawn / "summary.md").read_text() == (original / "summary.md").read_text()
    assert {p.name for p in redrawn.glob("*.png")} == {p.name for p in original.glob("*.png")}
    summary = (redrawn / "summary.md").read_text()
    assert summary.startswith("#### miniresnet, cifar10, 300/100 img, 1 ep, lr 0.01, /10 after 10, batch 100, fp32")
    assert "| dropout_num=8 | dropout_num=1 | 2 |" in summary and "| batch_size | 100 |" in summary


@pytest.mark.parametrize("extra, message", [((), "holds no finished runs"), (("--seed", "3"), "takes no other flag but --output_dir; drop --seed")])
def test_compare_refuses_an_empty_folder_and_other_flags(tmp_path, capsys, extra, message):
    rc, out, err = cli(capsys, "--compare", tmp_path, *extra)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "compare").exists()


def test_compare_of_a_truncated_metrics_file_is_one_line(tmp_path, capsys):
    run_dir = tmp_path / "some_run"
    run_dir.mkdir()
    write_json(run_dir / "config.json", {**fake_run(1, 1, [0.5])["config"], "epochs": 2, "model": "miniresnet",
                                         "dataset": "cifar10", "precision": "fp32", "device": "cpu",
                                         "setup": "miniresnet_cifar10-x"})
    (run_dir / "metrics.json").write_text('[{"epoch": 1, "valid_')  # a copy cut short
    rc, out, err = cli(capsys, "--compare", tmp_path)
    assert rc == 2 and "may be truncated" in err and len(err.strip().splitlines()) == 1


def test_a_run_written_by_an_older_version_is_named_as_old_not_damaged(tmp_path, capsys):
    run_dir = tmp_path / "some_run"
    run_dir.mkdir()
    config = {**fake_run(1, 1, [0.5])["config"], "epochs": 1, "model": "miniresnet", "dataset": "cifar10",
              "precision": "fp32", "device": "cpu", "setup": "miniresnet_cifar10-x"}
    del config["msd_reduce"]
    write_json(run_dir / "config.json", config)
    write_json(run_dir / "metrics.json", fake_run(1, 1, [0.5])["history"])
    rc, out, err = cli(capsys, "--compare", tmp_path)
    assert rc == 2 and "has no 'msd_reduce', so an older version of this code wrote it" in err
    assert "restore it" not in err and len(err.strip().splitlines()) == 1


def test_every_figure_title_and_the_summary_say_which_setup_they_compare(tmp_path, monkeypatch):
    runs = [fake_run(m, seed, [0.5, 0.6]) for m in (1, 8) for seed in (1, 2)]
    for r in runs:
        r["config"].update(epochs=2, train_images=300, valid_images=0, test_images=100, data_dir="data")
    setup = {"dataset": "cifar10", "data_source": "archive-x", "model": "miniresnet", "batch_size": 32, "lr": 0.01,
             "lr_milestone": 1, "augment": True, "data_seed": 0, "train_size": None, "test_size": None,
             "valid_split": 0, "precision": "fp32"}
    titles, real_save = {}, trainingmonitor._save
    monkeypatch.setattr(trainingmonitor, "_save", lambda fig, ax, path, title, *rest, **options:
                        titles.update({path.name: title}) or real_save(fig, ax, path, title, *rest, **options))
    trainingmonitor.write_comparison(tmp_path, runs, setup)
    short = "miniresnet, cifar10, 300/100 img, 2 ep, lr 0.01, /10 after 1, batch 32, fp32, augment"
    assert set(titles) == {"train_loss.png", "valid_loss.png", "valid_acc.png", "valid_acc_vs_time.png", "final_acc_vs_m.png",
                           "gain.png"}
    assert all(title.endswith("\n" + short) for title in titles.values())
    summary = (tmp_path / "summary.md").read_text()
    assert summary.startswith(f"#### {short}\n") and "| data_source | archive-x |" in summary and "| augment | True |" in summary


def test_a_runs_figures_are_titled_with_its_setup_and_an_exploding_first_epoch_is_marked_off_the_axis(tmp_path, monkeypatch):
    titles, limits, marks, real_save = {}, {}, {}, trainingmonitor._save

    def record(fig, ax, path, title, *rest, **options):
        titles[path.name], limits[path.name] = title, ax.get_ylim()
        marks[path.name] = [text.get_text() for text in ax.texts]
        real_save(fig, ax, path, title, *rest, **options)
    monkeypatch.setattr(trainingmonitor, "_save", record)
    history = [{"epoch": e, "lr": 0.01, "train_loss": loss, "train_acc": 0.5, "valid_loss": loss, "valid_acc": 0.5,
                "seconds": 1.0} for e, loss in enumerate([33.4, 1.5, 1.2, 1.0], 1)]
    config = {"model": "miniresnet", "dataset": "cifar10", "dropout_num": 8, "dropout_p": 0.5, "seed": 42,
              "train_images": 300, "precision": "fp32"}
    run_dir = tmp_path / "miniresnet_cifar10_m8_p0.5_s42-0123abcd"
    run_dir.mkdir()
    trainingmonitor.plot_run(run_dir, history, config)
    setup = "miniresnet, cifar10, 8 samples (p=0.5), seed 42, 300 img, fp32"
    assert titles["loss.png"] == f"cross-entropy loss, train and valid, by epoch\n{setup}"
    assert titles["acc.png"] == f"accuracy, train and valid, by epoch\n{setup}" and "0123abcd" not in titles["acc.png"]
    assert limits["loss.png"] == (0, pytest.approx(1.5 * 1.15))  # 33.4 would have flattened 1.5, 1.2 and 1.0
    assert marks["loss.png"] == ["train 33.4, off the axis", "valid 33.4, off the axis"]
    trainingmonitor.plot_run(run_dir, history[1:], config)  # no explosion: matplotlib's own limits
    assert limits["loss.png"][1] < 1.6 and limits["loss.png"][0] > 0.9 and marks["loss.png"] == []


def test_the_ablation_legends_are_words(tmp_path, monkeypatch):
    labels, real_save = {}, trainingmonitor._save

    def record(fig, ax, path, *rest, **options):
        labels[path.name] = ax.get_legend_handles_labels()[1]
        real_save(fig, ax, path, *rest, **options)
    monkeypatch.setattr(trainingmonitor, "_save", record)
    runs = [fake_run(m, seed, [0.5, 0.6], p) for m in (0, 1, 8) for seed in (1, 2) for p in (0.3, 0.5)]
    trainingmonitor._plot_final_vs(tmp_path / "m.png", trainingmonitor.group_runs(runs), "dropout_num", "setup")
    trainingmonitor._plot_final_vs(tmp_path / "p.png", trainingmonitor.group_runs(runs), "dropout_p", "setup")
    assert labels == {"m.png": ["p=0.3", "p=0.5"], "p.png": ["no dropout", "dropout", "8 samples"]}


def test_compare_redraws_the_committed_comparison_byte_for_byte(tmp_path, capsys):
    """The comparison of the blog's recipe in docs/, drawn again from its runs' config and metrics alone."""
    copy = shutil.copytree(ROOT / "docs" / "blog-full-h200", tmp_path / "blog-full-h200")
    drawn = sorted(p.relative_to(copy) for p in (copy / "compare").rglob("*") if p.suffix in (".png", ".md"))
    for path in drawn:
        (copy / path).unlink()
    rc, _, err = cli(capsys, "--compare", copy)
    assert rc == 0, err
    assert len(drawn) >= 6
    for path in drawn:
        assert (copy / path).read_bytes() == (ROOT / "docs" / "blog-full-h200" / path).read_bytes(), path


def test_every_redraw_can_go_to_another_folder_and_leaves_the_runs_folder_as_it_was(tmp_path, capsys):
    """run.py --compare, study.py --compare and blog.py draw into --output_dir what they draw in place, byte for byte,
    and write nothing under the runs' folder, not even a lock (it goes beside the comparison they draw)."""
    import blog
    import study
    runs = shutil.copytree(ROOT / "docs" / "blog-full-h200", tmp_path / "runs")
    before = {p: p.read_bytes() for p in runs.rglob("*") if p.is_file()}
    assert cli(capsys, "--compare", runs, "--output_dir", tmp_path / "run")[0] == 0
    assert study.main(["convergence", "--compare", ROOT / "docs" / "study-full", "--output_dir", tmp_path / "study"]) == 0
    assert blog.main([runs, "--output_dir", tmp_path / "blog"]) == 0
    assert {p: p.read_bytes() for p in runs.rglob("*") if p.is_file()} == before
    drawn = [(tmp_path / "run" / p.relative_to(runs), p) for p in (runs / "compare").rglob("*") if p.is_file()
             and p.name != ".lock"]
    drawn += [(tmp_path / "blog" / p.name, p) for p in runs.glob("blog*")]
    drawn += [(tmp_path / "study" / p.name, p) for p in (ROOT / "docs" / "study-full").glob("convergence.*")]
    assert len(drawn) >= 10 and all(new.read_bytes() == old.read_bytes() for new, old in drawn)
    assert (tmp_path / "run" / "compare" / "miniresnet_cifar10-5372cda9" / ".lock").exists()  # where it was drawn
