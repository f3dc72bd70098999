"""The prepared GPU script, in its CPU smoke mode: it must run as it is when a GPU is there."""
import json
import os
import subprocess
import sys
import tarfile

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow  # the script's smoke run: minutes, whatever the machine


def run_script(data, dest, **env):
    env = {**os.environ, "SMOKE": "1", "DATA": str(data), "DEST": str(dest), "PYTHON": sys.executable, **env}
    result = subprocess.run(["bash", str(ROOT / "gpu_study.sh")], env=env, capture_output=True, text=True, timeout=420)
    assert result.returncode == 0, result.stderr[-500:]
    return (dest / "times.txt").read_text()


def ended_at(times):
    return int(times.split("gpu_study.sh: end (at ")[1].split(" s)")[0])


def finished(study_folder):
    """{(dropout_num, seed): epochs} of the runs the folder holds to their last epoch."""
    runs = {}
    for metrics in study_folder.glob("*/*/metrics.json"):
        config = json.loads((metrics.parent / "config.json").read_text())
        if len(json.loads(metrics.read_text())) >= config["epochs"]:
            runs[config["dropout_num"], config["seed"]] = config["epochs"]
    return runs


@pytest.fixture(scope="module")
def first(small_cifar, tmp_path_factory):
    """The script with a workload no machine finishes before its deadline: 600 smoke runs, each its own run.py
    process (a second or more apiece to start Python and torch), two at a time in what the bench leaves of 240 s
    (at least 50 s: each bench stops at 75 s)."""
    out = tmp_path_factory.mktemp("gpu")
    seeds = " ".join(map(str, range(42, 242)))
    return out, run_script(small_cifar, out / "gpu", OUT=str(out), TOTAL_S="240", SEEDS=seeds)


def test_the_gpu_script_benches_trains_draws_and_packs_within_its_total_seconds(first):
    out, times = first
    assert "bench miniresnet bf16: exit 0" in times and "bench miniresnet fp32: exit 0" in times
    assert "MPS: off" in times  # no multi-process service on this machine (and MPS=0 in the smoke mode)
    assert "study convergence: exit 124" in times  # the deadline stopped it: the fixture gave it more than fits
    assert "s of device time per run" in times and " runs finished" in times
    assert ended_at(times) <= 240  # TOTAL_S bounds it all, so a remote command with a time limit holds it
    assert f"% of {os.cpu_count()} cores" in times  # what limits it: the CPU's share here, and the GPU's where it has one
    with tarfile.open(out / "gpu.tar.gz") as packed:
        names = packed.getnames()
    assert "gpu/bench-miniresnet-bf16/bench.md" in names and not any(n.endswith(".pt") for n in names)
    assert any(n.startswith("gpu/study-smoke/blog-head/") and n.endswith("/metrics.json") for n in names)


def test_the_next_gpu_goes_on_from_the_committed_runs_under_mps_and_counts_only_its_own(first, small_cifar, tmp_path):
    out, _ = first
    prior = out / "gpu" / "study-smoke"
    before = finished(prior)
    assert before, "the first run of the script finished no run to go on from"
    fake = tmp_path / "bin" / "nvidia-cuda-mps-control"  # NVIDIA's, as a script that notes what it was told
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\nif [ "$1" = -d ]; then echo start; else read what; echo "$what"; fi >> {tmp_path}/mps\n')
    fake.chmod(0o755)
    times = run_script(small_cifar, tmp_path / "again", PRIOR=str(prior), BENCH_S="0", TOTAL_S="80", MPS="1",
                       PATH=f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    assert "MPS: on" in times and (tmp_path / "mps").read_text().split() == ["start", "quit"]
    assert "bench" not in times and f"runs copied from {prior}: {len(list(prior.glob('*/*/metrics.json')))}" in times
    logs = tmp_path / "again" / "study-smoke" / "logs"
    trained = {log.name for log in logs.glob("*.log")}
    assert trained, "the second run trained nothing"
    assert not trained & {f"blog-head-m{m}-p0.5-s{seed}.log" for m, seed in before}
    now = finished(tmp_path / "again" / "study-smoke")
    assert now.keys() >= before.keys()
    assert f" s of studies: {len(now) - len(before)} runs finished" in times
