"""The blog post's results beside ours: final and best valid accuracy, and the curves overlaid.

    python blog.py docs/blog-full-h200    # writes blog.md and blog_vs_ours.png into that folder

The blog's code publishes its results only as figures. blog_curves.csv, beside this file, holds their
values read off the pixels (about +-0.003 in accuracy, +-0.01 in loss): one run of each setting
(seed 42) on the official CIFAR-10, fp32 on a GPU. Our side is every finished run under the folder
that follows the blog's recipe, any number of seeds.
"""
import csv
import sys
from pathlib import Path

import tools

if __name__ == "__main__":  # a stop during the imports that take seconds: one line, not a traceback
    tools.quiet_start("blog.py")
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402

import run  # noqa: E402
import trainingmonitor  # noqa: E402
from bookkeeping import runfiles  # noqa: E402
from tools import UserError, atomic_write  # noqa: E402

matplotlib.use("Agg")  # files only, no window
import matplotlib.pyplot as plt  # noqa: E402

BLOG_CSV = Path(__file__).resolve().parent / "blog_curves.csv"
SETTINGS = {"no dropout": 0, "1 sample": 1, "8 sample": 8}  # the blog's legend -> dropout_num
# The blog's recipe: the flags a run of ours must have to stand beside it (data and precision may differ).
RECIPE = {"dataset": "cifar10", "model": "miniresnet", "dropout_p": 0.5, "batch_size": 128, "lr": 0.01,
          "lr_milestone": 10, "epochs": 20, "augment": False, "train_images": 50000, "test_images": 10000}
# Its eight-sample losses are another quantity: samples 2..8 took the cross-entropy of the dropped features.
LOSS_NOT_COMPARABLE = {8}


def blog_curves(path=BLOG_CSV):
    """{(metric, dropout_num): per-epoch values for epochs 1..20}."""
    with open(path, newline="") as f:
        return {(row["metric"], SETTINGS[row["setting"]]): np.array([float(row[f"epoch{e}"]) for e in range(1, 21)])
                for row in csv.DictReader(f)}


def blog_recipe_runs(folder):
    """The finished runs under folder that follow the blog's recipe, without R-Drop."""
    runs = [r for r in runfiles.finished_runs(folder)
            if all(r["config"].get(k) == v for k, v in RECIPE.items()) and not r["config"].get("rdrop_alpha")
            and r["config"]["dropout_num"] in SETTINGS.values()]
    setups = sorted({r["config"]["setup"] for r in runs})
    if len(setups) > 1:  # the same recipe on other data or in another precision: one of them at a time
        raise UserError(f"{folder} holds runs of the blog's recipe from {len(setups)} setups ({', '.join(setups)}); "
                        "give a folder with one of them")
    if not runs:
        raise UserError(f"{folder} holds no finished run of the blog's recipe ({', '.join(f'{k} {v}' for k, v in RECIPE.items())}); "
                        "give the --output_dir of such runs")
    return runs


def table_markdown(groups, blog):
    """Final (epoch 20) and best valid accuracy: the blog's figure, ours (mean +- std over seeds), ours - blog."""
    lines = ["| dropout_num | valid acc | blog (read off its figure, one run) | ours: mean ± std (seeds) | ours − blog |",
             "|---:|---|---:|---:|---:|"]
    for g in groups:
        theirs = blog[("valid_acc", g["dropout_num"])]
        for what, ours, blog_value in (("final (epoch 20)", g["curves"]["valid_acc"][:, -1], theirs[-1]),
                                       ("best", g["curves"]["valid_acc"].max(1), theirs.max())):
            spread = f" ± {ours.std(ddof=1):.4f}" if len(ours) > 1 else ""
            lines.append(f"| {g['dropout_num']} | {what} | {blog_value:.3f} | {ours.mean():.4f}{spread} ({len(ours)}) | "
                         f"{ours.mean() - blog_value:+.4f} |")
    lines += ["", "Blog: read off the blog repo's figures (one run each, seed 42, official CIFAR-10, fp32 on a GPU; about "
              "±0.003). Ours: every finished run of the recipe in this folder, mean ± std over seeds (sample std)."]
    return "\n".join(lines) + "\n"


def plot(path, groups, blog):
    """Valid accuracy, train loss and valid loss: ours solid (mean, +-1 std band), the blog's dashed, same colour."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, metric in zip(axes, ("valid_acc", "train_loss", "valid_loss")):
        for colour, g in enumerate(groups):
            trainingmonitor.draw_band(ax, g["epochs"], g["curves"][metric], f"ours, {g['label']}", color=f"C{colour}")
            if metric == "valid_acc" or g["dropout_num"] not in LOSS_NOT_COMPARABLE:
                ax.plot(range(1, 21), blog[(metric, g["dropout_num"])], ls="--", color=f"C{colour}",
                        label=f"blog, {trainingmonitor.samples_in_words(g['dropout_num'])} (1 run)")
        ax.set_title(metric.replace("_", " "))
        trainingmonitor.label_axes(ax, "epoch", "", fontsize=7)
    trainingmonitor.save_figure(fig, path, f"ours ({data_in_words(groups[0]['runs'][0]['config'])}) against the blog's "
                                "figures (official CIFAR-10, read off the pixels); the blog's 8-sample losses are another "
                                "quantity and left out")


def data_in_words(config):
    """The data our runs read: the official release, or the archive or folder of images they were given."""
    if config.get("data_source", "").startswith("torchvision"):
        return "official CIFAR-10"
    return f"CIFAR-10 from {Path(config['data_dir']).name}" if config.get("data_dir") else "CIFAR-10"


def parse_args(argv):
    """(the runs' folder, the folder to write into)."""
    p = run.Parser(prog="blog.py", description="Write blog.md (final and best valid accuracy, ours beside the blog's "
                   "figures) and blog_vs_ours.png (the curves overlaid) into RUNS_DIR, or --output_dir.")
    p.add_argument("runs_dir", metavar="RUNS_DIR", help="a folder of finished runs of the blog's recipe, e.g. docs/blog-full-h200")
    p.add_argument("--output_dir", help="where blog.md and blog_vs_ours.png go (default: RUNS_DIR)")
    args = p.parse_args(argv)
    runs_dir = Path(tools.require_path(args.runs_dir, "RUNS_DIR"))
    return runs_dir, runs_dir if args.output_dir is None else Path(tools.require_path(args.output_dir, "--output_dir"))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    tools.started()
    try:
        runs_dir, folder = parse_args(argv)
        with tools.interrupts():
            groups = trainingmonitor.group_runs(blog_recipe_runs(runs_dir))
            blog = blog_curves()
            try:
                folder.mkdir(parents=True, exist_ok=True)
                atomic_write(folder / "blog.md", tools.text_writer(table_markdown(groups, blog)))
                plot(folder / "blog_vs_ours.png", groups, blog)
            except OSError as e:
                raise UserError(f"cannot write blog.md or blog_vs_ours.png in {folder} ({e.strerror or e}); "
                                "choose a writable --output_dir") from None
        print(f"wrote {folder / 'blog.md'} and {folder / 'blog_vs_ours.png'}")
        return 0
    except UserError as e:
        print(f"blog.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"blog.py: stopped by {tools.STOP.get('signal', 'SIGINT')}; no file was left half-written", file=sys.stderr)
        return tools.stopped_status()


if __name__ == "__main__":
    sys.exit(main())
