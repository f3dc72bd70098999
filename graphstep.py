"""The training step and the evaluation forward as CUDA graphs (run.py --cuda_graph): captured once, replayed from
static buffers, so a step is a handful of launches instead of about 220.

Why: on an H200 the blog's network takes 11.8 ms a step at batch 128, about 44 us for each of some 220 kernel
launches; the arithmetic would take under 1 ms (docs/gpu-study.md). The step is bound by launches.

    step = GraphedStep(model, optimizer, loss_fn, autocast)    # captures at its first call
    logits, loss = step(xb, yb)                                # xb, yb copied into the static buffers, then replayed

What stays as in eager: the data order and augmentation (drawn outside the graph from the run's generator), the
checkpoints and the points a run resumes from; the dropout masks are drawn inside the graph from the seeded CUDA
generator. What differs: Adam runs `capturable` (its step count and bias corrections on the device, in float32 rather
than Python's doubles), so a --cuda_graph run is another experiment than the eager run of its seed. Whether the
replayed step gives the bits of an eager step with capturable Adam, and how far it drifts from run.py's eager step,
is what gpu_graph_check.sh measures.

The capture runs WARMUP_STEPS eager steps first (as CUDA graphs need: lazy initialisation, cuDNN's autotuning) and
then puts back everything they changed (weights, BatchNorm statistics, Adam's state, the random state), so a run
trains the same steps from the same state whether or not it was resumed. A batch of another size than the captured
one is refused: it would be read through the static buffers' shapes.
"""
import contextlib

import torch

WARMUP_STEPS = 3


class CudaGraph:
    """torch.cuda.CUDAGraph behind capture(fn) -> fn's outputs (static: each replay refreshes them) and replay()."""

    def __init__(self):
        self.graph, self.outputs = torch.cuda.CUDAGraph(), None

    def capture(self, fn):
        with torch.cuda.graph(self.graph):
            self.outputs = fn()

    def replay(self):
        self.graph.replay()
        return self.outputs

    @staticmethod
    def side_stream():
        """Warm-up runs on a side stream, as torch.cuda.graph's capture expects."""
        return _side_stream()


@contextlib.contextmanager
def _side_stream():
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        yield
    torch.cuda.current_stream().wait_stream(stream)


class GraphedStep:
    """A training step (forward with every dropout sample, backward, optimizer step) replayed from a graph.

    graph_factory makes the graph: CudaGraph on CUDA; a test gives one that calls fn again at each replay, so the
    buffers, the warm-up and its undoing are checked on a CPU against the eager step."""

    def __init__(self, model, optimizer, loss_fn, autocast, graph_factory=None):
        self.model, self.optimizer, self.loss_fn, self.autocast = model, optimizer, loss_fn, autocast
        self.graph_factory, self.graph, self.static = graph_factory or CudaGraph, None, None

    def __call__(self, x, y):
        if self.graph is None:
            self._capture(x, y)
        check_shapes(self.static, (x, y))
        self.static[0].copy_(x)
        self.static[1].copy_(y)
        return self.graph.replay()

    def _capture(self, x, y):
        use_device(x.device)
        self.static = (x.clone(), y.clone())
        kept = snapshot(self.model, self.optimizer)
        with self.graph_factory.side_stream():
            for _ in range(WARMUP_STEPS):
                self._step()
        restore(self.model, self.optimizer, kept)
        self.graph = self.graph_factory()
        with kept_random_state(x.device):  # capturing draws nothing: the replays draw what the run draws
            self.graph.capture(self._step)

    def _step(self):
        # In a capture the gradients are None here, so backward allocates the ones every replay writes (not adds) to
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast:
            logits, loss = self.model(*self.static, self.loss_fn)
        loss.backward()
        self.optimizer.step()
        return logits, loss


class GraphedForward:
    """model(prepare(x)) in eval mode, replayed from a graph for batches of the captured size; any other size (the
    last batch of a set) runs eagerly. It runs inside evaluate()'s inference_mode and autocast, captures included.
    Nothing it runs changes state, so it needs no undoing."""

    def __init__(self, model, prepare, graph_factory=None):
        self.model, self.prepare = model, prepare
        self.graph_factory, self.graph, self.static = graph_factory or CudaGraph, None, None

    def __call__(self, x):
        if self.graph is None:
            use_device(x.device)
            self.static = x.clone()
            with self.graph_factory.side_stream():
                for _ in range(WARMUP_STEPS):
                    self._forward()
            self.graph = self.graph_factory()
            self.graph.capture(self._forward)
        if x.shape != self.static.shape:
            return self._forward(x)
        self.static.copy_(x)
        return self.graph.replay()

    def _forward(self, x=None):
        return self.model(self.prepare(self.static if x is None else x))


def use_device(device):
    """The graph, its side stream and its memory pool belong to the current CUDA device: make it the data's
    (--device cuda:1 in a single process would otherwise capture on cuda:0)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def refusal(device, ranks):
    """Why --cuda_graph cannot run here, in words, or None: it captures on one CUDA device."""
    if device.type != "cuda" or ranks > 1:
        return (f"--cuda_graph captures the step on one CUDA device, not {device.type}"
                f"{f' x {ranks} ranks' if ranks > 1 else ''}: drop it")
    return None


def check_shapes(static, given):
    """A batch of another shape than the captured one would be read through the static buffers: refused."""
    for buffer, tensor in zip(static, given):
        if tensor.shape != buffer.shape:
            raise ValueError(f"a batch of shape {tuple(tensor.shape)} cannot replay a step captured for "
                             f"{tuple(buffer.shape)}: run it eagerly, or drop it as the training loop does")


def snapshot(model, optimizer):
    """Copies of what a warm-up step changes: the weights and buffers, Adam's state, the random state."""
    return {"model": {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()},
            "optimizer": {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                          for p, s in optimizer.state.items()},
            "random": random_state(next(model.parameters()).device)}


def restore(model, optimizer, kept):
    """Back to the snapshot, in place (the graph captures these very tensors). Adam's state of a fresh optimizer is
    zeroed: the zeros and step 0 Adam starts from."""
    with torch.no_grad():
        for name, value in model.state_dict(keep_vars=True).items():
            value.copy_(kept["model"][name])
        for param, state in optimizer.state.items():
            before = kept["optimizer"].get(param)
            for key, value in state.items():
                if not torch.is_tensor(value):
                    state[key] = before[key] if before else value
                elif before:
                    value.copy_(before[key])
                else:
                    value.zero_()
    set_random_state(kept["random"])


def random_state(device):
    return {"cpu": torch.get_rng_state(), "device": device,
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_random_state(state):
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], state["device"])


@contextlib.contextmanager
def kept_random_state(device):
    state = random_state(device)
    yield
    set_random_state(state)
