"""Train a CIFAR ResNet with a multi-sample dropout head and save its curves.

    python run.py --dropout_num=0    # no dropout
    python run.py --dropout_num=1    # ordinary dropout
    python run.py --dropout_num=8    # multi-sample dropout, 8 samples

    python run.py --dropout_num 0 1 8 --seed 1 2 3   # a grid, one run after another

Each run lands in outputs/<model>_<dataset>_m<M>_p<p>_s<seed>-<hash>/; after each run the
finished runs of the same setup are overlaid in outputs/compare/<setup>/.
"""
import argparse
import itertools
import math
import os
import shlex
import sys
from pathlib import Path

import tools
from bookkeeping import runlock
from bookkeeping.experiment import DEFINING, GRID, IMAGE_SETS
from tools import UserError

IMAGE_MODELS = ["miniresnet", "resnet18"]  # nn.MODEL_WIDTHS's names (a test keeps them equal), without importing torch


PATH_FLAGS = ["data_dir", "output_dir", "resume", "eval", "compare"]  # an empty one is refused, never read as 'not given'


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults as a user types them (42, not [42]; a switch: off), except None: a flag that names a run or
    folder has no default."""

    def _get_help_string(self, action):
        if action.default is None or action.default == argparse.SUPPRESS:  # 0 is shown
            return action.help
        default = " ".join(map(str, action.default)) if isinstance(action.default, list) else action.default
        default = "off" if default is False else default
        return f"{action.help} (default: {default})"


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the whole usage block
        raise UserError(f"{message} (see python {self.prog} --help)")


def build_parser():
    p = Parser(prog="run.py", description="Multi-sample dropout on CIFAR-10, CIFAR-100 or SVHN, with the blog post's "
               "recipe by default. --seed, --dropout_num, --dropout_p and --rdrop_alpha take several values and "
               "run the grid: --dropout_num 0 1 8 (or --dropout_num=0 1 8, or --dropout_num=0,1,8).",
               formatter_class=HelpFormatter)
    p.add_argument("--dropout_num", type=int, nargs="+", default=[0], help="dropout samples M: 0 none, 1 plain dropout, M>1 multi-sample")
    p.add_argument("--dropout_p", type=float, nargs="+", default=[0.5], help="dropout probability")
    p.add_argument("--rdrop_alpha", type=float, nargs="+", default=[0.0], help="R-Drop: add (alpha/2) x the mean "
                   "symmetric KL between the dropout samples' predictions (needs --dropout_num 2 or more; 0: off)")
    p.add_argument("--head_hidden", type=int, default=0, help="the shared part after the dropout: 0, one Linear "
                   "(the blog's head); H > 0, Linear(features, H) -> ReLU -> Linear(H, classes)")
    p.add_argument("--pool", choices=["avg4", "avg2"], default="avg4", help="avg4: global average of the final 4x4 "
                   "map (the blog's); avg2: 2x2 averages (stride 2), the 2x2 grid kept and flattened, so the head sees "
                   "where a feature was")
    p.add_argument("--diversity", choices=["none", "flip", "pad", "flip+pad"], default="none", help="the paper's "
                   "diversity between the M samples (needs --pool avg2 and M >= 2): each sample gets its own copy of "
                   "the final 4x4 map before pooling. flip: samples M-M//2..M-1 see it mirrored left-right. pad: one "
                   "zero column, on the right of the map for even samples and on the left for odd ones, so the 2x2 "
                   "windows (stride 2; the one that does not fit is dropped) pool columns {0,1},{2,3} in the first and "
                   "{zero,0},{1,2} in the second: offset by one column. flip+pad: both. Evaluation is one plain pass: "
                   "no dropout, no flip, no padding")
    p.add_argument("--msd_reduce", choices=["loss", "logits"], default="loss", help="loss: the mean of the M samples' "
                   "losses (the paper); logits: one loss of the mean of the M samples' logits (the common Kaggle head)")
    p.add_argument("--msd_heads", choices=["shared", "separate"], default="shared", help="shared: every sample "
                   "through the same head (the paper); separate: M independently initialised copies of the head, one "
                   "per sample, and evaluation takes the mean of the M heads' logits")
    p.add_argument("--model", default="miniresnet", help=f"{' or '.join(IMAGE_MODELS)}")
    p.add_argument("--dataset", default="cifar10", help=f"{', '.join(IMAGE_SETS)}")
    p.add_argument("--epochs", type=int, default=20, help="epochs to train; more than a finished run continues it")
    p.add_argument("--batch_size", type=int, default=128, help="training batch; the last incomplete batch is dropped")
    p.add_argument("--lr", type=float, default=0.01, help="Adam learning rate")
    p.add_argument("--lr_milestone", type=int, default=10, help="epochs 1..N use lr, later ones lr x 0.1; 0: never")
    p.add_argument("--augment", action="store_true", help="random crop (4-pixel padding) and horizontal flip")
    p.add_argument("--seed", type=int, nargs="+", default=[42], help="initialisation, shuffling, augmentation and dropout")
    p.add_argument("--data_seed", type=int, default=0, help="which images --train_size/--test_size/--valid_split pick")
    p.add_argument("--train_size", type=int, default=None, help="train on a random subset of this many images (default: all)")
    p.add_argument("--test_size", type=int, default=None, help="evaluate on a random subset of this many images (default: all)")
    p.add_argument("--valid_split", type=int, default=0, help="hold out this many training images as the validation "
                   "set for the curves; the test set is then evaluated once, at the end (0: curves on the test set)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="autocast dtype; auto: bf16 where the device computes it natively, else fp32")
    p.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--data_dir", default="data", help="torchvision's root for --dataset (downloaded if missing), "
                   "or an image-folder copy: a folder or .tar/.tar.gz with train/<class>/* and test/<class>/*")
    p.add_argument("--output_dir", default="outputs", help="where run directories and comparisons land")
    p.add_argument("--overwrite", action="store_true", help="start the run afresh, deleting its earlier results")
    p.add_argument("--compile", action="store_true", help="torch.compile the model: a slow first step, then steps 1.06x "
                   "as fast on a Zen 4 CPU (docs/speed-and-memory.md); inductor draws its own dropout masks, so a compiled "
                   "run is another experiment, named _compiled and never compared with an eager one")
    p.add_argument("--cuda_graph", action="store_true", help="CUDA: capture the training step (forward, every "
                   "dropout sample, backward, Adam) and evaluation as CUDA graphs, replayed a launch each; Adam runs "
                   "capturable, so it is another experiment, named _graph and never compared with an eager one "
                   "(graphstep.py)")
    p.add_argument("--deterministic", action="store_true", help="CUDA: deterministic algorithms, no cudnn autotuning (slower)")
    p.add_argument("--sync_bn", action="store_true", help="under torchrun on GPUs: BatchNorm statistics over the global "
                   "batch (SyncBatchNorm) rather than each rank's batch_size/N images")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR; flags given must match it")
    p.add_argument("--eval", metavar="RUN_DIR", help="evaluate RUN_DIR's checkpoint on the test set, without training; "
                   "flags that define the run must match it; --device, --test_size, --precision and a --data_dir of the same data "
                   "choose how it is evaluated")
    p.add_argument("--compare", metavar="DIR", help="redraw the comparison of every setup from the finished runs under "
                   "DIR (their config.json and metrics.json are enough) into DIR/compare, or --output_dir's compare, "
                   "without training; takes no other flag but --output_dir")
    return p


def parse_args(argv):
    """(all flags with their defaults, only the flags the command line gave)."""
    argv = split_grid_values(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in PATH_FLAGS:
        tools.require_path(getattr(args, flag), f"--{flag}")
    unset = object()  # not a string, so argparse does not convert it
    parser.set_defaults(**{flag: unset for flag in vars(args)})
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not unset}
    return args, given


def split_grid_values(argv):
    """--seed=1 2 3 and --seed=1,2,3 as --seed 1 2 3: argparse takes one value after '=' and calls the rest unknown."""
    out = []
    for arg in argv:
        flag, equals, values = arg.partition("=")
        grid_flag = equals and flag.startswith("--") and flag[2:] in GRID
        out += [flag, *values.replace(",", " ").split()] if grid_flag else [arg]
    return out


def grid(args):
    """One namespace per (seed, dropout_p, dropout_num, rdrop_alpha) of the command, seeds outermost."""
    return [argparse.Namespace(**{**vars(args), **dict(zip(GRID, values))})
            for values in itertools.product(*(getattr(args, flag) for flag in GRID))]


def saved_args(checkpoint, explicit):
    """The flags of a saved run, with those the command gave on top (checked against it later)."""
    flags = {k: v[0] if k in GRID and v else v for k, v in vars(build_parser().parse_args([])).items()}
    saved = checkpoint["config"]
    # the experiment, its data and length come from the run; device, output folder, --overwrite from this command
    flags.update((k, saved[k]) for k in list(flags) if k in saved and (k in DEFINING or k in ("data_dir", "epochs")))
    for flag, value in explicit.items():
        if flag in GRID and len(value) > 1:
            raise UserError(f"--{flag} takes one value with --resume/--eval")
        flags[flag] = value[0] if flag in GRID else value
    return argparse.Namespace(**flags), checkpoint


def check_modes(given):
    """--eval, --resume and --overwrite each say what to do with a run: two of them contradict each other (resuming
    with --overwrite would delete the run it was asked to continue)."""
    modes = [f"--{flag}" for flag in ("eval", "resume", "overwrite") if given.get(flag)]
    if len(modes) > 1:
        raise UserError(f"{' and '.join(modes)} contradict each other: --eval evaluates a run, --resume continues "
                        "it, --overwrite trains it afresh; give one")


def check_args(args):
    if args.dataset not in IMAGE_SETS:
        raise UserError(f"unknown --dataset {args.dataset!r}: use one of {', '.join(IMAGE_SETS)}")
    for flag in ("epochs", "batch_size", "lr", "train_size", "test_size"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise UserError(f"--{flag} must be positive, got {value}")
    if not math.isfinite(args.lr):
        raise UserError(f"--lr must be a finite number, got {args.lr}")
    if args.valid_split < 0:
        raise UserError(f"--valid_split must be 0 or more, got {args.valid_split}")
    if args.lr_milestone < 0:
        raise UserError(f"--lr_milestone must be 0 (never) or a positive epoch, got {args.lr_milestone}")
    for flag, value in (("seed", args.seed), ("data_seed", args.data_seed)):
        if not 0 <= value < 2**32:  # numpy's seeds are unsigned 32-bit
            raise UserError(f"--{flag} must be in [0, 2**32), got {value}")
    if args.compile and args.cuda_graph:
        raise UserError("--compile and --cuda_graph are two ways to a faster step: give one")
    if args.model not in IMAGE_MODELS:
        raise UserError(f"unknown --model {args.model!r}: use one of {', '.join(IMAGE_MODELS)}")
    from nn import model_problem  # the model's rules live with it (torch: last, once the cheap checks passed)
    problem = model_problem(args.model, args.dropout_num, args.dropout_p, args.rdrop_alpha, args.head_hidden, args.pool,
                            args.diversity, args.msd_reduce, args.msd_heads)
    if problem:
        raise UserError(problem)


def main(argv=None, resume_command=None):
    """resume_command: what an interrupted run says resumes it (study.py gives its own command)."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    tools.started()
    torchrun = "RANK" in os.environ  # one worker of several: rank 0 alone prints
    args = None
    try:
        args, explicit = parse_args(argv)  # --help and flag errors end here, before the slow imports
        if args.compare:
            with tools.interrupts():
                return compare(Path(args.compare), explicit, Path(args.output_dir))
        check_modes(explicit)
        runs = [] if args.eval or args.resume else grid(args)
        for run in runs:  # every run of the grid is checked before any trains
            check_args(run)
        if torchrun and args.eval:
            raise UserError("--eval runs in one process: python run.py --eval RUN_DIR")
        with tools.interrupts():  # torch takes seconds to import: a stop meanwhile is a stop at once
            import train
            from bookkeeping import checkpointing  # only once there is a run to train or evaluate
            from bookkeeping import distributed, hardware
        with tools.stop_on_signals(second_stops_at_once=not torchrun), \
                distributed.process_group(hardware.pick_device(args.device)):  # torchrun's, around the whole command
            if args.eval:
                evaluation = saved_args(checkpointing.saved_checkpoint(args.eval), explicit)
                check_args(evaluation[0])  # --test_size 0, say: the same line as for training
                train.evaluate_saved_run(*evaluation)
                if tools.STOP:
                    raise tools.Interrupted(f"stopped by {tools.STOP['signal']} during --eval")
                return 0
            if args.resume:
                runs = [saved_args(checkpointing.saved_checkpoint(args.resume), explicit)[0]]
                check_args(runs[0])
            held = 0
            for run in runs:
                if distributed.stop_requested():
                    raise tools.Interrupted(f"stopped by {tools.STOP.get('signal', 'a signal')} between two runs of the grid")
                try:
                    train.report_comparison(*train.train_run(run, Path(args.resume) if args.resume else None))
                except runlock.RunHeld as e:  # another process trains it: on to the next run
                    held += 1
                    report(torchrun, f"run.py: {e}", 0)
            if distributed.stop_requested():  # it came during the last run's last save or redraw: that run is whole
                raise tools.Interrupted(f"stopped by {tools.STOP.get('signal', 'a signal')} as the last run finished (it is complete)")
            return runlock.HELD if held else 0
    except UserError as e:
        return report(torchrun, f"run.py: error: {e}", 2)
    except FloatingPointError as e:  # the row was not saved: a rerun resumes from the last one, --overwrite starts afresh
        return report(torchrun, f"run.py: error: the run diverged: {e}; lower --lr and run again: the same flags "
                      "diverge the same way, a lower --lr is a new run beside this one", 2)
    except (tools.Interrupted, KeyboardInterrupt) as e:  # KeyboardInterrupt: a second Ctrl-C, at once
        resume = shlex.join(a for a in argv if a != "--overwrite")  # rerunning must not start afresh
        launcher = "the same torchrun command with run.py" if torchrun else "python run.py"
        resume_command = resume_command or f"{launcher} {resume}"
        if args and args.compare:
            return report(torchrun, f"run.py: stopped by {tools.STOP.get('signal', 'SIGINT')}; the comparisons "
                          "already written are whole, and the one being drawn kept its earlier files", tools.stopped_status())
        return report(torchrun, f"run.py: {str(e) or 'stopped at once'}; resume with: {resume_command}",
                      tools.stopped_status())


def report(torchrun, line, status):
    """The one line on stderr (under torchrun, from rank 0 only: every rank meets the same error), and the status."""
    if not torchrun or os.environ["RANK"] == "0":
        print(line, file=sys.stderr)
    return status


def compare(folder, explicit, output_dir):
    """--compare DIR: the comparisons redrawn from the runs' own files, so no flag but where to draw them applies."""
    if set(explicit) - {"compare", "output_dir"}:
        raise UserError(f"--compare redraws from the runs' own config.json and takes no other flag but --output_dir; "
                        f"drop {', '.join('--' + f for f in sorted(set(explicit) - {'compare', 'output_dir'}))}")
    out = output_dir if "output_dir" in explicit else folder
    import trainingmonitor  # matplotlib: imported only for the work that draws
    try:
        return trainingmonitor.compare_all(folder, out)
    except OSError as e:
        raise UserError(f"cannot write the comparison under {out} ({e.strerror or e}); choose another --output_dir")


if __name__ == "__main__":
    sys.exit(main())
