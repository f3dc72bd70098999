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
  4. peak memory of a run the size of the blog's recipe (50,000 + 10,000 images) per dropout_num;
  5. with --workers K: images/s of K training processes at once (study.py --workers K), sharing the cores,
     against one process with all of them;
  6. with --compile: the torch.compile'd step (and on CUDA the step captured as one CUDA graph) against the
     eager one, the compile and capture times apart, and the steps that pay them back.
The images are random uint8: speed does not depend on what the pictures show. Timings are the
median over --repeats blocks of --steps steps, the pipelines taking turns, after --warmup steps each;
ratios are the median over rounds of the ratio within a round.
Bad input: one line on stderr and exit 2, before any work. Ctrl-C: one line and exit 130; the files are
written only at the end.
"""
import statistics
import sys
import time
from pathlib import Path

import tools

if __name__ == "__main__":  # a stop during the imports that take seconds: one line, not a traceback
    tools.quiet_start("bench.py")
import matplotlib  # noqa: E402
import torch  # noqa: E402

import run  # noqa: E402
from benchmarks.pipelines import (VARIANTS, blog_style_pipeline, flops_per_image,  # noqa: E402
                                  images_per_second_at_once, peak_memory_in_fresh_process, peak_tflops, project_model,
                                  project_pipeline, round_ratios, seconds_per_step, sync)
from bookkeeping import hardware  # noqa: E402
from nn import MODEL_WIDTHS, fit_problem  # noqa: E402

matplotlib.use("Agg")  # files only, no window
import matplotlib.pyplot as plt  # noqa: E402

OVERHEAD_M = [0, 1, 2, 4, 8, 16, 32]  # dropout_num values of the overhead table
QUICK_OVERHEAD_M = [0, 8]  # --quick: the two that say the most
FULL = {"steps": 5, "warmup": 3, "repeats": 7, "memory_steps": 10}  # the timing defaults
QUICK = {"steps": 3, "warmup": 1, "repeats": 3, "memory_steps": 0}  # and --quick's
WORKER_ROUNDS = 3  # rounds of the runs-at-once table, each one process then K, all fresh
MIN_STEPS, MIN_REPEATS = 5, 3  # below these, the report says its timings are too short to trust


def parse_args(argv):
    p = run.Parser(prog="bench.py", description=__doc__.split("\n")[0], formatter_class=run.HelpFormatter)
    p.add_argument("--model", default="miniresnet", help="miniresnet or resnet18")
    p.add_argument("--batch_size", type=int, default=128, help="training batch")
    p.add_argument("--dropout_num", type=int, default=8, help="dropout samples of the pipeline comparison")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help="the 'default' rows' precision")
    p.add_argument("--augment", action="store_true", help="random crop and flip in both pipelines")
    p.add_argument("--compile", action="store_true", help="also time the torch.compile'd step (run.py --compile) "
                   "and, on CUDA, the step captured as a CUDA graph (--cuda_graph) against the eager one, with the "
                   "compile and capture times and the steps that pay them back")
    for flag, help in (("steps", "timed steps per block (on a GPU, use more: 100)"),
                       ("warmup", "untimed steps before the first block"),
                       ("repeats", "timed blocks per pipeline; the median is reported"),
                       ("memory_steps", "training steps of each peak-memory run (0: skip)")):
        p.add_argument(f"--{flag}", type=int, help=f"{help} (default: {FULL[flag]}; with --quick {QUICK[flag]})")
    p.add_argument("--workers", type=int, default=0, help="also time this many training processes at once, the "
                   "cores split between them, against one process with all of them: what study.py --workers gains "
                   "(0: skip)")
    p.add_argument("--out", default="outputs/bench", help="folder for bench.md and overhead.png")
    p.add_argument("--quick", action="store_true", help="a first look in about a tenth of the time: 3 blocks of 3 "
                   "steps after 1 warm-up step, overhead at dropout_num 0 and 8 only, no peak memory (the report says "
                   "its blocks are too short to trust); the flags above still choose their own")
    args = p.parse_args(argv)
    tools.require_path(args.out, "--out")
    for flag, value in (QUICK if args.quick else FULL).items():  # a flag given on the command line wins
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    return args


def check_args(args):
    """The numbers and the model, refused before a model or an image is made."""
    for flag in ("batch_size", "steps", "repeats"):
        if getattr(args, flag) < 1:
            raise tools.UserError(f"--{flag} must be 1 or more, got {getattr(args, flag)}")
    for flag in ("warmup", "memory_steps", "dropout_num"):
        if getattr(args, flag) < 0:
            raise tools.UserError(f"--{flag} must be 0 or more, got {getattr(args, flag)}")
    if args.workers < 0 or args.workers == 1:
        raise tools.UserError(f"--workers must be 0 (skip) or 2 or more, got {args.workers}")
    if args.model not in MODEL_WIDTHS:
        raise tools.UserError(f"unknown --model {args.model!r}: use one of {', '.join(MODEL_WIDTHS)}")


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
    tools.started()
    try:
        args = parse_args(argv)
        check_args(args)  # everything is checked before any work
        device = hardware.pick_device(args.device)
        problem = fit_problem(args.model, 10, max(args.dropout_num, *(QUICK_OVERHEAD_M if args.quick else OVERHEAD_M)),
                              batch_size=args.batch_size,
                              memory=hardware.memory_bytes(device))
        if problem:
            raise tools.UserError(problem)
        tools.check_writable(Path(args.out), "--out")
        with tools.interrupts():
            measure(args, device, argv, written)
        return 0
    except tools.UserError as e:
        print(f"bench.py: error: {e}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not isinstance(e, MemoryError) and "alloc" not in str(e):  # a real bug: let its traceback show
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
    """Times and peaks, printed as they come under their headings; the files (appended to `written`) at the end."""
    precision = hardware.resolve_precision(args.precision, device)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    hardware.configure_precision("fp32")  # fp32 pipelines in fp32, not TF32, as run.py trains them
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda" else
               f"{hardware.describe(device)}, {torch.get_num_threads()} threads") + f", torch {torch.__version__}"
    opening = (f"`python bench.py {' '.join(argv)}`: {args.model}, batch {args.batch_size}, {machine}; median of "
               f"{args.repeats} blocks of {args.steps} steps.")
    print(opening)
    report = [opening, ""]
    overhead_m = QUICK_OVERHEAD_M if args.quick else OVERHEAD_M
    report += section(*pipelines_table(args, device, precision))
    heading, table, ratios = overhead_table(args, device, precision, overhead_m)
    again = (f"The dropout_num={args.dropout_num} row is the setting of the pipelines table's 'project, {precision}' "
             "row, timed again in a separate phase: the two agree only as far as the machine's noise allows.")
    notes = [again] * (args.dropout_num in overhead_m) + [note for note in [short_blocks_note(args)] if note]
    report += section(heading, table, "\n\n".join(notes))
    if args.dropout_num >= 2:  # the variants differ only from two samples on
        report += section(*variants_table(args, device, precision))
    if args.compile:
        report += section(*compiled_table(args, device, precision))
    if args.memory_steps:
        report += section(*memory_table(args, device))
    if args.workers:
        report += section(*workers_table(args, precision))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_overhead(out / "overhead.png", ratios, f"{args.model}, batch {args.batch_size}, {device.type}, {precision}")
    written.append(str(out / "overhead.png"))
    tools.atomic_write(out / "bench.md", tools.text_writer("\n".join(report)))
    written.append(str(out / "bench.md"))
    print(f"written: {' and '.join(written)}")


def section(heading, table, note=""):
    """Print a table under its heading, as it comes; return the report's lines for it."""
    print(f"\n{heading}\n\n{table}" + (f"\n\n{note}" if note else ""))
    return [heading, "", table, ""] + ([note, ""] if note else [])


def pipelines_table(args, device, precision):
    """1. The blog-style pipeline against the project's, in fp32 and at the default precision, at M."""
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
        rows.append([name, f"{1e3 * statistics.median(ts):.1f}", per_second(ips),
                     f"{statistics.median(gain):.2f}x ({min(gain):.2f} - {max(gain):.2f})",
                     f"{tflops:.3f}", f"{tflops / peak:.1%}" if peak else "-"])
    if precision == "fp32":
        rows[-1][0] += " (fp32 is also the default on this device)"
    table = markdown_table(["pipeline", "ms/step", "images/s", "vs blog-style (lowest - highest round)", "TFLOP/s", "of peak"], rows)
    note = ("Training FLOPs per image (forward + backward, counted by torch's FlopCounterMode): "
            + ", ".join(f"{p} {f / 1e9:.3f} GFLOP" for p, f in flops.items()) + ".")
    return "### Pipelines", table, note


def overhead_table(args, device, precision, overhead_m):
    """2. The multi-sample overhead: step time for each M, relative to M = 0 in the same round."""
    times = seconds_per_step({mm: project_pipeline(args, device, mm, precision) for mm in overhead_m}, args, device)
    per_round = round_ratios(times, 0)
    ratios = {mm: statistics.median(r) for mm, r in per_round.items()}
    table = markdown_table(["dropout_num", "ms/step", "vs dropout_num=0", "lowest - highest round"],
                           [[str(mm), f"{1e3 * statistics.median(times[mm]):.2f}", f"{ratios[mm]:.3f}",
                             f"{min(per_round[mm]):.3f} - {max(per_round[mm]):.3f}"] for mm in overhead_m])
    return f"### Multi-sample overhead (project pipeline, {precision})", table, ratios


def variants_table(args, device, precision):
    """3. The three heads called multi-sample dropout, at M, side by side."""
    m = args.dropout_num
    pipelines = {label: project_pipeline(args, device, m, precision, reduce=reduce, heads=heads)
                 for label, reduce, heads, _ in VARIANTS}
    times = seconds_per_step(pipelines, args, device)
    per_round = round_ratios(times, VARIANTS[0][0])
    params = {label: sum(p.numel() for p in project_model(args, device, m, reduce, heads).classifier.parameters())
              for label, reduce, heads, _ in VARIANTS}
    table = markdown_table(["variant", "objective", "head parameters", "ms/step", "vs the paper's (lowest - highest round)"],
                           [[label, objective, f"{params[label]:,}", f"{1e3 * statistics.median(times[label]):.2f}",
                             f"{statistics.median(per_round[label]):.3f} ({min(per_round[label]):.3f} - "
                             f"{max(per_round[label]):.3f})"] for label, _, _, objective in VARIANTS])
    return f"### Variants of the head (project pipeline, {precision}, M={m})", table


def compiled_table(args, device, precision):
    """The torch.compile'd step (run.py --compile) and, on CUDA, torch.compile's reduce-overhead mode and the step
    captured as one graph (--cuda_graph), against the eager one at M; compiling or capturing is timed apart, as the
    first step's excess over a steady one."""
    m, modes = args.dropout_num, ["eager", "compiled"] + ["reduce-overhead", "graph"] * (device.type == "cuda")
    pipelines = {mode: project_pipeline(args, device, m, precision, mode=mode) for mode in modes}
    first_s = {}
    for mode in modes[1:]:
        sync(device)
        start = time.perf_counter()
        pipelines[mode](1)  # compiles the forward and backward, or warms up and captures the graph
        sync(device)
        first_s[mode] = time.perf_counter() - start
    times = seconds_per_step(pipelines, args, device)
    speedups = {name: [1 / r for r in rs] for name, rs in round_ratios(times, "eager").items()}  # eager time / its
    step_s = {mode: statistics.median(times[mode]) for mode in modes}
    flops, peak = flops_per_image(args, device, precision), peak_tflops(device, precision)
    rows, notes = [], []
    for mode in modes:
        ips, gain = args.batch_size / step_s[mode], speedups[mode]
        rows.append([mode, f"{1e3 * step_s[mode]:.1f}", per_second(ips),
                     f"{statistics.median(gain):.2f}x ({min(gain):.2f} - {max(gain):.2f})", f"{flops * ips / 1e12:.3f}",
                     f"{flops * ips / 1e12 / peak:.1%}" if peak else "-"])
        if mode in first_s:
            setup_s = first_s[mode] - step_s[mode]
            saved_s = step_s["eager"] - step_s[mode]
            payback = f"after {setup_s / saved_s:,.0f} steps" if saved_s > 0 else "never"
            work = "Warming up and capturing" if mode == "graph" else "Compiling"
            notes.append(f"{work} took {setup_s:.1f} s (the first {mode} step, {first_s[mode]:.1f} s, less a steady "
                         f"one); the faster steps pay it back {payback}.")
    table = markdown_table(["step", "ms/step", "images/s", "speed-up (lowest - highest round)", "TFLOP/s", "of peak"], rows)
    notes.append("An epoch of the blog's recipe is 390 steps at batch 128. Evaluation compiles or captures once more, "
                 "at its own batch size.")
    return (f"### Compiled step (project pipeline, {precision}, M={m}; speed-up = eager time / this step's)", table,
            " ".join(notes))


def memory_table(args, device):
    """4. Peak memory of a run the size of the blog's recipe, each M in a fresh process."""
    peaks = {mm: peak_memory_in_fresh_process(args, mm) for mm in (0, 8, 32)}
    table = markdown_table(["dropout_num", "peak while training (MiB)", "vs dropout_num=0", "peak of the run (MiB)"],
                           [[str(mm), f"{t / 2**20:,.0f}", f"{t / peaks[0][0]:.3f}", f"{w / 2**20:,.0f}"]
                            for mm, (t, w) in peaks.items()])
    kind = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak resident set of the process"
    return (f"### Peak memory ({kind}; 50,000 training images on the device, {args.memory_steps} steps, then "
            "evaluation of 10,000; 'while training' counts from after the data is on the device, the data included; "
            "'of the run' includes making the data and evaluating)"), table


def workers_table(args, precision):
    """5. K training processes at once against one, in rounds of fresh processes; images/s of all together."""
    counts = {1: torch.get_num_threads(), args.workers: tools.threads_per_worker(args.workers)}  # as study.py --workers
    rates = {k: [] for k in counts}
    for _ in range(WORKER_ROUNDS):
        for k, threads in counts.items():
            rates[k].append(images_per_second_at_once(args, k, threads))
    gains = {k: [r / one for r, one in zip(rs, rates[1])] for k, rs in rates.items()}
    table = markdown_table(["training processes at once", "threads each", "images/s, all together",
                            "vs one process (lowest - highest round)"],
                           [[str(k), str(counts[k]), per_second(statistics.median(rates[k])),
                             f"{statistics.median(gains[k]):.2f}x ({min(gains[k]):.2f} - {max(gains[k]):.2f})"]
                            for k in counts])
    return (f"### Runs at once (project pipeline, {precision}, M={args.dropout_num}; {WORKER_ROUNDS} rounds, each "
            f"process timing {args.repeats} x {args.steps} steps after {args.warmup} warm-up steps, from the first "
            "start to the last end)"), table


def per_second(images):
    """Images a second as a table shows them: whole numbers, but three digits below 100 (a tiny or shared run)."""
    return f"{images:,.0f}" if images >= 100 else f"{images:.3g}"


if __name__ == "__main__":
    sys.exit(main())
