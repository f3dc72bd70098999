"""study.py as a command: the rule's seeds, planning and workers, the pairs' machines and precisions, and its
refusals in one line."""
import json
import shlex
import shutil

import numpy as np
import pytest
import torch

import datasource
import run
import study
import train
from bookkeeping import hardware
from conftest import fake_run, run_dirs, write_json, write_runs
from studies import catalogue, workers


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


def test_the_workers_say_how_long_a_run_took_and_how_long_the_runs_left_will_take():
    assert workers.pace([600, 1200], 3, 2) == "; 15.0 min a run, 3 left: about 30 min more"  # two rounds of two
    assert workers.pace([900], 30, 2) == "; 15.0 min a run, 30 left: about 3.8 h more"
    assert workers.pace([], 5, 2) == "" and workers.pace([600], 0, 2) == ""


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


@pytest.mark.parametrize("flag, step", [("compile", "compiled"), ("cuda_graph", "CUDA graph")])
def test_a_pair_of_two_steps_is_refused(flag, step, tmp_path, capsys):
    write_runs(tmp_path / "blog-head", {1: [0.50, 0.52, 0.54], 8: [0.51, 0.55, 0.53]})
    config = tmp_path / "blog-head" / "m8_p0.5_s43-fp32" / "config.json"  # placed by hand beside eager runs
    write_json(config, {**json.loads(config.read_text()), flag: True})
    assert study.main(["convergence", "--compare", tmp_path]) == 2
    err = capsys.readouterr().err
    assert f"m8_p0.5_s43-fp32 trained with the {step} step and " in err and "with the eager one" in err
    assert err.count("\n") == 1 and not (tmp_path / "convergence.md").exists()


SMALL_STUDY = catalogue.Study("a small study", 1, [("avg2", [1, 8], [0.5]), ("avg2-flip", [8], [0.5])],
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
