"""Where does multi-sample dropout help? Six heads and settings, eight samples against one, paired by seed.

    python study.py --data_dir ../shared/data/cifar10-jpeg.tar.gz

A reduced, labelled protocol of the blog's recipe (5,000 training and 5,000 test images, 10 epochs,
lr / 10 after epoch 5, fp32; --protocol full: the recipe unchanged), seeds 42 43 44, dropout_num 1
and 8, for each setting below. Each setting is one grid of run.py into its own folder under
--output_dir; rerunning skips finished runs and resumes unfinished ones. Diversity needs two samples or more, so for the flip and pad settings the
one-sample reference is --pool avg2 without diversity (same seeds: same initial weights, same data
order). Then gain.png (the paired difference in final valid accuracy, eight
samples minus one, with its 95% interval, per setting) and study.md (the same as a table).
"""
import sys
from pathlib import Path

import run
import stats
import trainingmonitor
from tools import UserError, atomic_write

# --protocol: (label for the figure, run.py's flags). reduced fits a 2-core CPU in hours; full is the blog's recipe.
PROTOCOLS = {
    "reduced": ("5,000/5,000 images, 10 epochs", ["--train_size", "5000", "--test_size", "5000", "--epochs", "10",
                                                   "--lr_milestone", "5", "--precision", "fp32"]),
    "full": ("50,000/10,000 images, 20 epochs", ["--epochs", "20", "--lr_milestone", "10", "--precision", "fp32"]),
}
# folder: (label, flags, the folder whose dropout_num=1 runs are the reference). Diversity needs two samples or
# more, so its one-sample reference is --pool avg2 alone: the same weights at the start (diversity has no
# parameters) and the same data order, seed by seed.
SETTINGS = {
    "blog-head": ("the blog's head", [], "blog-head"),
    "hidden512": ("--head_hidden 512", ["--head_hidden", "512"], "hidden512"),
    "avg2": ("--pool avg2", ["--pool", "avg2"], "avg2"),
    "avg2-flip": ("--pool avg2 --diversity flip", ["--pool", "avg2", "--diversity", "flip"], "avg2"),
    "avg2-pad": ("--pool avg2 --diversity pad", ["--pool", "avg2", "--diversity", "pad"], "avg2"),
    "augment": ("the blog's head, --augment", ["--augment"], "augment"),
}


def parse_args(argv):
    p = run.Parser(prog="study.py", description=__doc__.split("\n")[0])
    p.add_argument("--data_dir", default="data", help="as for run.py: torchvision's root, or an image-folder copy")
    p.add_argument("--output_dir", default="outputs/study", help="one folder per setting, and gain.png, study.md")
    p.add_argument("--protocol", choices=list(PROTOCOLS), default="reduced", help="reduced: 5,000 training and 5,000 "
                   "test images, 10 epochs, lr / 10 after epoch 5; full: the blog's recipe (all images, 20 epochs, "
                   "lr / 10 after epoch 10); fp32 in both")
    p.add_argument("--seed", type=int, nargs="+", default=[42, 43, 44], help="seeds of every setting (a subset "
                   "lets several processes share the study; the last one to finish draws it whole)")
    return p.parse_args(argv)


def gains(output_dir):
    """[(label, paired difference in final valid accuracy of dropout_num 8 against 1)] for each setting with both."""
    found = []
    for folder, (label, _, reference) in SETTINGS.items():
        difference = stats.paired_by_seed(final_accuracies(output_dir / folder, 8), final_accuracies(output_dir / reference, 1))
        found += [(label, difference)] if difference else []
    return found


def final_accuracies(folder, dropout_num):
    """{seed: final valid accuracy} of the finished runs in folder with this dropout_num."""
    return {r["config"]["seed"]: r["history"][-1]["valid_acc"] for r in trainingmonitor.finished_runs(folder)
            if r["config"]["dropout_num"] == dropout_num}


def table(found):
    lines = ["| setting | seeds | Δ final valid acc, 8 samples − 1 [95% CI] | seeds higher / lower |", "|---|---:|---:|---:|"]
    lines += [f"| {label} | {d['n']} | {trainingmonitor.format_difference(d)} | {d['higher']} / {d['lower']} |"
              for label, d in found]
    return "\n".join(lines + ["", "Δ: final valid accuracy of dropout_num=8 minus dropout_num=1, seed by seed (the same "
                              "initial weights and data order; for flip and pad, the one-sample runs are --pool avg2's); "
                              "95% CI: Student t on the paired differences."]) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    try:
        args = parse_args(argv)
    except UserError as e:
        print(f"study.py: error: {e}", file=sys.stderr)
        return 2
    output_dir, (caption, protocol) = Path(args.output_dir), PROTOCOLS[args.protocol]
    seeds = [str(seed) for seed in args.seed]
    for folder, (label, flags, reference) in SETTINGS.items():
        print(f"study.py: {label}", flush=True)
        samples = ["8"] if reference != folder else ["1", "8"]  # its reference's folder has the one-sample runs
        status = run.main(["--data_dir", args.data_dir, "--output_dir", output_dir / folder, *protocol,
                           "--seed", *seeds, "--dropout_num", *samples, *flags])
        if status:
            return status  # run.py said why, and how to resume: rerun this command
    found = gains(output_dir)
    trainingmonitor.plot_gain(output_dir / "gain.png", found, f"{caption}, fp32, seeds {' '.join(seeds)}")
    atomic_write(output_dir / "study.md", lambda tmp: Path(tmp).write_text(table(found)))
    print(f"study.py: wrote {output_dir / 'gain.png'} and {output_dir / 'study.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
