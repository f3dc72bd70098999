"""Training speed and memory, measured side by side in one run (a benchmark, not a test).

    python bench.py                      # miniresnet, batch 128, on the default device
    python bench.py --model resnet18 --device cuda

Prints, and writes to --out (bench.md, overhead.png):
  1. images/s of the blog-style pipeline (per-image PIL/ToTensor/Normalize in DataLoader workers,
     NCHW fp32, a Python loop over the dropout samples) against this project's (uint8 data on the
     device, batched normalise, channels_last, one head call for all samples), in fp32 and at the
     default precision;
  2. the multi-sample overhead: step time for dropout_num 0..32, relative to 0;
  3. the head's variants at M = --dropout_num: the paper's, the mean of logits, separate heads;
  4. peak memory of a run the size of the blog's recipe (50,000 + 10,000 images) per dropout_num.
The images are random uint8: speed does not depend on what the pictures show. Timings are the
median over --repeats blocks of --steps steps, the pipelines taking turns, after --warmup steps each;
ratios are the median over rounds of the ratio within a round.
Bad input: one line on stderr and exit 2, before any work. Ctrl-C: one line and exit 130; the files are
written only at the end.
"""
import argparse
import itertools
import multiprocessing
import os
import resource
import signal
import statistics
import sys
import time
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms

import datasource
import hardware
import run
import tools
import train
from nn import MODEL_WIDTHS, build_model

matplotlib.use("Agg")  # files only, no window
import matplotlib.pyplot as plt  # noqa: E402

OVERHEAD_M = [0, 1, 2, 4, 8, 16, 32]  # dropout_num values of the overhead table
MIN_STEPS, MIN_REPEATS = 5, 3  # below these, the report says its timings are too short to trust
BLOG_RECIPE_IMAGES = (50_000, 10_000)  # CIFAR-10's train and test images, for the memory figure
# Dense peak TFLOP/s from NVIDIA's datasheets (SXM parts): bf16 tensor cores, and plain fp32 (not TF32,
# which hardware.configure_precision turns off for fp32).
PEAK_TFLOPS = {"H100": {"bf16": 989.4, "fp32": 66.9}, "H200": {"bf16": 989.4, "fp32": 66.9},
               "A100": {"bf16": 312.0, "fp32": 19.5}}


def parse_args(argv):
    p = run.Parser(prog="bench.py", description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="miniresnet", help="miniresnet or resnet18")
    p.add_argument("--batch_size", type=int, default=128, help="training batch")
    p.add_argument("--dropout_num", type=int, default=8, help="dropout samples of the pipeline comparison")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help="the 'default' rows' precision")
    p.add_argument("--augment", action="store_true", help="random crop and flip in both pipelines")
    p.add_argument("--compile", action="store_true", help="torch.compile the project's model")
    p.add_argument("--steps", type=int, default=5, help="timed steps per block (on a GPU, use more: 100)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before the first block")
    p.add_argument("--repeats", type=int, default=7, help="timed blocks per pipeline; the median is reported")
    p.add_argument("--memory_steps", type=int, default=10, help="training steps of each peak-memory run (0: skip)")
    p.add_argument("--out", default="outputs/bench", help="folder for bench.md and overhead.png")
    return p.parse_args(argv)


def check_args(args):
    """The numbers and the model, refused before a model or an image is made."""
    for flag in ("batch_size", "steps", "repeats"):
        if getattr(args, flag) < 1:
            raise tools.UserError(f"--{flag} must be 1 or more, got {getattr(args, flag)}")
    for flag in ("warmup", "memory_steps", "dropout_num"):
        if getattr(args, flag) < 0:
            raise tools.UserError(f"--{flag} must be 0 or more, got {getattr(args, flag)}")
    if args.model not in MODEL_WIDTHS:
        raise tools.UserError(f"unknown --model {args.model!r}: use one of {', '.join(MODEL_WIDTHS)}")


def pick_device(name):
    device = hardware.pick_device(name)  # refuses unknown names and absent devices
    if device.type not in ("cpu", "cuda", "mps"):  # torch knows more kinds ('meta', ...) than bench can time
        raise tools.UserError(f"--device {name}: use auto, cpu, cuda, cuda:N or mps")
    return device


def check_writable(out):
    """Refuse an --out that cannot be written now, not after minutes of measuring; nothing is created yet."""
    folder = next(p for p in [out, *out.parents] if p.exists())  # the folder the first mkdir would write in
    if not (folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)):
        raise tools.UserError(f"cannot write to {out} ({folder} is not a writable folder); choose another --out")


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


class NoBar:
    """train.train_epoch's progress bar, silent: it then reads the device once, at the last step."""

    def __init__(self, steps):
        self.steps, self.enabled = steps, False

    def update(self, *args):
        pass

    def close(self):
        pass


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


def project_pipeline(args, device, dropout_num, precision, images=None, reduce="loss", heads="shared"):
    """A function that trains n steps with run.py's own loop (train.train_epoch) and waits for the device."""
    torch.manual_seed(0)
    model = project_model(args, device, dropout_num, reduce, heads)
    optimizer, loss_fn = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True), nn.CrossEntropyLoss()
    x, y = datasource.to_device(*(images or synthetic_images(args.batch_size * (args.warmup + args.repeats * args.steps))), device)
    generator = torch.Generator(device=device).manual_seed(0)
    forward = torch.compile(model) if args.compile else model
    autocast, prepare = train.autocast_for(device, precision), datasource.input_transform("cifar10", device)

    def train_steps(n):
        batches = itertools.islice(datasource.train_batches(x, y, args.batch_size, generator, args.augment, prepare), n)
        train.train_epoch(forward, optimizer, loss_fn, batches, autocast, NoBar(n))
    train_steps.evaluate = lambda x, y: train.evaluate(forward, x, y, autocast, prepare, loss_fn)
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
    device = pick_device(args.device)
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
    context = multiprocessing.get_context("spawn")  # a fresh process: nothing left over from the others
    receiver, sender = context.Pipe(duplex=False)
    # daemon: after a Ctrl-C, bench's exit ends the child instead of waiting for it
    process = context.Process(target=peak_memory, args=(args, dropout_num, sender), daemon=True)
    process.start()  # it ignores SIGINT from its first line on: a Ctrl-C is bench's to handle
    sender.close()  # the child's copy remains: if it dies, recv() raises EOFError instead of waiting forever
    try:
        peaks = receiver.recv()
    except EOFError:  # it died before answering (out of memory, say): bench says so instead of a traceback
        raise tools.UserError(f"the peak-memory process for dropout_num={dropout_num} ended without an answer "
                              f"(exit code {process.join() or process.exitcode}); lower --batch_size, or --memory_steps 0")
    process.join()
    return peaks


def markdown_table(header, rows):
    return "\n".join(["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
                     + ["| " + " | ".join(row) + " |" for row in rows])


def plot_overhead(path, ratios, title):
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(list(ratios), list(ratios.values()), marker="o")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("symlog", base=2, linthresh=1)
    ax.set_xticks(list(ratios), [str(m) for m in ratios])
    ax.set_xticks([], minor=True)  # symlog puts minor ticks at -1 and -2, left of M = 0
    ax.set_xlim(-0.25, 1.25 * max(ratios))  # its default margin reaches -1.6
    ax.set(title=title, xlabel="dropout_num (M)", ylabel="step time / step time at M=0")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tools.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return ax  # for the tests


def short_blocks_note(args):
    """Why this run's timings cannot be trusted, or None. Too-short blocks gave one setting 7,583 ms per
    step in one table and 853 in the other (1 block of 1 step), without a word."""
    reasons = []
    if args.warmup == 0:
        reasons.append("--warmup 0: each pipeline's first block includes its one-time costs (first calls, "
                       "allocations), which can take seconds")
    if args.steps < MIN_STEPS:
        reasons.append(f"--steps {args.steps}: blocks of fewer than {MIN_STEPS} steps are mostly the machine's noise")
    if args.repeats < MIN_REPEATS:
        reasons.append(f"--repeats {args.repeats}: fewer than {MIN_REPEATS} blocks leave no meaningful median")
    if not reasons:
        return None
    return (f"**Too short to trust** ({'; '.join(reasons)}): the times of both tables, and any disagreement "
            f"between them, say little. Rerun with --warmup 1 or more, --steps {MIN_STEPS} or more and "
            f"--repeats {MIN_REPEATS} or more.")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    written = []  # files of this run, for an honest message after Ctrl-C
    try:
        args = parse_args(argv)
        check_args(args)  # everything is checked before any work
        device = pick_device(args.device)
        check_writable(Path(args.out))
        with tools.interrupts():
            measure(args, device, argv, written)
        return 0
    except tools.UserError as e:
        print(f"bench.py: error: {e}", file=sys.stderr)
        return 2
    except (MemoryError, torch.OutOfMemoryError) as e:
        print(f"bench.py: error: out of memory ({str(e).splitlines()[0][:120]}); lower --batch_size", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if "alloc" not in str(e):  # a real bug: let its traceback show
            raise
        print(f"bench.py: error: out of memory ({str(e).splitlines()[0][:120]}); lower --batch_size", file=sys.stderr)
        return 2
    except OSError as e:  # --out unwritable after all, or a name too long for the file system
        print(f"bench.py: error: cannot write to {args.out} ({e.strerror or e}); choose another --out", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        done = f"wrote only {' and '.join(written)}" if written else "nothing was written"
        print(f"bench.py: stopped by {tools.STOP.get('signal', 'SIGINT')}; {done}", file=sys.stderr)
        return tools.stopped_status()


def measure(args, device, argv, written):
    """Times and peaks, printed as they come; the files (appended to `written`) only at the end."""
    precision = hardware.resolve_precision(args.precision, device)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    hardware.configure_precision("fp32")  # fp32 pipelines in fp32, not TF32, as run.py trains them
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda" else
               f"{device.type}, {torch.get_num_threads()} threads") + f", torch {torch.__version__}"
    print(f"{args.model}, batch {args.batch_size}, {machine}; median of {args.repeats} x {args.steps} steps")
    report = [f"`python bench.py {' '.join(argv)}`: {args.model}, "
              f"batch {args.batch_size}, {machine}; median of {args.repeats} blocks of {args.steps} steps.", ""]

    # 1. the pipelines, side by side
    m = args.dropout_num
    pipelines = {f"blog-style (DataLoader, NCHW, fp32, loop over samples), M={m}": blog_style_pipeline(args, device, m),
                 f"project, fp32, M={m}": project_pipeline(args, device, m, "fp32")}
    if precision != "fp32":
        pipelines[f"project, {precision} (default), M={m}"] = project_pipeline(args, device, m, precision)
    times = seconds_per_step(pipelines, args, device)
    speedups = {name: [1 / r for r in rs] for name, rs in round_ratios(times, next(iter(times))).items()}
    flops = {p: flops_per_image(args, device, p) for p in {"fp32", precision}}
    rows = []
    for name, ts in times.items():
        ips, p = args.batch_size / statistics.median(ts), precision if "default" in name else "fp32"
        peak = peak_tflops(device, p)
        tflops = flops[p] * ips / 1e12
        gain = speedups[name]
        rows.append([name, f"{1e3 * statistics.median(ts):.1f}", f"{ips:,.0f}",
                     f"{statistics.median(gain):.2f}x ({min(gain):.2f} - {max(gain):.2f})",
                     f"{tflops:.3f}", f"{tflops / peak:.1%}" if peak else "-"])
    if precision == "fp32":
        rows[-1][0] += " (fp32 is also the default here)"
    table = markdown_table(["pipeline", "ms/step", "images/s", "vs blog-style (lowest - highest round)", "TFLOP/s", "of peak"], rows)
    report += ["### Pipelines", "", table, "",
               "Training FLOPs per image (forward + backward, counted by torch's FlopCounterMode): "
               + ", ".join(f"{p} {f / 1e9:.3f} GFLOP" for p, f in flops.items()) + ".", ""]
    print(table)

    # 2. the multi-sample overhead
    times = seconds_per_step({mm: project_pipeline(args, device, mm, precision) for mm in OVERHEAD_M}, args, device)
    per_round = round_ratios(times, 0)
    ratios = {mm: statistics.median(r) for mm, r in per_round.items()}
    table = markdown_table(["dropout_num", "ms/step", "vs dropout_num=0", "lowest - highest round"],
                           [[str(mm), f"{1e3 * statistics.median(times[mm]):.2f}", f"{ratios[mm]:.3f}",
                             f"{min(per_round[mm]):.3f} - {max(per_round[mm]):.3f}"] for mm in OVERHEAD_M])
    # one setting, two times: say why they differ
    again = f"The dropout_num={m} row is the setting of the pipelines table's 'project, {precision}' row, timed " \
        "again in a separate phase: the two agree only as far as the machine's noise allows."
    too_short = short_blocks_note(args)
    notes = ([again] if m in OVERHEAD_M else []) + ([too_short] if too_short else [])
    report += [f"### Multi-sample overhead (project pipeline, {precision})", "", table, "", "\n\n".join(notes), ""]
    print("\n".join([table, *notes]))

    # 3. the variants, at the pipelines' M
    pipelines = {label: project_pipeline(args, device, m, precision, reduce=reduce, heads=heads)
                 for label, reduce, heads, _ in VARIANTS}
    times = seconds_per_step(pipelines, args, device)
    per_round = round_ratios(times, VARIANTS[0][0])
    params = {label: sum(p.numel() for p in project_model(args, device, m, reduce, heads).classifier.parameters())
              for label, reduce, heads, _ in VARIANTS}
    table = markdown_table(["variant", "objective", "head parameters", "ms/step", "vs the paper's (lowest - highest round)"],
                           [[label, objective, f"{params[label]:,}", f"{1e3 * statistics.median(times[label]):.2f}",
                             f"{statistics.median(per_round[label]):.3f} ({min(per_round[label]):.3f} - {max(per_round[label]):.3f})"]
                            for label, _, _, objective in VARIANTS])
    report += [f"### Variants of the head (project pipeline, {precision}, M={m})", "", table, ""]
    print(table)

    # 4. peak memory, each dropout_num in its own process
    if args.memory_steps:
        peaks = {mm: peak_memory_in_fresh_process(args, mm) for mm in (0, 8, 32)}
        table = markdown_table(["dropout_num", "peak while training (MiB)", "vs dropout_num=0", "peak of the run (MiB)"],
                               [[str(mm), f"{t / 2**20:,.0f}", f"{t / peaks[0][0]:.3f}", f"{w / 2**20:,.0f}"]
                                for mm, (t, w) in peaks.items()])
        kind = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak resident set of the process"
        report += [f"### Peak memory ({kind}; 50,000 training images on the device, {args.memory_steps} steps, "
                   "then evaluation of 10,000; 'while training' counts from after the data is on the device, "
                   "the data included; 'of the run' includes making the data and evaluating)", "", table, ""]
        print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_overhead(out / "overhead.png", ratios, f"{args.model}, batch {args.batch_size}, {device.type}, {precision}")
    written.append(str(out / "overhead.png"))
    tools.atomic_write(out / "bench.md", lambda tmp: Path(tmp).write_text("\n".join(report)))
    written.append(str(out / "bench.md"))
    print(f"written: {' and '.join(written)}")


if __name__ == "__main__":
    sys.exit(main())
