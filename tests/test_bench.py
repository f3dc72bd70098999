"""bench.py runs end to end and its helpers compute what they say (a smoke test: no timing is asserted)."""
import argparse
import multiprocessing
import re
import subprocess
import sys
import time

import pytest
import torch

import bench
import stepprofile
import tools
from benchmarks import pipelines
from conftest import ROOT


def test_ratios_are_taken_within_each_round():
    times = {0: [1.0, 2.0, 1.0], 8: [1.1, 2.0, 1.2]}  # round 2 was a slow spell for both
    assert pipelines.round_ratios(times, 0) == {0: [1.0, 1.0, 1.0], 8: pytest.approx([1.1, 1.0, 1.2])}


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the peak can be reset on Linux only")
def test_peak_memory_resets_and_sees_a_new_allocation():
    """In a fresh process, as bench measures it: memory another test freed but kept would hide the allocation."""
    code = ("import torch\nfrom benchmarks import pipelines as b\ncpu = torch.device('cpu')\nb.reset_peak_memory(cpu)\n"
            "before = b.peak_memory_since_reset(cpu)\nblock = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched\n"
            "assert b.peak_memory_since_reset(cpu) >= before + 60 * 2**20\ndel block\nb.reset_peak_memory(cpu)\n"
            "assert b.peak_memory_since_reset(cpu) < before + 32 * 2**20")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-500:]


TINY = ["--batch_size", "4", "--steps", "1", "--repeats", "2", "--warmup", "0", "--memory_steps", "0", "--device", "cpu"]


def test_bench_writes_every_table_and_the_overhead_plot(tmp_path, capsys):
    assert bench.main(TINY + ["--out", str(tmp_path)]) == 0
    report = (tmp_path / "bench.md").read_text()
    assert "| blog-style" in report and "| project, fp32, M=8" in report and "x (" in report
    overhead = report.split("### Multi-sample overhead")[1].split("### Variants")[0].splitlines()
    assert [line.split("|")[1].strip() for line in overhead if line.startswith("| ") and "ms" not in line] == \
        [str(m) for m in bench.OVERHEAD_M]
    assert (tmp_path / "overhead.png").stat().st_size > 0
    variants = [line.split(" | ") for line in report.split("### Variants")[1].splitlines() if line.startswith("| ")][1:]
    assert [row[0] for row in variants] == ["| " + label for label, _, _, _ in bench.VARIANTS]
    assert [row[2] for row in variants] == ["1,290", "1,290", "10,320"]  # 128 x 10 + 10; separate heads: M = 8 of them
    # blocks this short are refused no more, but said to be untrustworthy under the table that repeats a setting
    notes = "\n".join(overhead)
    assert "The dropout_num=8 row is the setting of the pipelines table's 'project, " in notes
    assert "**Too short to trust** (--warmup 0: " in notes and "--steps 1: " in notes and "--repeats 2: " in notes


@pytest.mark.slow
def test_workers_times_k_fresh_processes_at_once_against_one(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "WORKER_ROUNDS", 1)  # one round: one process, then two at once
    monkeypatch.setattr(bench, "OVERHEAD_M", [0])  # the other tables as small as they go
    assert bench.main(TINY + ["--dropout_num", "0", "--workers", "2", "--out", str(tmp_path)]) == 0
    section = (tmp_path / "bench.md").read_text().split("### Runs at once")[1]
    rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| ")][1:]
    assert [(row[0], row[1]) for row in rows] == [("| 1", str(torch.get_num_threads())),
                                                  ("| 2", str(tools.threads_per_worker(2)))]
    assert all(float(row[2].replace(",", "")) > 0 for row in rows) and rows[0][3] == "1.00x (1.00 - 1.00) |"
    assert "### Runs at once" in capsys.readouterr().out


def test_images_per_second_counts_every_process_from_the_first_start_to_the_last_end():
    assert pipelines.images_per_second([(10.0, 12.0), (11.0, 14.0)], images_each=100) == 200 / 4


@pytest.mark.slow
def test_a_process_that_dies_ends_the_one_waiting_for_it_and_is_one_line(tmp_path):
    args = bench.parse_args(TINY + ["--dropout_num", "0", "--out", str(tmp_path)])
    dies = argparse.Namespace(**{**vars(args), "device": "no such device"})  # its pick_device raises at once
    start = multiprocessing.get_context("spawn").Barrier(2)  # the other waits here for it forever
    with pytest.raises(tools.UserError, match=r"^the pair ended without an answer \(exit code 1\); try again$"):
        pipelines.answers_of_fresh_processes(pipelines.timed_training, [(args, 1, start), (dies, 1, start)],
                                                  "the pair", "try again")


def test_only_short_blocks_get_the_too_short_note():
    def note(warmup, steps, repeats):
        return bench.short_blocks_note(argparse.Namespace(warmup=warmup, steps=steps, repeats=repeats))
    assert note(1, bench.MIN_STEPS, bench.MIN_REPEATS) is None
    assert "--warmup 0: " in note(0, bench.MIN_STEPS, bench.MIN_REPEATS)
    assert "--steps 4: " in note(1, 4, bench.MIN_REPEATS)
    assert "--repeats 2: " in note(1, bench.MIN_STEPS, 2)


def no_work(*args):
    raise AssertionError("work started before every argument was checked")


@pytest.mark.parametrize("bad", [
    ["--warmup", "-1"], ["--batch_size", "0"], ["--repeats", "0"], ["--steps", "0"], ["--memory_steps", "-1"],
    ["--dropout_num", "-1"], ["--workers", "-1"], ["--workers", "1"], ["--model", "resnet999"], ["--device", "cuda:99"], ["--device", "nonsense"],
    ["--device", "meta"], ["--steps", "many"], ["--precision", "fp8"], ["--no_such_flag"]])
def test_bad_input_is_one_line_and_exit_2_before_any_work(bad, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "blog_style_pipeline", no_work)  # the first thing the work builds
    out = tmp_path / "out"
    assert bench.main(TINY + bad + ["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bench.py: error: ") and err.count("\n") == 1, err
    assert not out.exists()


@pytest.mark.parametrize("out", ["a_file", "a_file/below"])
def test_an_out_that_cannot_be_written_is_one_line_and_exit_2_before_any_work(out, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "blog_style_pipeline", no_work)
    (tmp_path / "a_file").write_text("kept")
    assert bench.main(TINY + ["--out", str(tmp_path / out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bench.py: error: cannot write to {tmp_path / out} ") and err.count("\n") == 1, err
    assert (tmp_path / "a_file").read_text() == "kept"


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(bench, "blog_style_pipeline", interrupted)
    out = tmp_path / "out"
    try:
        status = bench.main(TINY + ["--out", str(out)])
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped bench.main")  # and would stop pytest itself
    assert status == 130
    assert capsys.readouterr().err == "bench.py: stopped by SIGINT; nothing was written\n"
    assert not out.exists()


def test_the_overhead_plot_has_no_tick_left_of_zero(tmp_path):
    ax = bench.plot_overhead(tmp_path / "overhead.png", {m: 1.0 for m in bench.OVERHEAD_M}, "title")
    ticks = [*ax.get_xticks(), *ax.get_xticks(minor=True)]
    assert min(ticks) >= 0 and sorted(ticks) == bench.OVERHEAD_M


@pytest.mark.slow
def test_quick_mode_prints_each_table_under_its_heading(tmp_path, capsys):
    assert bench.main(["--quick", "--batch_size", "4", "--device", "cpu", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    headings = [line for line in out.splitlines() if line.startswith("### ")]
    assert [h.split(" (")[0] for h in headings] == ["### Pipelines", "### Multi-sample overhead", "### Variants of the head"]
    overhead = out.split("### Multi-sample overhead")[1].split("###")[0]
    assert [line.split("|")[1].strip() for line in overhead.splitlines() if line.startswith("| ") and "ms" not in line] == ["0", "8"]
    assert "median of 3 blocks of 3 steps" in out and "**Too short to trust**" in out  # and it says so


def test_quick_mode_keeps_the_timing_flags_given_with_it():
    args = bench.parse_args(["--quick", "--steps", "7"])
    assert (args.steps, args.repeats, args.warmup, args.memory_steps) == (7, 3, 1, 0)
    args = bench.parse_args(["--repeats", "2"])
    assert (args.steps, args.repeats, args.warmup, args.memory_steps) == (5, 2, 3, 10)


def test_a_slow_rate_keeps_its_digits_instead_of_rounding_to_zero():
    assert [bench.per_second(x) for x in (0.4, 12.34, 99.96, 1234.5)] == ["0.4", "12.3", "100", "1,234"]


def test_the_compiled_table_times_both_steps_and_the_compile_apart(tmp_path, capsys, monkeypatch):
    """torch.compile is stood in for by a model that sleeps 2 s once, on its first step: the table must count
    that as compile time, not as a step (a step here is well under a second, even on a busy machine)."""
    def compile_that_takes_a_while(model, mode=None):
        first = []

        def forward(*inputs):
            if not first:
                first.append(time.sleep(2))
            return model(*inputs)
        forward.parameters, forward.train, forward.eval = model.parameters, model.train, model.eval
        return forward
    monkeypatch.setattr(pipelines.hardware, "compiled", compile_that_takes_a_while)
    args = bench.parse_args(TINY + ["--warmup", "1", "--compile", "--out", str(tmp_path)])
    heading, table, note = bench.compiled_table(args, torch.device("cpu"), "fp32")
    assert heading.startswith("### Compiled step") and "| eager |" in table and "| compiled |" in table
    assert "| TFLOP/s | of peak |" in table
    compile_s = float(re.search(r"Compiling took ([\d.]+) s", note).group(1))
    assert 1.5 < compile_s < 5, note
    assert "pay it back" in note and "| graph |" not in table and "reduce-overhead" not in table  # CUDA's only


@pytest.mark.slow
def test_stepprofile_names_the_costly_operators_of_both_steps(tmp_path, capsys):
    argv = ["--batch_size", "4", "--steps", "1", "--warmup", "1", "--device", "cpu", "--precisions", "fp32",
            "--out", str(tmp_path)]
    assert stepprofile.main(argv) == 0
    report = (tmp_path / "profile.md").read_text()
    assert report.count("ms a step, of which") == 2 and "**Training step**" in report and "**Evaluation step**" in report
    assert "`aten::convolution_backward`" in report and "`aten::mkldnn_convolution`" in report
    shares = [int(s) for s in re.findall(r"matrix work \(convolutions, linear layers\) [\d.]+ ms = (\d+)%", report)]
    assert len(shares) == 2 and all(0 < s < 100 for s in shares)
    tables = [t for t in report.split("\n\n") if t.startswith("| operator")]
    assert [len(t.splitlines()) - 2 for t in tables] == [stepprofile.TOP] * 2


@pytest.mark.parametrize("bad", [["--precisions", "fp16"], ["--steps", "0"], ["--model", "vgg"]])
def test_stepprofile_refuses_bad_input_in_one_line(bad, tmp_path, capsys):
    assert stepprofile.main(bad + ["--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stepprofile.py: error:") and len(err.splitlines()) == 1
    assert not (tmp_path / "p").exists()
