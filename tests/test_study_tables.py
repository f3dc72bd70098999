"""What a study's tables and figures say: paired differences and their intervals, epochs to target, error
against M, where each pair ran, and the committed studies redrawn byte for byte."""
import json
import shutil

import numpy as np
import pytest

import study
import trainingmonitor
from bookkeeping import provenance
from conftest import ROOT, set_curves, write_json, write_runs
from studies import figures, stats

T_975_2DF = 4.302652729749464  # Student t, 97.5th percentile, 2 degrees of freedom
T_975_1DF = 12.706204736174698  # and with 1


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
    monkeypatch.setattr(figures, "save_figure", lambda fig, path, title: drawn.update(
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


def test_a_run_resumed_on_another_kind_of_device_pairs_only_with_one_that_moved_alike():
    gpu = {"device": "cuda:0", "precision": "fp32"}
    moved = {**gpu, "earlier": [{"until_epoch": 3, "device": "cpu"}, {"until_epoch": 5, "device": "cuda:1"}]}
    back = {"device": "cpu", "precision": "fp32", "earlier": [{"until_epoch": 3, "device": "cuda:0"}]}
    assert provenance.kind_and_precision(gpu) == ("cuda", "fp32")
    assert provenance.kind_and_precision(moved) == provenance.kind_and_precision(back) == ("cpu+cuda", "fp32")


def test_the_tables_name_each_stretch_of_epochs_a_resumed_run_ran_elsewhere():
    a, b = "CPU A (family 1 model 1)", "CPU B (family 2 model 2)"
    config = {"device": "cpu", "hardware": a, "precision": "bf16", "threads": 1, "earlier": [
        {"until_epoch": 2, "device": "cpu", "hardware": a},  # then the commit changed: still A
        {"until_epoch": 4, "device": "cpu", "hardware": b}, {"until_epoch": 6, "device": "cpu", "hardware": b},
        {"until_epoch": 7, "device": "cpu"}]}  # a run that did not record its machine yet: none to name
    assert provenance.elsewhere(config) == [(3, 6, b)]  # A, B, B, back on A: one stretch on B, merged
    assert provenance.where({"config": config}) == f"{a}, bf16, 1 thread; epochs 3-6 on {b}, bf16"


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
