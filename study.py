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

import numpy as np

import run
import stats
import trainingmonitor
from tools import UserError, atomic_write

# --protocol: run.py's flags. reduced fits a 2-core CPU in hours; full is the blog's recipe unchanged.
PROTOCOLS = {
    "reduced": ["--train_size", "5000", "--test_size", "5000", "--epochs", "10", "--lr_milestone", "5", "--precision", "fp32"],
    "full": ["--epochs", "20", "--lr_milestone", "10", "--precision", "fp32"],
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
    p.add_argument("--compare", metavar="DIR", help="draw gain.png and study.md from the finished runs under DIR (one "
                   "folder per setting; config.json and metrics.json are enough), without training; no other flag")
    args = p.parse_args(argv)
    if args.compare and len([a for a in argv if a.startswith("--")]) > 1:
        raise UserError("--compare draws from the runs' own files and takes no other flag")
    return args


def compared(output_dir):
    """[(label, {seed: final valid acc} of one sample, of eight, their paired difference)] for each setting with both."""
    found = []
    for folder, (label, _, reference) in SETTINGS.items():
        one, eight = final_accuracies(output_dir / reference, 1), final_accuracies(output_dir / folder, 8)
        difference = stats.paired_by_seed(eight, one)
        found += [(label, one, eight, difference)] if difference else []
    return found


def gains(output_dir):
    """[(label, paired difference in final valid accuracy of dropout_num 8 against 1)] for each setting with both."""
    return [(label, difference) for label, _, _, difference in compared(output_dir)]


def final_accuracies(folder, dropout_num):
    """{seed: final valid accuracy} of the finished runs in folder with this dropout_num."""
    return {r["config"]["seed"]: r["history"][-1]["valid_acc"] for r in trainingmonitor.finished_runs(folder)
            if r["config"]["dropout_num"] == dropout_num}


def table(found):
    lines = ["| setting | final valid acc, 1 sample | 8 samples | seeds paired | Δ 8 samples − 1 [95% CI] | "
             "seeds higher / lower |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {label} | {trainingmonitor.mean_std(np.array(list(one.values())))} | "
              f"{trainingmonitor.mean_std(np.array(list(eight.values())))} | {d['n']} | "
              f"{trainingmonitor.format_difference(d)} | {d['higher']} / {d['lower']} |" for label, one, eight, d in found]
    return "\n".join(lines + ["", "Final valid accuracy: mean ± std over seeds. Δ: final valid accuracy of dropout_num=8 "
                              "minus dropout_num=1, seed by seed (the same initial weights and data order; for flip and "
                              "pad, the one-sample runs are --pool avg2's); 95% CI: Student t on the paired differences."]) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    try:
        args = parse_args(argv)
        return draw(Path(args.compare)) if args.compare else train_and_draw(args)
    except UserError as e:
        print(f"study.py: error: {e}", file=sys.stderr)
        return 2


def train_and_draw(args):
    """Each setting's grid into its own folder under --output_dir (finished runs are skipped), then draw()."""
    output_dir, seeds = Path(args.output_dir), [str(seed) for seed in args.seed]
    for folder, (label, flags, reference) in SETTINGS.items():
        print(f"study.py: {label}", flush=True)
        samples = ["8"] if reference != folder else ["1", "8"]  # its reference's folder has the one-sample runs
        status = run.main(["--data_dir", args.data_dir, "--output_dir", output_dir / folder, *PROTOCOLS[args.protocol],
                           "--seed", *seeds, "--dropout_num", *samples, *flags])
        if status:
            return status  # run.py said why, and how to resume: rerun this command
    return draw(output_dir)


def draw(output_dir):
    """gain.png and study.md from the finished runs under output_dir, titled with what those runs share."""
    found = compared(output_dir)
    if not found:
        raise UserError(f"{output_dir} holds no setting with finished runs of dropout_num 1 and 8; run the study first")
    trainingmonitor.plot_gain(output_dir / "gain.png", [(label, d) for label, _, _, d in found], caption(output_dir))
    atomic_write(output_dir / "study.md", lambda tmp: Path(tmp).write_text(table(found)))
    print(f"study.py: wrote {output_dir / 'gain.png'} and {output_dir / 'study.md'}")
    return 0


def caption(output_dir):
    """'5000/5000 images, 10 epochs, fp32, seeds 42 43 44, cpu': the protocol as the runs themselves recorded it."""
    configs = [r["config"] for folder in SETTINGS for r in trainingmonitor.finished_runs(output_dir / folder)]
    shared = lambda key: "/".join(sorted({str(c[key]) for c in configs}))
    seeds = " ".join(str(s) for s in sorted({c["seed"] for c in configs}))
    return (f"{shared('train_images')}/{shared('valid_images')} images, {shared('epochs')} epochs, "
            f"{shared('precision')}, seeds {seeds}, {shared('device')}")

if __name__ == "__main__":
    sys.exit(main())
