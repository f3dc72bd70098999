"""--cuda_graph as far as a CPU can check it: the static buffers, the warm-up that leaves no trace, the refusal of a
batch of another size, the evaluation's eager last batch, the flag's record and refusals. The graph itself is stood
in for by one that calls the captured function again at each replay: on CUDA the graph replays those same kernels."""
import contextlib
import json

import pytest
import torch

import graphstep
import train
from bookkeeping import experiment, runfiles
from conftest import cli, rows, run_dirs
from nn import build_model


class ReplayedPython:
    """A stand-in for graphstep.CudaGraph: capture() records fn without running it (a capture computes nothing,
    though it may move the generator on: this one draws a number), replay() runs it."""

    replayed = 0  # by every instance: run.py's wiring makes its own

    def __init__(self):
        self.fn, self.replays = None, 0

    def capture(self, fn):
        torch.rand(1)
        self.fn = fn

    def replay(self):
        self.replays += 1
        ReplayedPython.replayed += 1
        return self.fn()

    side_stream = staticmethod(contextlib.nullcontext)


def setup(seed=0):
    torch.manual_seed(seed)
    model = build_model("miniresnet", 10, 8, 0.5)  # BatchNorm statistics and eight dropout samples: state to keep
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)
    return model, optimizer


def batches(n, size=4):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 3, 32, 32, generator=g), torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


def train_steps(step, data):
    return [step(x, y)[1].item() for x, y in data]


def same_state(a, b):
    (model_a, opt_a), (model_b, opt_b) = a, b
    weights = all(torch.equal(x, y) for x, y in zip(model_a.state_dict().values(), model_b.state_dict().values()))
    adam = [s for s in opt_a.state.values()], [s for s in opt_b.state.values()]
    moments = all(torch.equal(x[k], y[k]) for x, y in zip(*adam) for k in x)
    return weights and moments and len(adam[0]) == len(adam[1])


def test_the_graphed_step_trains_the_eager_steps_bits_after_a_warm_up_that_leaves_no_trace():
    eager, graphed = setup(), setup()
    autocast = train.autocast_for(torch.device("cpu"), "fp32")
    data = batches(3)
    torch.manual_seed(5)
    eager_losses = train_steps(train.make_step(*eager, autocast), data)
    eager_rng = torch.get_rng_state()
    step = graphstep.GraphedStep(*graphed, torch.nn.CrossEntropyLoss(), autocast, graph_factory=ReplayedPython)
    torch.manual_seed(5)
    assert train_steps(step, data) == eager_losses  # three warm-up steps ran first, and were undone
    assert same_state(eager, graphed) and torch.equal(torch.get_rng_state(), eager_rng)
    assert step.graph.replays == 3


def test_a_resumed_optimizer_is_put_back_as_it_was_not_zeroed():
    eager, graphed = setup(), setup()
    autocast = train.autocast_for(torch.device("cpu"), "fp32")
    first, then = batches(4)[:2], batches(4)[2:]
    for pair in (eager, graphed):  # two eager steps: Adam has moments and a step count, as after a resume
        torch.manual_seed(7)
        train_steps(train.make_step(*pair, autocast), first)
    torch.manual_seed(8)
    expected = train_steps(train.make_step(*eager, autocast), then)
    torch.manual_seed(8)
    step = graphstep.GraphedStep(*graphed, torch.nn.CrossEntropyLoss(), autocast, graph_factory=ReplayedPython)
    assert train_steps(step, then) == expected and same_state(eager, graphed)


def test_a_batch_of_another_size_is_never_replayed():
    model, optimizer = setup()
    step = graphstep.GraphedStep(model, optimizer, torch.nn.CrossEntropyLoss(),
                                 train.autocast_for(torch.device("cpu"), "fp32"), graph_factory=ReplayedPython)
    (x, y), (odd_x, odd_y) = batches(1)[0], batches(1, size=3)[0]
    step(x, y)
    with pytest.raises(ValueError, match=r"shape \(3, 3, 32, 32\) cannot replay a step captured for \(4, 3, 32, 32\)"):
        step(odd_x, odd_y)
    assert step.graph.replays == 1


def test_evaluation_replays_full_batches_and_runs_the_last_one_eagerly():
    model, _ = setup()
    autocast, prepare = train.autocast_for(torch.device("cpu"), "fp32"), lambda x: x.float() / 255
    x, y = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (10,))
    logits_of = graphstep.GraphedForward(model, prepare, graph_factory=ReplayedPython)
    eager = train.evaluate(model, x, y, autocast, prepare)
    train.EVAL_BATCH, kept = 4, train.EVAL_BATCH  # batches of 4, 4 and a last one of 2
    try:
        graphed = train.evaluate(model, x, y, autocast, prepare, logits_of)
        eager_small = train.evaluate(model, x, y, autocast, prepare)
    finally:
        train.EVAL_BATCH = kept
    assert graphed == eager_small and graphed[1] == eager[1] and logits_of.graph.replays == 2


def test_a_tensor_lr_is_filled_in_place_where_the_graph_reads_it():
    model, _ = setup()
    lr = torch.tensor(0.01)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    train.set_lr(optimizer, 0.001)
    assert optimizer.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(0.001)
    plain = torch.optim.Adam(model.parameters(), lr=0.01)
    train.set_lr(plain, 0.001)
    assert plain.param_groups[0]["lr"] == 0.001


def test_a_graphed_run_is_another_experiment_with_its_own_name():
    config = {"model": "miniresnet", "dataset": "cifar10", "dropout_num": 8, "dropout_p": 0.5, "seed": 42}
    eager_name, eager_setup = experiment.run_identity(config)
    graph_name, graph_setup = experiment.run_identity({**config, "cuda_graph": True})
    assert "_graph_s42-" in graph_name and "_graph" not in eager_name and graph_setup != eager_setup
    assert experiment.run_identity({**config, "cuda_graph": False}) == (eager_name, eager_setup)  # old runs keep names
    assert experiment.setup_flags({**config, "cuda_graph": True})["cuda_graph"] is True
    assert "cuda_graph" not in experiment.setup_flags(config)


def test_a_config_may_lack_the_flag_but_not_hold_another_type(tmp_path):
    config = {key: kind() if kind in (str, int, bool) else 0.5 for key, kind in runfiles.CONFIG_KEYS.items()}
    runfiles.check_config(tmp_path / "config.json", config)  # written before --cuda_graph: off
    runfiles.check_config(tmp_path / "config.json", {**config, "cuda_graph": True})
    with pytest.raises(Exception, match="'cuda_graph' is 'yes', not of the type a run writes"):
        runfiles.check_config(tmp_path / "config.json", {**config, "cuda_graph": "yes"})


@pytest.mark.parametrize("flags,message", [
    (["--cuda_graph", "--device", "cpu"], "--cuda_graph captures the step on one CUDA device, not cpu: drop it"),
    (["--cuda_graph", "--compile"], "--compile and --cuda_graph are two ways to a faster step: give one"),
])
def test_the_flag_is_refused_where_it_cannot_run(flags, message, small_cifar, tmp_path, capsys):
    rc, _, err = cli(capsys, *flags, "--data_dir", small_cifar, "--epochs", 1, "--output_dir", tmp_path)
    assert rc == 2 and message in err and err.count("\n") == 1 and list(tmp_path.iterdir()) == []


@pytest.fixture
def graphs_on_a_cpu(monkeypatch):
    """run.py --cuda_graph's wiring on a CPU: the stand-in graph, and Adam as a CPU runs it with a tensor lr
    (capturable needs a GPU)."""
    adam = torch.optim.Adam
    monkeypatch.setattr(graphstep, "CudaGraph", ReplayedPython)
    monkeypatch.setattr(graphstep, "refusal", lambda device, ranks: None)
    monkeypatch.setattr(torch.optim, "Adam", lambda params, **kw: adam(params, **{**kw, "capturable": False,
                                                                               "foreach": False}))
    ReplayedPython.replayed = 0


@pytest.mark.slow
def test_a_graphed_run_resumed_trains_what_it_trains_at_once(graphs_on_a_cpu, small_cifar, tmp_path, capsys):
    flags = ["--data_dir", small_cifar, "--cuda_graph", "--device", "cpu", "--dropout_num", 8, "--batch_size", 32,
             "--lr_milestone", 1, "--valid_split", 50]
    assert cli(capsys, *flags, "--epochs", 2, "--output_dir", tmp_path / "at_once")[0] == 0
    assert cli(capsys, *flags, "--epochs", 1, "--output_dir", tmp_path / "resumed")[0] == 0
    rc, out, _ = cli(capsys, *flags, "--epochs", 2, "--output_dir", tmp_path / "resumed")
    assert rc == 0 and "resumed from epoch 1" in out
    (at_once,), (resumed,) = run_dirs(tmp_path / "at_once", 8), run_dirs(tmp_path / "resumed", 8)
    assert "_graph_s42-" in at_once.name and rows(at_once) == rows(resumed)
    assert [row["lr"] for row in rows(at_once)] == ["0.01", "0.001"]  # the schedule reached the captured step
    assert (at_once / "test.json").read_text() == (resumed / "test.json").read_text()
    assert ReplayedPython.replayed > 0 and json.loads((at_once / "config.json").read_text())["cuda_graph"] is True
