"""The prepared GPU script, in its CPU smoke mode: it must run as it is when a GPU is there."""
import os
import subprocess
import sys
import tarfile

from conftest import ROOT


def test_the_gpu_script_benches_trains_draws_and_packs_within_its_total_seconds(small_cifar, tmp_path):
    env = {**os.environ, "SMOKE": "1", "DATA": str(small_cifar), "DEST": str(tmp_path / "gpu"), "OUT": str(tmp_path),
           "TOTAL_S": "120", "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(ROOT / "gpu_study.sh")], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-500:]
    times = (tmp_path / "gpu" / "times.txt").read_text()
    assert "bench miniresnet bf16: exit 0" in times and "bench miniresnet fp32: exit 0" in times
    assert "study convergence: exit" in times
    assert "s of device time per run" in times and " runs finished" in times
    ended_at = int(times.split("gpu_study.sh: end (at ")[1].split(" s)")[0])
    assert ended_at <= 120  # TOTAL_S holds everything, so that one device command of a fixed limit holds the script
    assert f"% of {os.cpu_count()} cores" in times  # what limits it: the CPU's share here, and the GPU's where it has one
    with tarfile.open(tmp_path / "gpu.tar.gz") as packed:
        names = packed.getnames()
    assert "gpu/bench-miniresnet-bf16/bench.md" in names and not any(n.endswith(".pt") for n in names)
    assert any(n.startswith("gpu/study-smoke/blog-head/") and n.endswith("/metrics.json") for n in names)
