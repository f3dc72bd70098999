"""Where a step's time goes: torch.profiler over run.py's own training and evaluation steps, per operator.

    python stepprofile.py                          # miniresnet, batch 128, M = 8, fp32 and bf16 (where native)
    python stepprofile.py --out docs/profile-zen4

For each precision, profiles --steps training steps (train.train_epoch, batch --batch_size) and --steps
evaluation steps (train.evaluate, train.EVAL_BATCH images each), after --warmup untimed ones, on random
uint8 images. Prints and writes profile.md: a step's wall time, the operators' share of it, the five
operators with the most self time, and matrix work (convolutions, linear layers) against everything else.
Self time is an operator's own time, not its children's; on a GPU it is the device's kernel time.
"""
import argparse
import os
import re
import sys
from pathlib import Path

import tools

if __name__ == "__main__":  # a stop during the imports that take seconds: one line, not a traceback
    tools.quiet_start("stepprofile.py")
os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler's own log lines: errors only (none on a CPU)
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import datasource  # noqa: E402
import run  # noqa: E402
import train  # noqa: E402
from bench import markdown_table  # noqa: E402
from benchmarks.pipelines import project_pipeline, sync, synthetic_images  # noqa: E402
from bookkeeping import hardware  # noqa: E402
from nn import MODEL_WIDTHS  # noqa: E402

TOP = 5  # operators named per step
MATRIX = re.compile(r"conv|addmm|\bmm\b|bmm|matmul|linear")  # aten::mkldnn_convolution, convolution_backward, addmm, mm


def parse_args(argv):
    p = run.Parser(prog="stepprofile.py", description=__doc__.split("\n")[0], formatter_class=run.HelpFormatter)
    p.add_argument("--model", default="miniresnet", help="miniresnet or resnet18")
    p.add_argument("--batch_size", type=int, default=128, help="training batch")
    p.add_argument("--dropout_num", type=int, default=8, help="dropout samples")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--precisions", default="auto", help="comma-separated fp32,bf16; auto: fp32, and bf16 where native")
    p.add_argument("--steps", type=int, default=10, help="profiled steps of each kind")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    p.add_argument("--out", default="outputs/profile", help="folder for profile.md")
    args = p.parse_args(argv)
    tools.require_path(args.out, "--out")
    for flag, least in (("batch_size", 1), ("steps", 1), ("warmup", 0), ("dropout_num", 0)):
        if getattr(args, flag) < least:
            raise tools.UserError(f"--{flag} must be {least} or more, got {getattr(args, flag)}")
    if args.model not in MODEL_WIDTHS:
        raise tools.UserError(f"unknown --model {args.model!r}: use one of {', '.join(MODEL_WIDTHS)}")
    return args


def precisions(args, device):
    if args.precisions == "auto":
        return ["fp32"] + ["bf16"] * (hardware.resolve_precision("auto", device) == "bf16")
    chosen = args.precisions.split(",")
    if not chosen or any(p not in ("fp32", "bf16") for p in chosen):
        raise tools.UserError(f"--precisions takes fp32, bf16 or both, comma-separated, got {args.precisions!r}")
    return chosen


def profiled(run_steps, device, steps):
    """(wall ms per step, [(operator, self ms per step)] by self time) of run_steps(steps)."""
    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * (device.type == "cuda")
    with profile(activities=activities) as prof:
        sync(device)
        with torch.profiler.record_function("steps"):  # its span is the wall time of all of them
            run_steps(steps)
            sync(device)
    events = prof.key_averages()
    self_us = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    wall_us = next(e.cpu_time_total for e in events if e.key == "steps")
    ops = sorted(((e.key, getattr(e, self_us) / 1000 / steps) for e in events if e.key != "steps"),
                 key=lambda op: -op[1])
    return wall_us / 1000 / steps, [op for op in ops if op[1] > 0]


def step_table(what, wall_ms, ops):
    """The report's lines for one kind of step."""
    total = sum(ms for _, ms in ops)
    matrix = sum(ms for name, ms in ops if MATRIX.search(name))
    rows = [[f"`{name}`", f"{ms:.2f}", f"{ms / total:.0%}"] for name, ms in ops[:TOP]]
    return [f"**{what}**: {wall_ms:.1f} ms a step, of which operators {total:.1f} ms ({total / wall_ms:.0%}); "
            f"matrix work (convolutions, linear layers) {matrix:.1f} ms = {matrix / total:.0%} of the operators' "
            f"time, everything else {total - matrix:.1f} ms = {1 - matrix / total:.0%}.", "",
            markdown_table(["operator", "self ms a step", "share of operators"], rows), ""]


def measure(args, device, argv):
    hardware.configure_precision("fp32")  # as run.py trains in fp32: no TF32
    torch.backends.cudnn.benchmark = device.type == "cuda"
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda" else
               f"{hardware.describe(device)}, {torch.get_num_threads()} threads") + f", torch {torch.__version__}"
    report = [f"`python stepprofile.py {' '.join(argv)}`: {args.model}, M = {args.dropout_num}, training batch "
              f"{args.batch_size}, evaluation batch {train.EVAL_BATCH}, {machine}; {args.steps} profiled steps of "
              f"each kind after {args.warmup} untimed.", ""]
    flags = argparse.Namespace(model=args.model, batch_size=args.batch_size, augment=False, compile=False,
                               warmup=0, repeats=1, steps=args.steps + args.warmup)  # project_pipeline's images
    eval_x, eval_y = datasource.to_device(*synthetic_images(train.EVAL_BATCH, seed=1), device)
    for precision in precisions(args, device):
        start = len(report)
        train_steps = project_pipeline(flags, device, args.dropout_num, precision)
        if args.warmup:  # train_epoch takes one step at least
            train_steps(args.warmup)
        report += [f"### {precision}", ""]
        report += step_table("Training step", *profiled(train_steps, device, args.steps))

        def evaluate(n):
            for _ in range(n):
                train_steps.evaluate(eval_x, eval_y)
        evaluate(args.warmup)
        report += step_table("Evaluation step", *profiled(evaluate, device, args.steps))
        print("\n".join(report[start:]), flush=True)
    return report


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    tools.started()
    try:
        args = parse_args(argv)
        device = hardware.pick_device(args.device)
        chosen = precisions(args, device)  # refused before any work
        tools.check_writable(Path(args.out), "--out")
        with tools.interrupts():
            report = measure(args, device, argv)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        tools.atomic_write(out / "profile.md", tools.text_writer("\n".join(report)))
        print(f"written: {out / 'profile.md'} ({', '.join(chosen)})")
        return 0
    except tools.UserError as e:
        print(f"stepprofile.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stepprofile.py: stopped by {tools.STOP.get('signal', 'SIGINT')}; nothing was written", file=sys.stderr)
        return tools.stopped_status()


if __name__ == "__main__":
    sys.exit(main())
