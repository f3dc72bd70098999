"""torchrun data parallelism on the CPU (gloo), two ranks, on the small real CIFAR-10 subset."""
import json
import multiprocessing
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import datasource
import trainingmonitor
from conftest import ROOT, cli, fake_run, rows, run_dirs

# 300 training images in batches of 60: 5 steps an epoch, each rank 30 images a step
RUN = ["--batch_size", "60", "--dropout_num", "8", "--lr_milestone", "1", "--precision", "fp32"]

# Runs run.main in a torchrun worker, then saves the rank's final parameters. With KILL_AT=epoch,step set,
# rank 1 kills itself with SIGKILL at that step on torchrun's first attempt (a dead worker, mid-epoch).
WORKER = textwrap.dedent(f"""
    import os, signal, sys
    sys.path.insert(0, {str(ROOT)!r})
    import torch, datasource, run, train
    models, real_model, real_batches, steps = [], train.make_model, datasource.train_batches, [0]
    train.make_model = lambda *args: models.append(real_model(*args)) or models[-1]
    def batches(*args):
        for batch in real_batches(*args):
            steps[0] += 1
            if os.environ.get("KILL_AT") and os.environ["RANK"] == "1" and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
                epoch, step = map(int, os.environ["KILL_AT"].split(","))
                if steps[0] == (epoch - 1) * 5 + step:
                    os.kill(os.getpid(), signal.SIGKILL)
            yield batch
    datasource.train_batches = batches
    status = run.main(sys.argv[1:])
    torch.save(models[-1].state_dict(), os.path.join(os.environ["STATE_DIR"], "rank" + os.environ["RANK"] + ".pt"))
    sys.exit(status)
""")


def torchrun(tmp_path, small_cifar, output_dir, *flags, kill_at=None):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = {**os.environ, "STATE_DIR": str(tmp_path), "OMP_NUM_THREADS": "1", **({"KILL_AT": kill_at} if kill_at else {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
               str(worker), "--data_dir", str(small_cifar), "--output_dir", str(output_dir), *RUN, *flags]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def two_ranks(small_cifar, tmp_path_factory):
    """An uninterrupted 2-rank run of 2 epochs: (output folder, folder of each rank's final parameters, result)."""
    tmp = tmp_path_factory.mktemp("ranks")
    result = torchrun(tmp, small_cifar, tmp / "out", "--epochs", "2")
    assert result.returncode == 0, result.stderr
    return tmp / "out", tmp, result


@pytest.mark.slow
def test_two_ranks_write_one_run_and_end_with_the_same_parameters(two_ranks):
    output, states, result = two_ranks
    (run_dir,) = run_dirs(output, 8)
    assert [r["epoch"] for r in json.loads((run_dir / "metrics.json").read_text())] == [1, 2]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["world_size"] == 2 and "_s42-" in run_dir.name  # the ranks are not part of the name
    assert result.stdout.count("train_loss  train_acc") == 1 and result.stdout.count("done:") == 1  # rank 0 alone
    rank0, rank1 = (torch.load(states / f"rank{r}.pt") for r in (0, 1))
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)


@pytest.mark.parametrize("augment", [False, True])
def test_the_ranks_take_disjoint_slices_that_make_up_the_single_process_batch(augment):
    x, y = torch.randint(0, 256, (100, 3, 32, 32), dtype=torch.uint8), torch.arange(100)
    single = list(datasource.train_batches(x, y, 20, torch.Generator().manual_seed(5), augment, lambda b: b))
    ranks = [list(datasource.train_batches(x, y, 20, torch.Generator().manual_seed(5), augment, lambda b: b, r, 2))
             for r in (0, 1)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 5
    for (xb, yb), (x0, y0), (x1, y1) in zip(single, *ranks):
        assert len(y0) == len(y1) == 10 and not set(y0.tolist()) & set(y1.tolist())
        assert torch.equal(torch.cat([x0, x1]), xb) and torch.equal(torch.cat([y0, y1]), yb)


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_the_run_ends_as_if_nothing_happened(two_ranks, small_cifar, tmp_path):
    output, _, _ = two_ranks
    result = torchrun(tmp_path, small_cifar, tmp_path / "out", "--epochs", "2", kill_at="2,3")
    assert result.returncode == 0, result.stderr
    (killed,) = run_dirs(tmp_path / "out", 8)
    assert "resumed from epoch 1" in result.stdout and rows(killed) == rows(run_dirs(output, 8)[0])


@pytest.mark.slow
def test_resuming_with_another_number_of_ranks_is_refused_but_a_finished_run_is_nothing_to_do(two_ranks, small_cifar,
                                                                                                  capsys):
    output, _, _ = two_ranks
    rc, _, err = cli(capsys, "--data_dir", small_cifar, "--output_dir", output, *RUN, "--epochs", 3)
    assert rc == 2 and "was trained by 2 rank(s), this command runs 1" in err and err.count("\n") == 1
    rc, out, _ = cli(capsys, "--data_dir", small_cifar, "--output_dir", output, *RUN, "--epochs", 2)  # finished
    assert rc == 0 and "nothing to do" in out


@pytest.mark.slow
def test_ranks_that_fail_offline_say_it_once_and_leave_no_folder_whichever_rank_made_it(tmp_path):
    """Each rank made its lock's folders or found them made; whichever leaves last removes them (before, the
    folders stayed, empty, whenever the rank that made them left first)."""
    unreachable = "http://127.0.0.1:9"  # a port nothing listens on: the download fails at once, network or not
    env = {**os.environ, "OMP_NUM_THREADS": "1", "http_proxy": unreachable, "https_proxy": unreachable}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "run.py"),
               "--data_dir", str(tmp_path / "data" / "cifar"), "--output_dir", str(tmp_path / "out" / "runs"), *RUN]
    for _ in range(3):  # the order the ranks leave in varies
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode != 0 and result.stderr.count("run.py: error: CIFAR-10 is not in") == 1
        assert list(tmp_path.iterdir()) == [], result.stderr[-500:]


def test_sync_bn_on_the_cpu_is_refused(small_cifar, tmp_path, capsys):
    rc, _, err = cli(capsys, "--data_dir", small_cifar, "--output_dir", tmp_path, *RUN, "--sync_bn", "--device", "cpu")
    assert rc == 2 and "--sync_bn" in err and "CPU" in err and err.count("\n") == 1 and not list(tmp_path.iterdir())


def redraw_repeatedly(output_dir, setup, times):
    for _ in range(times):
        trainingmonitor.compare_setup(output_dir, setup)


@pytest.mark.slow
def test_comparisons_drawn_at_the_same_moment_are_never_torn(tmp_path):
    for m, seed in ((1, 1), (8, 1), (1, 2), (8, 2)):
        run = fake_run(m, seed, [0.5, 0.6])
        run["config"].update(epochs=2, dataset="cifar10", model="miniresnet", data_source="x", batch_size=60, lr=0.01,
                             lr_milestone=1, augment=False, data_seed=0, train_size=None, test_size=None,
                             precision="fp32", train_images=300, test_images=100, device="cpu", setup="x")
        (tmp_path / run["dir"].name).mkdir()
        for name, value in (("config.json", run["config"]), ("metrics.json", run["history"])):
            (tmp_path / run["dir"].name / name).write_text(json.dumps(value))
    setup = trainingmonitor.run_identity(json.loads((tmp_path / "m1_s1" / "config.json").read_text()))[1]
    redraw_repeatedly(tmp_path, setup, 1)
    expected = (tmp_path / "compare" / setup / "summary.md").read_text()
    context = multiprocessing.get_context("spawn")
    drawers = [context.Process(target=redraw_repeatedly, args=(tmp_path, setup, 3)) for _ in range(2)]
    for d in drawers:
        d.start()
    seen = set()
    while any(d.is_alive() for d in drawers):
        seen.add((tmp_path / "compare" / setup / "summary.md").read_text())
    assert all(d.exitcode == 0 for d in drawers) and seen == {expected}
    assert not list((tmp_path / "compare" / setup).glob(".*.tmp"))
