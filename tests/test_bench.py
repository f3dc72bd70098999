"""bench.py runs end to end and its helpers compute what they say (a smoke test: no timing is asserted)."""
import sys

import pytest
import torch

import bench


def test_ratios_are_taken_within_each_round():
    times = {0: [1.0, 2.0, 1.0], 8: [1.1, 2.0, 1.2]}  # round 2 was a slow spell for both
    assert bench.round_ratios(times, 0) == {0: [1.0, 1.0, 1.0], 8: pytest.approx([1.1, 1.0, 1.2])}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the peak can be reset on Linux only")
def test_peak_memory_resets_and_sees_a_new_allocation():
    cpu = torch.device("cpu")
    bench.reset_peak_memory(cpu)
    before = bench.peak_memory_since_reset(cpu)
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    assert bench.peak_memory_since_reset(cpu) >= before + 60 * 2**20
    del block
    bench.reset_peak_memory(cpu)
    assert bench.peak_memory_since_reset(cpu) < before + 32 * 2**20


def test_bench_writes_every_table_and_the_overhead_plot(tmp_path, capsys):
    bench.main(["--batch_size", "4", "--steps", "1", "--repeats", "2", "--warmup", "0", "--memory_steps", "0",
                "--device", "cpu", "--out", str(tmp_path)])
    report = (tmp_path / "bench.md").read_text()
    assert "| seed-style" in report and "| project, fp32, M=8" in report and "x (" in report
    overhead = report.split("### Multi-sample overhead")[1].splitlines()
    assert [line.split("|")[1].strip() for line in overhead if line.startswith("| ") and "ms" not in line] == \
        [str(m) for m in bench.OVERHEAD_M]
    assert (tmp_path / "overhead.png").stat().st_size > 0
