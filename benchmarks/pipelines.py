"""What bench.py times: the blog-style and this project's training pipelines, side by side, and a run's peak memory.

The blog-style pipeline does what the blog's code does: per-image PIL/ToTensor/Normalize in DataLoader
workers, NCHW fp32, a Python loop over the dropout samples. The project's is run.py's own loop
(train.train_epoch) on uint8 data on the device, batched normalisation, channels_last, one head call
for all samples. The images are random uint8: speed does not depend on what the pictures show.
"""
import argparse
import itertools
import multiprocessing
import multiprocessing.connection
import os
import resource
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms

import datasource
import graphstep
import tools
import train
from bookkeeping import hardware
from nn import build_model

BLOG_RECIPE_IMAGES = (50_000, 10_000)  # CIFAR-10's train and test images, for the memory figure
# Dense peak TFLOP/s from NVIDIA's datasheets (SXM parts): bf16 tensor cores, and plain fp32 (not TF32,
# which hardware.configure_precision turns off for fp32).
PEAK_TFLOPS = {"H100": {"bf16": 989.4, "fp32": 66.9}, "H200": {"bf16": 989.4, "fp32": 66.9},
               "A100": {"bf16": 312.0, "fp32": 19.5}}


class BlogStyleImages(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR10 does per item: a uint8 HWC array -> a PIL image -> the transform."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


class BlogStyleNet(nn.Module):
    """The blog code's forward: the backbone once, then a Python loop with a head call per dropout sample."""

    def __init__(self, resnet):
        super().__init__()
        self.resnet = resnet

    def forward(self, x, target, loss_fn):
        features, msd = self.resnet.features(x), self.resnet.classifier
        if msd.num_samples == 0:
            logits = msd.head(features)
            return logits, loss_fn(logits, target)
        outputs = [msd.head(F.dropout(features, msd.p, training=True)) for _ in range(msd.num_samples)]
        return sum(outputs) / len(outputs), sum(loss_fn(o, target) for o in outputs) / len(outputs)


def synthetic_images(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.int64)


def blog_style_pipeline(args, device, dropout_num):
    """A function that trains n steps the blog code's way and waits for the device."""
    torch.manual_seed(0)
    model = BlogStyleNet(build_model(args.model, 10, dropout_num, 0.5)).to(device)
    optimizer, loss_fn = torch.optim.Adam(model.parameters(), lr=1e-3), nn.CrossEntropyLoss()
    augment = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if args.augment else []
    transform = transforms.Compose(augment + [transforms.ToTensor(), transforms.Normalize(*datasource.STATS["cifar10"])])
    loader = torch.utils.data.DataLoader(
        BlogStyleImages(*synthetic_images(args.batch_size * (args.warmup + args.repeats * args.steps)), transform),
        batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=os.cpu_count(),
        pin_memory=device.type == "cuda", persistent_workers=True)
    batches = itertools.chain.from_iterable(itertools.repeat(loader))  # epoch after epoch, workers kept

    def train_steps(n):
        model.train()
        for xb, yb in itertools.islice(batches, n):
            logits, loss = model(xb.to(device), yb.to(device), loss_fn)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss.item()  # the blog code's progress bar reads the loss every step
    return train_steps


def project_model(args, device, dropout_num, reduce="loss", heads="shared"):
    """The network as run.py builds it (train.make_model: same layout), 10 classes, p = 0.5, no R-Drop."""
    flags = argparse.Namespace(model=args.model, dropout_num=dropout_num, dropout_p=0.5, rdrop_alpha=0.0,
                               head_hidden=0, pool="avg4", diversity="none",  # the blog's head
                               msd_reduce=reduce, msd_heads=heads)
    return train.make_model(flags, 10, device)


# The variants that public code calls multi-sample dropout: (label, reduce, heads, objective in one line)
VARIANTS = [("the paper: shared head, mean of losses", "loss", "shared", "mean over the M samples of CE(head(drop_i(f)), y)"),
            ("mean of logits (the common Kaggle head)", "logits", "shared", "CE(mean over the M samples of head(drop_i(f)), y)"),
            ("separate heads", "loss", "separate", "mean over the M samples of CE(head_i(drop_i(f)), y)")]


def project_pipeline(args, device, dropout_num, precision, images=None, reduce="loss", heads="shared", mode="eager"):
    """A function that trains n steps with run.py's own loop (train.train_epoch) and waits for the device; mode:
    eager, compiled (the model under torch.compile, as run.py --compile trains it), reduce-overhead (torch.compile's
    mode that replays its own CUDA graphs of the forward and backward) or graph (the whole step captured as a CUDA
    graph, as run.py --cuda_graph trains it)."""
    torch.manual_seed(0)
    model, graph = project_model(args, device, dropout_num, reduce, heads), mode == "graph"
    optimizer = torch.optim.Adam(model.parameters(), lr=torch.tensor(1e-3, device=device) if graph else 1e-3,
                                 foreach=True, capturable=graph)
    x, y = datasource.to_device(*(images or synthetic_images(args.batch_size * (args.warmup + args.repeats * args.steps))), device)
    generator = torch.Generator(device=device).manual_seed(0)
    forward = (hardware.compiled(model, "reduce-overhead" if mode == "reduce-overhead" else None)
               if mode in ("compiled", "reduce-overhead") else model)
    autocast, prepare = train.autocast_for(device, precision, graph), datasource.input_transform("cifar10", device)
    train_step = train.make_step(forward, optimizer, autocast, graph)
    logits_of = graphstep.GraphedForward(forward, prepare) if graph else None

    def train_steps(n):
        batches = itertools.islice(datasource.train_batches(x, y, args.batch_size, generator, args.augment, prepare), n)
        train.train_epoch(forward, train_step, batches, n)  # one read, at the last step
    train_steps.evaluate = lambda x, y: train.evaluate(forward, x, y, autocast, prepare, logits_of)
    return train_steps


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_step(pipelines, args, device):
    """{name: [seconds per step of each block]}; the pipelines take turns, block after block, so a slow
    spell of the machine hits all of them in the same round."""
    for train_steps in pipelines.values():
        if args.warmup:
            train_steps(args.warmup)
    times = {name: [] for name in pipelines}
    for _ in range(args.repeats):
        for name, train_steps in pipelines.items():
            sync(device)
            start = time.perf_counter()
            train_steps(args.steps)
            sync(device)
            times[name].append((time.perf_counter() - start) / args.steps)
    return times


def round_ratios(times, reference):
    """{name: [its time / the reference's time, in each round]}: within a round the machine was the same."""
    return {name: [t / r for t, r in zip(ts, times[reference])] for name, ts in times.items()}


def flops_per_image(args, device, precision):
    """Forward + backward FLOPs of one training step of the project's model, per image."""
    model = project_model(args, device, args.dropout_num)
    x = torch.randn(args.batch_size, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.zeros(args.batch_size, dtype=torch.long, device=device)
    with FlopCounterMode(display=False) as counter, train.autocast_for(device, precision):
        model(x, y, nn.CrossEntropyLoss())[1].backward()
    return counter.get_total_flops() / args.batch_size


def peak_tflops(device, precision):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak[precision] for key, peak in PEAK_TFLOPS.items() if key in name), None)


def reset_peak_memory(device):
    """Start the peak over; the process's peak resident set can be reset on Linux only."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif sys.platform.startswith("linux"):
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, see `man 5 proc`


def peak_memory_since_reset(device):
    """Bytes. On Linux the process's own VmHWM: ru_maxrss would include the parent's peak across spawn's exec."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if sys.platform.startswith("linux"):
        return 1024 * int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # macOS: bytes, and the whole process's peak


def peak_memory(args, dropout_num, connection):
    """(Run in a fresh process.) Peak memory of a run the size of the blog's recipe: 50,000 training images on the
    device, --memory_steps training steps, then evaluation of 10,000 test images. Sends the peak while
    training (data on the device included) and the peak of the whole process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    device = hardware.pick_device(args.device)  # bench.py checked it
    n_train, n_test = BLOG_RECIPE_IMAGES
    precision = hardware.resolve_precision(args.precision, device)
    train_steps = project_pipeline(args, device, dropout_num, precision, synthetic_images(n_train))
    test = datasource.to_device(*synthetic_images(n_test, seed=1), device)
    making_data = peak_memory_since_reset(device)
    reset_peak_memory(device)
    train_steps(args.memory_steps)
    training = peak_memory_since_reset(device)
    train_steps.evaluate(*test)
    connection.send((training, max(making_data, peak_memory_since_reset(device))))


def peak_memory_in_fresh_process(args, dropout_num):
    return answers_of_fresh_processes(peak_memory, [(args, dropout_num)], f"the peak-memory process for dropout_num="
                                      f"{dropout_num}", "lower --batch_size, or --memory_steps 0")[0]


def answers_of_fresh_processes(target, arguments, what, advice):
    """target(*a, connection) in a fresh process for each a in arguments, all at once; their answers in that order.
    One that ends without answering (out of memory, say) ends the others, and bench says so in one line."""
    context = multiprocessing.get_context("spawn")  # fresh processes: nothing left over from the others
    processes, receivers = [], []
    for a in arguments:
        receiver, sender = context.Pipe(duplex=False)
        # daemon: after a Ctrl-C, bench's exit ends the children instead of waiting for them
        processes.append(context.Process(target=target, args=(*a, sender), daemon=True))
        processes[-1].start()  # they ignore SIGINT from their first line on: a Ctrl-C is bench's to handle
        sender.close()  # the child's copy remains: if it dies, its end reads as closed instead of waiting forever
        receivers.append(receiver)
    answers = {}
    while len(answers) < len(receivers):
        for ready in multiprocessing.connection.wait([r for i, r in enumerate(receivers) if i not in answers]):
            i = receivers.index(ready)
            try:
                answers[i] = ready.recv()
            except EOFError:
                processes[i].join()
                for process in processes:  # the others may wait for it (timed_training's start), or outlive bench
                    process.terminate()
                    process.join()
                raise tools.UserError(f"{what} ended without an answer (exit code {processes[i].exitcode}); "
                                      f"{advice}") from None
    for process in processes:
        process.join()
    return [answers[i] for i in range(len(receivers))]


def timed_training(args, threads, start, connection):
    """(Run in a fresh process.) Train --warmup steps, wait at `start` for the processes timed with this one, then
    train --repeats x --steps steps; send (start, end) in seconds since the epoch, comparable across processes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    device = hardware.pick_device(args.device)  # bench.py checked it
    train_steps = project_pipeline(args, device, args.dropout_num, hardware.resolve_precision(args.precision, device))
    if args.warmup:
        train_steps(args.warmup)
    start.wait()  # if one dies first, bench ends the others
    began = time.time()
    train_steps(args.repeats * args.steps)
    sync(device)
    connection.send((began, time.time()))


def images_per_second_at_once(args, processes, threads):
    """Images/s of `processes` fresh processes training at once, `threads` each."""
    start = multiprocessing.get_context("spawn").Barrier(processes)
    spans = answers_of_fresh_processes(timed_training, [(args, threads, start)] * processes,
                                       "a process of the runs-at-once table", "lower --batch_size, or leave out --workers")
    return images_per_second(spans, args.repeats * args.steps * args.batch_size)


def images_per_second(spans, images_each):
    """All the processes' images over the time from the first one's start to the last one's end."""
    return len(spans) * images_each / (max(end for _, end in spans) - min(began for began, _ in spans))
