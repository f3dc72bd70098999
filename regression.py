"""The post on torch.nn.Dropout, its regression of y = x^2 from ten noisy points, with multi-sample dropout.

    python regression.py                       # M = 0, 1 and 8, seed 42: about a minute on a CPU
    python regression.py --seed 42 43 44       # the runs in docs/regression-zen4

The post trains a 1-3-5-10-5-1 sigmoid network (final ReLU) with dropout p = 0.4 after the 5- and the
10-unit layers: Adam, lr 0.005, one example a step, 3000 epochs. Here dropout_num 0 has neither dropout,
1 has both (the post), and M >= 2 keeps the first and turns the second into multi-sample dropout
(nn.MultiSampleDropout) whose head is every layer after it: the mean of the M squared errors.

Every 100 epochs a row: the training MSE over those epochs, and the valid MSE of the eval-mode (dropout
off) prediction against y = x^2 on 1001 points of [0, 10]. Into --output_dir: one JSON per run (its rows
and final prediction), summary.md (a table per setting and per run) and regression.png (the post's figure
with every run's prediction, and the valid MSE against epochs). A rerun skips the runs it finds there.
"""
import contextlib
import json
import sys
from pathlib import Path

import tools

if __name__ == "__main__":  # a stop during the imports that take seconds: one line, not a traceback
    tools.quiet_start("regression.py")
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from nn import MultiSampleDropout  # noqa: E402
from run import Parser  # noqa: E402
from tools import UserError  # noqa: E402
from trainingmonitor import label_axes, samples_in_words, save_figure  # noqa: E402

matplotlib.use("Agg")  # files only, no window
import matplotlib.pyplot as plt  # noqa: E402

# The post's ten noisy samples of y = x^2 at x = 1..10, and the grid the prediction is judged on.
TRAIN_X = torch.arange(1, 11, dtype=torch.float32)[:, None]
TRAIN_Y = torch.tensor([0.52, 8.54, 6.94, 20.76, 32.17, 30.65, 40.46, 80.12, 75.12, 98.83])[:, None]
GRID_X = torch.linspace(0, 10, 1001)[:, None]
ROW_EPOCHS = 100  # epochs a row: 10 steps an epoch would make 3000 rows


class DropoutMLP(nn.Module):
    """The post's network. Dropout A sits after the 5-unit layer, dropout B after the 10-unit layer.
    dropout_num=0: neither; 1: both, as in the post; M >= 2: A as in the post, and B becomes multi-sample
    dropout whose head is every layer after it."""

    def __init__(self, dropout_num, dropout_p):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(1, 3), nn.Sigmoid(), nn.Linear(3, 5), nn.Sigmoid(),
                                  nn.Dropout(dropout_p) if dropout_num else nn.Identity(), nn.Linear(5, 10), nn.Sigmoid())
        head = nn.Sequential(nn.Linear(10, 5), nn.Sigmoid(), nn.Linear(5, 1), nn.ReLU())
        self.head = MultiSampleDropout(head, dropout_num, dropout_p)

    def forward(self, x, target=None, loss_fn=None):
        return self.head(self.body(x), target, loss_fn)


def train(dropout_num, dropout_p, seed, epochs, lr):
    """One run: its rows (epoch, train MSE, valid MSE), one every ROW_EPOCHS, and the final eval-mode prediction."""
    torch.manual_seed(seed)  # the weights and the dropout masks
    order = torch.Generator().manual_seed(seed)  # the examples' order, shuffled each epoch (the post keeps it fixed)
    model = DropoutMLP(dropout_num, dropout_p)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, foreach=True)
    mse, rows = nn.MSELoss(), []
    for row_end in range(ROW_EPOCHS, epochs + 1, ROW_EPOCHS):
        model.train()
        loss_sum = torch.zeros(())
        for _ in range(ROW_EPOCHS):
            for i in torch.randperm(len(TRAIN_Y), generator=order):
                _, loss = model(TRAIN_X[i:i + 1], TRAIN_Y[i:i + 1], mse)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.detach()
        prediction = predict(model)
        rows.append({"epoch": row_end, "train_loss": loss_sum.item() / (ROW_EPOCHS * len(TRAIN_Y)),
                     "valid_loss": ((prediction - GRID_X ** 2) ** 2).sum().item() / len(GRID_X)})
    return rows, predict(model).flatten().tolist()


def predict(model):
    """The prediction on the grid with dropout off: model.eval(), not the post's `p = 0` (see the test)."""
    model.eval()
    with torch.inference_mode():
        return model(GRID_X)


def run_file(folder, m, p, seed, epochs, lr):
    return folder / f"m{m}_p{p}_s{seed}_e{epochs}_lr{lr}.json"


def summary_markdown(runs):
    """A row per setting (mean ± sd over its seeds), then a row per run."""
    def final(r, key):
        return r["rows"][-1][key]

    def best(r):
        return min(r["rows"], key=lambda row: row["valid_loss"])

    lines = ["| dropout_num | p | seeds | epochs | final train MSE | final valid MSE | best valid MSE |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for m in sorted({r["dropout_num"] for r in runs}):
        group = [r for r in runs if r["dropout_num"] == m]
        cells = [np.array(values) for values in ([final(r, "train_loss") for r in group],
                                                 [final(r, "valid_loss") for r in group],
                                                 [best(r)["valid_loss"] for r in group])]
        spread = [f"{v.mean():.4f} ± {v.std(ddof=1) if len(v) > 1 else 0:.4f}" for v in cells]
        lines.append(f"| {m} | {group[0]['dropout_p']} | {len(group)} | {group[0]['epochs']} | {' | '.join(spread)} |")
    lines += ["", "| dropout_num | p | seed | epochs | final train MSE | final valid MSE | best valid MSE (epoch) |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        lines.append(f"| {r['dropout_num']} | {r['dropout_p']} | {r['seed']} | {r['epochs']} | "
                     f"{final(r, 'train_loss'):.4f} | {final(r, 'valid_loss'):.4f} | "
                     f"{best(r)['valid_loss']:.4f} ({best(r)['epoch']}) |")
    return "\n".join(lines) + "\n"


def plot(folder, runs):
    """regression.png: the post's figure with every run's prediction overlaid, and the valid MSE against epochs."""
    colors = {m: f"C{i}" for i, m in enumerate(sorted({r["dropout_num"] for r in runs}))}
    labelled = set()
    fig, (ax_pred, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax_pred.scatter(TRAIN_X.flatten(), TRAIN_Y.flatten(), color="red", zorder=3, label="training points")
    ax_pred.plot(GRID_X.flatten(), GRID_X.flatten() ** 2, color="black", ls="--", label="y = x²")
    for r in runs:
        m = r["dropout_num"]
        label = None if m in labelled else samples_in_words(m)
        labelled.add(m)
        ax_pred.plot(GRID_X.flatten(), r["prediction"], color=colors[m], alpha=0.8, label=label)
        ax_loss.plot([row["epoch"] for row in r["rows"]], [row["valid_loss"] for row in r["rows"]],
                     color=colors[m], alpha=0.8, label=label)
    ax_pred.set_title(f"eval-mode prediction (dropout off), seeds {seeds_in_words(runs)}", fontsize=9)
    label_axes(ax_pred, "x", "y")
    ax_loss.set_yscale("log")
    ax_loss.set_title("valid MSE against y = x² on 1001 points of [0, 10]", fontsize=9)
    label_axes(ax_loss, "epoch", "valid MSE")
    save_figure(fig, folder / "regression.png", None)


def seeds_in_words(runs):
    return ", ".join(map(str, sorted({r["seed"] for r in runs})))


def parse_args(argv):
    p = Parser(prog="regression.py", description="The post on torch.nn.Dropout, its regression, with multi-sample "
               "dropout: train every (dropout_num, seed), then write summary.md and regression.png.")
    p.add_argument("--dropout_num", type=int, nargs="+", default=[0, 1, 8],
                   help="0: no dropout; 1: the post's two dropouts; M >= 2: the second one M-sample")
    p.add_argument("--seed", type=int, nargs="+", default=[42], help="one run per seed and dropout_num")
    p.add_argument("--dropout_p", type=float, default=0.4, help="both dropouts' probability")
    p.add_argument("--epochs", type=int, default=3000, help=f"a multiple of {ROW_EPOCHS}")
    p.add_argument("--lr", type=float, default=0.005, help="Adam's learning rate")
    p.add_argument("--output_dir", default="outputs/regression", help="where the runs, table and figure go")
    args = p.parse_args(argv)
    if args.epochs < ROW_EPOCHS or args.epochs % ROW_EPOCHS:
        raise UserError(f"--epochs must be a positive multiple of {ROW_EPOCHS} (a row each), got {args.epochs}")
    for problem, message in ((min(args.dropout_num) < 0, f"--dropout_num must be 0 or more, got {args.dropout_num}"),
                             (not 0 <= args.dropout_p < 1, f"--dropout_p must be in [0, 1), got {args.dropout_p}"),
                             (not 0 < args.lr < float("inf"), f"--lr must be a positive number, got {args.lr}")):
        if problem:
            raise UserError(message)
    args.output_dir = Path(tools.require_path(args.output_dir, "--output_dir"))
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    tools.started()
    try:
        args = parse_args(argv)
        tools.check_writable(args.output_dir)
        args.output_dir.mkdir(parents=True, exist_ok=True)
        with tools.interrupts():  # SIGTERM as Ctrl-C: the run in training leaves no file, the finished ones stay
            with one_thread():
                runs = [one_run(args, m, seed) for m in args.dropout_num for seed in args.seed]
            tools.atomic_write(args.output_dir / "summary.md", tools.text_writer(summary_markdown(runs)))
            plot(args.output_dir, runs)
        print(f"wrote {args.output_dir / 'summary.md'} and {args.output_dir / 'regression.png'}")
        return 0
    except UserError as e:
        print(f"regression.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"regression.py: stopped by {tools.STOP.get('signal', 'SIGINT')}; the runs finished before it are kept, "
              "and the command resumes from them", file=sys.stderr)
        return tools.stopped_status()


@contextlib.contextmanager
def one_thread():
    """A batch of one: more threads only add their overhead. The caller's count after (the tests run in-process)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def one_run(args, m, seed):
    """The run's record from its file, or trained (a stop in training leaves no file) and saved."""
    path = run_file(args.output_dir, m, args.dropout_p, seed, args.epochs, args.lr)
    if path.exists():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {path} ({e}); delete it to train that run again") from None
    rows, prediction = train(m, args.dropout_p, seed, args.epochs, args.lr)
    record = {"dropout_num": m, "dropout_p": args.dropout_p, "seed": seed, "epochs": args.epochs, "lr": args.lr,
              "torch": torch.__version__, "rows": rows, "prediction": prediction}
    tools.atomic_write(path, tools.json_writer(record))
    print(f"m={m} seed={seed}: final train MSE {rows[-1]['train_loss']:.4f}, valid MSE {rows[-1]['valid_loss']:.4f}")
    return record


if __name__ == "__main__":
    sys.exit(main())
