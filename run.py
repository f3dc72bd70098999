"""Train a CIFAR ResNet with a multi-sample dropout head and save its curves.

    python run.py --dropout_num=0    # no dropout
    python run.py --dropout_num=1    # ordinary dropout
    python run.py --dropout_num=8    # multi-sample dropout, 8 samples

    python run.py --dropout_num 0 1 8 --seed 1 2 3   # a grid, one run after another

Each run lands in outputs/<model>_<dataset>_m<M>_p<p>_s<seed>-<hash>/; after each run the
finished runs of the same setup are overlaid in outputs/compare/<setup>/.
"""
import argparse
import hashlib
import itertools
import json
import math
import shlex
import shutil
import signal
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import datasource
import progressbar
import tools
import trainingmonitor
from nn import MODEL_WIDTHS, build_model
from tools import UserError

# The flags that change a run's numbers (with the data's identity and the resolved precision).
# They name the run directory and decide what may be resumed and what may be compared.
DEFINING = ["dataset", "data_source", "model", "dropout_num", "dropout_p", "batch_size", "lr", "lr_milestone",
            "augment", "seed", "data_seed", "train_size", "test_size", "valid_split", "precision", "rdrop_alpha"]
LATER_FLAGS = {"valid_split": 0, "rdrop_alpha": 0.0}  # defining flags added after the first runs, left out of the hash at this value
GRID = ["seed", "dropout_p", "dropout_num", "rdrop_alpha"]  # flags that take several values; runs differing only in these are compared

IMAGE_SETS = ["cifar10", "cifar100", "svhn"]
# Defaults that depend on --dataset: the image sets follow the multi-sample dropout post (seed 000);
# quadratic, the dropout regression post (seed 001): one example per step, 3000 epochs.
DEFAULTS = {"images": {"model": "miniresnet", "dropout_p": [0.5], "lr": 0.01, "lr_milestone": 10, "epochs": 20,
                       "batch_size": 128},
            "quadratic": {"model": "mlp", "dropout_p": [0.4], "lr": 0.005, "lr_milestone": 0, "epochs": 3000,
                          "batch_size": 1}}
LOG_EVERY = {"quadratic": 100}  # epochs per table row, metrics row and checkpoint (default 1)
REDRAW_S = 10  # seconds between redraws of a run's figures (~0.3 s each); the last row always redraws
EVAL_BATCH = 1000  # images per evaluation step; no gradients, so larger than training's


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None: those flags default per data set and say so in their help."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def per_dataset(flag):
    value = lambda kind: ", ".join(map(str, DEFAULTS[kind][flag])) if flag in GRID else DEFAULTS[kind][flag]
    return f"(default: {value('images')} for the images, {value('quadratic')} for quadratic)"


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the whole usage block
        raise UserError(f"{message} (see python run.py --help)")


def build_parser():
    p = Parser(prog="run.py", description="Multi-sample dropout on CIFAR-10, CIFAR-100, SVHN or seed 001's "
               "regression. --seed, --dropout_num, --dropout_p and --rdrop_alpha take several values and run the grid.", formatter_class=HelpFormatter)
    p.add_argument("--dropout_num", type=int, nargs="+", default=[0], help="dropout samples M: 0 none, 1 plain dropout, M>1 multi-sample")
    p.add_argument("--dropout_p", type=float, nargs="+", help=f"dropout probability {per_dataset('dropout_p')}")
    p.add_argument("--rdrop_alpha", type=float, nargs="+", default=[0.0], help="R-Drop: add (alpha/2) x the mean "
                   "symmetric KL between the dropout samples' predictions (needs --dropout_num 2 or more; 0: off)")
    p.add_argument("--model", help=f"{', '.join(MODEL_WIDTHS)} for the images; mlp (the post's network) for quadratic "
                   f"{per_dataset('model')}")
    p.add_argument("--dataset", default="cifar10", help=f"{', '.join(IMAGE_SETS)}, or quadratic: the dropout "
                   "regression demo of seed 001 (y = x^2 from ten noisy points)")
    p.add_argument("--epochs", type=int, help=f"epochs to train; more than a finished run continues it {per_dataset('epochs')}")
    p.add_argument("--batch_size", type=int, help=f"training batch; the last incomplete batch is dropped {per_dataset('batch_size')}")
    p.add_argument("--lr", type=float, help=f"Adam learning rate {per_dataset('lr')}")
    p.add_argument("--lr_milestone", type=int, help="epochs 1..N use lr, later ones lr x 0.1; 0: never; quadratic "
                   f"sets the lr per block of 100 epochs, so N is a multiple of 100 {per_dataset('lr_milestone')}")
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
    p.add_argument("--compile", action="store_true", help="torch.compile the model (a slow first epoch, then faster "
                   "steps on a GPU; numbers may differ in the last bits, so not for bit-identical resumes)")
    p.add_argument("--deterministic", action="store_true", help="CUDA: deterministic algorithms, no cudnn autotuning (slower)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR; flags given must match it")
    p.add_argument("--eval", metavar="RUN_DIR", help="evaluate RUN_DIR's checkpoint on the test set, without training")
    p.add_argument("--compare", metavar="DIR", help="redraw the comparison of every setup from the finished runs under "
                   "DIR (their config.json and metrics.json are enough), without training; takes no other flag")
    return p


def parse_args(argv):
    """(all flags with their defaults, only the flags the command line gave)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    unset = object()  # not a string, so argparse does not convert it
    parser.set_defaults(**{flag: unset for flag in vars(args)})
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not unset}
    return args, given


def with_dataset_defaults(args):
    """The flags left unset, filled in from --dataset's defaults."""
    defaults = DEFAULTS["quadratic" if args.dataset == "quadratic" else "images"]
    return argparse.Namespace(**{k: defaults[k] if v is None and k in defaults else v for k, v in vars(args).items()})


def grid(args):
    """One namespace per (seed, dropout_p, dropout_num, rdrop_alpha) of the command, seeds outermost."""
    args = with_dataset_defaults(args)
    return [argparse.Namespace(**{**vars(args), **dict(zip(GRID, values))})
            for values in itertools.product(*(getattr(args, flag) for flag in GRID))]


def saved_args(run_dir, explicit):
    """The flags of the run saved in run_dir, with those the command gave on top (checked against it later)."""
    path = Path(run_dir) / "last.pt"
    if not path.is_file():
        raise UserError(f"{run_dir} holds no checkpoint (last.pt); give a run directory of an earlier run "
                        "(outputs/<run name>/, or the --output_dir it used)")
    checkpoint = tools.load_checkpoint(path)
    flags = {k: v[0] if k in GRID and v else v for k, v in vars(build_parser().parse_args([])).items()}
    saved = checkpoint["config"]
    # the experiment, its data and length come from the run; device, output folder, --overwrite from this command
    flags.update((k, saved[k]) for k in list(flags) if k in saved and (k in DEFINING or k in ("data_dir", "epochs")))
    for flag, value in explicit.items():
        if flag in GRID and len(value) > 1:
            raise UserError(f"--{flag} takes one value with --resume/--eval")
        flags[flag] = value[0] if flag in GRID else value
    return with_dataset_defaults(argparse.Namespace(**flags)), checkpoint


def check_args(args):
    if args.dropout_num < 0:
        raise UserError(f"--dropout_num must be 0 or more, got {args.dropout_num}")
    if not 0 <= args.dropout_p < 1:
        raise UserError(f"--dropout_p must be in [0, 1), got {args.dropout_p}")
    if args.dataset not in IMAGE_SETS + ["quadratic"]:
        raise UserError(f"unknown --dataset {args.dataset!r}: use one of {', '.join(IMAGE_SETS)} or quadratic")
    for flag in ("epochs", "batch_size", "lr", "train_size", "test_size"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise UserError(f"--{flag} must be positive, got {value}")
    if not math.isfinite(args.lr):
        raise UserError(f"--lr must be a finite number, got {args.lr}")
    if not (0 <= args.rdrop_alpha < math.inf):
        raise UserError(f"--rdrop_alpha must be 0 (off) or a positive number, got {args.rdrop_alpha}")
    if args.rdrop_alpha and args.dropout_num < 2:
        raise UserError(f"--rdrop_alpha compares dropout samples, so it needs --dropout_num 2 or more, got {args.dropout_num}")
    if args.valid_split < 0:
        raise UserError(f"--valid_split must be 0 or more, got {args.valid_split}")
    if args.lr_milestone < 0:
        raise UserError(f"--lr_milestone must be 0 (never) or a positive epoch, got {args.lr_milestone}")
    for flag, value in (("seed", args.seed), ("data_seed", args.data_seed)):
        if not 0 <= value < 2**32:  # numpy's seeds are unsigned 32-bit
            raise UserError(f"--{flag} must be in [0, 2**32), got {value}")
    if args.dataset == "quadratic":
        check_quadratic_args(args)
    elif args.model not in MODEL_WIDTHS:
        raise UserError(f"unknown --model {args.model!r}: use one of {', '.join(MODEL_WIDTHS)}")


def check_quadratic_args(args):
    """The regression demo has ten fixed points and one network: the image-only flags are errors, not ignored."""
    if args.model != "mlp":
        raise UserError(f"--dataset quadratic trains the post's network, --model mlp, not {args.model!r}")
    for flag, off in (("train_size", None), ("test_size", None), ("valid_split", 0), ("augment", False), ("rdrop_alpha", 0)):
        if getattr(args, flag) != off:
            raise UserError(f"--{flag} is for the image data sets; drop it with --dataset quadratic")
    every = LOG_EVERY["quadratic"]
    if args.lr_milestone % every:  # the lr is set once per row of `every` epochs
        raise UserError(f"--lr_milestone must be a multiple of {every} with --dataset quadratic, got {args.lr_milestone}")


def short_hash(values):
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:8]


def defining_flags(config):
    """The values that define the experiment; a later flag at its default is left out, so older runs keep their names."""
    values = {k: config.get(k, LATER_FLAGS.get(k)) for k in DEFINING}
    return {k: v for k, v in values.items() if not (k in LATER_FLAGS and v == LATER_FLAGS[k])}


def setup_flags(config):
    """The defining flags that are not grid flags: what every run of one comparison shares."""
    return {k: config.get(k, LATER_FLAGS.get(k)) for k in DEFINING if k not in GRID}


def run_identity(config):
    """(run directory name, setup name) from the defining flags."""
    defining = defining_flags(config)
    setup = {k: v for k, v in defining.items() if k not in GRID}
    c = config
    rdrop = f"_r{c['rdrop_alpha']}" if c.get("rdrop_alpha") else ""
    run = f"{c['model']}_{c['dataset']}_m{c['dropout_num']}_p{c['dropout_p']}{rdrop}_s{c['seed']}-{short_hash(defining)}"
    return run, f"{c['model']}_{c['dataset']}-{short_hash(setup)}"


def check_writable(folder):
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise UserError(f"cannot write to {folder} ({e.strerror or e}); choose another --output_dir")


def previous_checkpoint(run_dir, config):
    """The run's last checkpoint if it has one, after checking it is the same experiment."""
    path = run_dir / "last.pt"
    if not path.exists():
        return None
    checkpoint = tools.load_checkpoint(path)
    saved, wanted = defining_flags(checkpoint["config"]), defining_flags(config)
    for flag in DEFINING:
        if saved.get(flag) != wanted.get(flag):
            raise UserError(f"{path} is another experiment: its --{flag} is {saved.get(flag)!r}, "
                            f"this command's {wanted.get(flag)!r}; use another --output_dir or --overwrite")
    return checkpoint


def split(data, args):
    """(train, valid, test) index arrays in the data's order; --data_seed alone picks them.

    The validation images (--valid_split of them, none by default) come out of the training set.
    """
    n_train, n_test = len(data["train_y"]), len(data["test_y"])
    rng = np.random.default_rng(args.data_seed)
    train_order, test_order = rng.permutation(n_train), rng.permutation(n_test)
    train_size = n_train - args.valid_split if args.train_size is None else args.train_size
    test_size = n_test if args.test_size is None else args.test_size
    if args.valid_split + train_size > n_train or test_size > n_test:
        raise UserError(f"asked for {args.valid_split} validation + {train_size} training images of {n_train} and "
                        f"{test_size} test images of {n_test}; lower --train_size/--valid_split/--test_size")
    valid = train_order[:args.valid_split]
    train = train_order[args.valid_split:args.valid_split + train_size]
    return np.sort(train), np.sort(valid), np.sort(test_order[:test_size])


def to_device(x, y, device):
    """uint8 NHWC images -> uint8 NCHW on the device (normalised per batch); other arrays as they are."""
    x = torch.from_numpy(x)
    return (x.permute(0, 3, 1, 2).contiguous() if x.dim() == 4 else x).to(device), torch.from_numpy(y).to(device)


def load_splits(args, device):
    """{'train', 'valid', 'test'}: (inputs, targets) on the device, and the number of outputs."""
    if args.dataset == "quadratic":  # the post's ten points; validation and test: y = x^2 on a grid
        data = datasource.quadratic()
        train, grid_points = to_device(data["train_x"], data["train_y"], device), to_device(data["test_x"], data["test_y"], device)
        return {"train": train, "valid": grid_points, "test": grid_points}, 1
    data = datasource.load(args.data_dir, args.dataset)
    train, valid, test = split(data, args)
    splits = {"train": to_device(data["train_x"][train], data["train_y"][train], device),
              "test": to_device(data["test_x"][test], data["test_y"][test], device)}
    # without a validation split the curves are on the test set, as in the seed
    splits["valid"] = to_device(data["train_x"][valid], data["train_y"][valid], device) if args.valid_split else splits["test"]
    return splits, len(data["classes"])


def input_transform(dataset, device):
    """uint8 images -> normalised float32, channels_last; the regression's x values go in as they are."""
    if dataset == "quadratic":
        return lambda x: x
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) * 255 for v in datasource.STATS[dataset])
    return lambda x: ((x.float() - mean) / std).contiguous(memory_format=torch.channels_last)


def random_crop_flip(x, generator, pad=4):
    """Per image: a random 32x32 window of the zero-padded image, and a coin-flip mirror."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy, dx = torch.randint(0, 2 * pad + 1, (2, b, 1), generator=generator, device=x.device)
    rows, cols = dy + torch.arange(h, device=x.device), dx + torch.arange(w, device=x.device)
    crops = padded[torch.arange(b, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    crops = crops.permute(0, 3, 1, 2)  # advanced indexing put the channel dim last
    flip = torch.rand(b, generator=generator, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], crops.flip(3), crops)


def train_batches(x, y, batch_size, generator, augment, prepare):
    """Shuffled full batches (the last incomplete one is dropped), prepared (normalised) on the device."""
    order = torch.randperm(len(y), generator=generator, device=x.device)
    for i in range(len(y) // batch_size):
        idx = order[i * batch_size:(i + 1) * batch_size]
        xb = random_crop_flip(x[idx], generator) if augment else x[idx]
        yield prepare(xb), y[idx]


def train_epoch(model, optimizer, loss_fn, batches, autocast, bar):
    """One pass over the batches; returns (mean loss, accuracy or None for a regression).
    Raises FloatingPointError on a non-finite loss."""
    model.train()
    classify = isinstance(loss_fn, torch.nn.CrossEntropyLoss)
    # The sums stay on the device: reading them makes the host wait, so we read them only at bar refreshes.
    device = next(model.parameters()).device
    loss_sum, correct, seen = torch.zeros((), device=device), torch.zeros((), device=device), 0
    bad_step = torch.full((), -1, device=device)  # the first step whose loss was not finite
    refresh = max(1, bar.steps // 20) if bar.enabled else bar.steps  # steps between reads
    for step, (xb, yb) in enumerate(batches, 1):
        with autocast:
            logits, loss = model(xb, yb, loss_fn)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach().float() * len(yb)
        if classify:
            correct += (logits.detach().argmax(1) == yb).sum()
        bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss.detach()), step, bad_step)
        seen += len(yb)
        if tools.STOP:
            bar.close()
            raise tools.Interrupted(f"stopped by {tools.STOP['signal']} at step {step}")
        if step % refresh == 0 or step == bar.steps:
            if bad_step.item() >= 0:
                bar.close()
                raise FloatingPointError(f"non-finite training loss at step {bad_step.item()}")
            bar.update(step, loss_sum.item() / seen, correct.item() / seen if classify else None)
    bar.close()
    return loss_sum.item() / seen, correct.item() / seen if classify else None


def autocast_for(device, precision):
    """bf16 autocast for --precision bf16, a no-op context for fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def evaluate(model, x, y, autocast, prepare, loss_fn):
    """(loss, accuracy or None for a regression) of the single eval-mode pass: dropout off, so comparable
    across dropout_num."""
    model.eval()
    classify = isinstance(loss_fn, torch.nn.CrossEntropyLoss)
    summed_loss = F.cross_entropy if classify else F.mse_loss
    loss, correct = torch.zeros((), device=x.device), torch.zeros((), device=x.device)
    with torch.inference_mode(), autocast:
        for i in range(0, len(y), EVAL_BATCH):
            logits, _ = model(prepare(x[i:i + EVAL_BATCH]))
            loss += summed_loss(logits.float(), y[i:i + EVAL_BATCH], reduction="sum")
            if classify:
                correct += (logits.argmax(1) == y[i:i + EVAL_BATCH]).sum()
    return loss.item() / len(y), correct.item() / len(y) if classify else None


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    try:
        args, explicit = parse_args(argv)
        if args.compare:
            return compare_all(Path(args.compare), explicit)
        with tools.stop_on_signals():
            if args.eval:
                return evaluate_saved_run(*saved_args(args.eval, explicit))
            runs = [saved_args(args.resume, explicit)[0]] if args.resume else grid(args)
            for run in runs:  # every run of the grid is checked before any trains
                check_args(run)
            for run in runs:
                if tools.STOP:
                    raise tools.Interrupted(f"stopped by {tools.STOP['signal']} between two runs of the grid")
                train(run, Path(args.resume) if args.resume else None)
            return 0
    except UserError as e:
        print(f"run.py: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"run.py: stopped: {e}", file=sys.stderr)
        return 1
    except (tools.Interrupted, KeyboardInterrupt) as e:  # KeyboardInterrupt: a second Ctrl-C, at once
        resume = shlex.join(a for a in argv if a != "--overwrite")  # rerunning must not start afresh
        print(f"run.py: {str(e) or 'stopped at once'}; resume with: python run.py {resume}", file=sys.stderr)
        return 128 + signal.Signals[tools.STOP.get("signal", "SIGINT")].value


def evaluate_saved_run(args, checkpoint):
    source, saved = data_source(args), checkpoint["config"]["data_source"]
    if source != saved:
        raise UserError(f"--data_dir {args.data_dir} is {source}, but {args.eval} was trained on {saved}; "
                        f"pass --data_dir with that data")
    device = tools.pick_device(args.device)
    splits, num_classes = load_splits(args, device)
    model = make_model(args, num_classes, device)
    model.load_state_dict(checkpoint["model"])
    loss_fn = loss_for(args.dataset)
    autocast = autocast_for(device, precision_for(args, device))
    loss, acc = evaluate(model, *splits["test"], autocast, input_transform(args.dataset, device), loss_fn)
    accuracy = "" if acc is None else f", accuracy {acc:.4f}"
    print(f"{args.eval}: epoch {checkpoint['epoch']}, {len(splits['test'][1])} test examples: loss {loss:.4f}{accuracy}")
    return 0


def train(args, run_dir=None):
    """Train one run of the grid (or continue it), then redraw its setup's comparison."""
    device = tools.pick_device(args.device)
    tools.configure_determinism(args.deterministic, device)
    config = {**vars(args), "precision": precision_for(args, device), "data_source": data_source(args)}
    run_name, setup = run_identity(config)
    run_dir = run_dir or Path(args.output_dir) / run_name
    output_dir = run_dir.parent  # where the comparison goes: beside the run, also for --resume
    check_writable(output_dir)
    checkpoint = None if args.overwrite else previous_checkpoint(run_dir, config)
    if checkpoint and checkpoint["epoch"] >= args.epochs:
        print(f"{run_dir} already holds this run, finished at epoch {checkpoint['epoch']}: nothing to do "
              f"(--epochs above {checkpoint['epoch']} continues it, --overwrite starts it afresh)")
        return report_comparison(output_dir, setup, run_dir)

    # Data: the whole (sub)sets as uint8 tensors on the device; --data_seed alone picks the images.
    splits, num_outputs = load_splits(args, device)
    (train_x, train_y), (valid_x, valid_y) = splits["train"], splits["valid"]
    steps = len(train_y) // args.batch_size
    if steps == 0:
        raise UserError(f"--batch_size {args.batch_size} is larger than the {len(train_y)} training examples; lower it")

    tools.seed_everything(args.seed)
    generator = torch.Generator(device=device).manual_seed(args.seed)  # shuffling and augmentation
    model = make_model(args, num_outputs, device)
    forward = torch.compile(model) if args.compile else model  # shares model's weights; model is what we save
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, foreach=True)  # one op for all tensors; same bits
    loss_fn = loss_for(args.dataset)
    autocast = autocast_for(device, config["precision"])
    prepare = input_transform(args.dataset, device)
    every = LOG_EVERY.get(args.dataset, 1)

    if args.overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    history, first_epoch = [], 1
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        tools.set_rng_state(checkpoint["rng"], generator)
        history, first_epoch = checkpoint["history"], checkpoint["epoch"] + 1
        print(f"resumed from epoch {checkpoint['epoch']}")
    commit, dirty = tools.git_state()
    config.update(run_dir=str(run_dir), setup=setup, device=str(device), threads=torch.get_num_threads(),
                  torch=str(torch.__version__), torchvision=version("torchvision"), numpy=np.__version__,
                  git_commit=commit, git_dirty=dirty, train_images=len(train_y), valid_images=len(valid_y),
                  test_images=len(splits["test"][1]))
    tools.write_json(run_dir / "config.json", config)
    print(f"{run_dir}: {args.model}, dropout_num={args.dropout_num}, p={args.dropout_p}, "
          f"{f'rdrop_alpha={args.rdrop_alpha}, ' if args.rdrop_alpha else ''}seed={args.seed}, "
          f"{len(train_y)} train / {len(valid_y)} {'valid' if args.valid_split else 'test'} examples, "
          f"{device}, {config['precision']}")
    progressbar.print_header(classify=args.dataset in IMAGE_SETS)

    # A row (metrics, checkpoint) per `every` epochs: one per epoch for images, per 100 for quadratic.
    drawn_at = -math.inf  # when the figures were last drawn: the first row draws them
    for epoch in range(first_epoch, args.epochs + 1, every):
        last = min(epoch + every - 1, args.epochs)  # this row covers epochs epoch..last
        span = f"epoch {epoch}" if last == epoch else f"epochs {epoch}-{last}"
        if tools.STOP:  # a stop requested during evaluation or start-up
            raise tools.Interrupted(f"stopped by {tools.STOP['signal']} before {span}; {kept_note(run_dir, epoch)}")
        start = time.perf_counter()
        lr = args.lr * (0.1 if args.lr_milestone and epoch > args.lr_milestone else 1.0)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches = itertools.chain.from_iterable(train_batches(train_x, train_y, args.batch_size, generator,
                                                              args.augment, prepare) for _ in range(epoch, last + 1))
        try:
            train_loss, train_acc = train_epoch(forward, optimizer, loss_fn, batches, autocast,
                                                progressbar.EpochBar(steps * (last - epoch + 1), last, args.epochs))
        except (FloatingPointError, tools.Interrupted) as e:
            raise type(e)(f"{e} of {span}; {kept_note(run_dir, epoch)}") from None
        valid_loss, valid_acc = evaluate(forward, valid_x, valid_y, autocast, prepare, loss_fn)
        row = {"epoch": last, "lr": lr, "train_loss": train_loss, "train_acc": train_acc,
               "valid_loss": valid_loss, "valid_acc": valid_acc, "seconds": time.perf_counter() - start}
        history.append({k: v for k, v in row.items() if v is not None})  # a regression has no accuracy
        progressbar.print_row(history[-1])
        test = evaluate(forward, *splits["test"], autocast, prepare, loss_fn) if args.valid_split and last == args.epochs else None
        prediction = None if args.dataset in IMAGE_SETS else regression_prediction(forward, splits, autocast)
        redraw = last == args.epochs or time.perf_counter() - drawn_at >= REDRAW_S
        drawn_at = time.perf_counter() if redraw else drawn_at
        save_epoch(run_dir, history, test, prediction, redraw, {
            "epoch": last, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "rng": tools.rng_state(generator), "history": history, "config": config})
    report_comparison(output_dir, setup, run_dir)


def loss_for(dataset):
    return torch.nn.CrossEntropyLoss() if dataset in IMAGE_SETS else torch.nn.MSELoss()


def make_model(args, num_outputs, device):
    """The run's network on the device, channels_last: the layout the CPU and GPU convolutions are fastest in."""
    model = build_model(args.model, num_outputs, args.dropout_num, args.dropout_p, args.rdrop_alpha)
    return model.to(device, memory_format=torch.channels_last)


def precision_for(args, device):
    """--precision resolved for this run. The regression's targets reach 100, too coarse for bf16's 8 bits
    of mantissa: auto means fp32 there."""
    return "fp32" if args.dataset == "quadratic" and args.precision == "auto" else tools.resolve_precision(args.precision, device)


def data_source(args):
    return "builtin-quadratic" if args.dataset == "quadratic" else datasource.source_id(args.data_dir, args.dataset)


def regression_prediction(model, splits, autocast):
    """The post's figure as data: its training points, and the eval-mode (dropout off) prediction on the grid."""
    model.eval()
    (x, y), (grid_x, grid_y) = splits["train"], splits["test"]
    with torch.inference_mode(), autocast:  # as evaluate() computes it, so the figure matches valid_loss
        prediction = model(grid_x)[0].float()
    as_list = lambda t: t.flatten().tolist()
    return {"train_x": as_list(x), "train_y": as_list(y), "x": as_list(grid_x), "target": as_list(grid_y),
            "prediction": as_list(prediction)}


def kept_note(run_dir, epoch):
    """What a stop during `epoch` leaves behind."""
    return f"the checkpoint of epoch {epoch - 1} in {run_dir} is intact" if epoch > 1 else "no checkpoint was written"


def save_epoch(run_dir, history, test, prediction, redraw, checkpoint):
    """Metrics, curves (if redraw), test result and the regression's prediction first, the checkpoint last: a run
    whose checkpoint says 'finished' has all its files. A full disk leaves the previous checkpoint whole (temp file + rename)."""
    try:
        trainingmonitor.write_metrics(run_dir, history)
        if prediction:
            tools.write_json(run_dir / "prediction.json", prediction)
        if redraw:
            trainingmonitor.plot_run(run_dir, history)
            if prediction:
                trainingmonitor.plot_prediction(run_dir, prediction)
        if test:  # the test set, once, after the epochs were chosen on the validation set
            tools.write_json(run_dir / "test.json", {"epoch": history[-1]["epoch"], "test_loss": test[0], "test_acc": test[1]})
            print(f"test set, once: loss {test[0]:.4f}, accuracy {test[1]:.4f}")
        tools.save_checkpoint(run_dir / "last.pt", checkpoint)
    except OSError as e:
        raise UserError(f"could not save epoch {history[-1]['epoch']} in {run_dir} ({e.strerror or e}); the last "
                        f"checkpoint there is intact: make room and rerun the command to resume from it") from None


def compare_setup(output_dir, setup):
    """Redraw output_dir/compare/<setup>/ from the finished runs of that setup; returns that folder."""
    runs = [r for r in trainingmonitor.finished_runs(output_dir) if run_identity(r["config"])[1] == setup]
    compare_dir = output_dir / "compare" / setup
    trainingmonitor.write_comparison(compare_dir, runs, setup_flags(runs[0]["config"]))
    return compare_dir, len(runs)


def report_comparison(output_dir, setup, run_dir):
    compare_dir, count = compare_setup(output_dir, setup)
    print(f"done: {run_dir}; comparison of {count} finished run(s) in {compare_dir}")


def compare_all(folder, explicit):
    """--compare: every setup's comparison under folder, from the finished runs alone."""
    if set(explicit) != {"compare"}:
        raise UserError(f"--compare redraws from the runs' own config.json and takes no other flag; drop "
                        f"{', '.join('--' + f for f in sorted(set(explicit) - {'compare'}))}")
    runs = trainingmonitor.finished_runs(folder) if folder.is_dir() else []
    if not runs:
        raise UserError(f"{folder} holds no finished runs (folders with config.json and metrics.json up to their "
                        "last epoch); give the --output_dir of a grid")
    check_writable(folder / "compare")
    for setup in sorted({run_identity(r["config"])[1] for r in runs}):
        compare_dir, count = compare_setup(folder, setup)
        print(f"{compare_dir}: comparison of {count} finished run(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
