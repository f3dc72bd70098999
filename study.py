"""Where does multi-sample dropout help? Six heads and settings, eight samples against one, paired by seed.

    python study.py --data_dir ../shared/data/cifar10-jpeg.tar.gz

A reduced, labelled protocol of the blog's recipe (5,000 training and 5,000 test images, 10 epochs,
lr / 10 after epoch 5, fp32; --protocol full: the recipe unchanged), seeds 42 43 44, dropout_num 1
and 8, for each setting below. Each setting is one grid of run.py into its own folder under
--output_dir; rerunning skips finished runs and resumes unfinished ones. Diversity needs two samples
or more, so for the flip and pad settings the one-sample reference is --pool avg2 without diversity
(same seeds: same initial weights, same data order). Then gain.png (the paired difference in final
valid accuracy, eight samples minus one, with its 95% interval, per setting) and study.md (the same
as a table, with each setting's accuracies, and diversity against the same head without it).
"""
import sys
from pathlib import Path

import run
import stats
import trainingmonitor
from tools import UserError, atomic_write

# --protocol: run.py's flags, and the default --output_dir. reduced fits a 2-core CPU in hours; full is
# the blog's recipe unchanged. Each has its own folder: the study pairs runs by seed alone.
PROTOCOLS = {
    "reduced": (["--train_size", "5000", "--test_size", "5000", "--epochs", "10", "--lr_milestone", "5",
                 "--precision", "fp32"], "outputs/study"),
    "full": (["--epochs", "20", "--lr_milestone", "10", "--precision", "fp32"], "outputs/study-full"),
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
    p.add_argument("--protocol", choices=list(PROTOCOLS), default="reduced", help="reduced: 5,000 training and "
                   "5,000 test images, 10 epochs, lr / 10 after epoch 5; full: the blog's recipe (all images, "
                   "20 epochs, lr / 10 after epoch 10); fp32 in both")
    p.add_argument("--output_dir", help="one folder per setting, and gain.png, study.md (default: outputs/study, "
                   "or outputs/study-full with --protocol full)")
    p.add_argument("--seed", type=int, nargs="+", default=[42, 43, 44], help="seeds of every setting (a subset "
                   "lets several processes share the study; the last one to finish draws it whole)")
    p.add_argument("--compare", metavar="DIR", help="draw gain.png and study.md from the finished runs under DIR "
                   "(one folder per setting; config.json and metrics.json are enough), without training; no other flag")
    args = p.parse_args(argv)
    if args.compare == "":
        raise UserError("--compare needs the folder of a study, e.g. --compare docs/study-h200")
    if args.compare and len([a for a in argv if a.startswith("--")]) > 1:
        raise UserError("--compare draws from the runs' own files and takes no other flag")
    args.output_dir = args.output_dir or PROTOCOLS[args.protocol][1]
    return args


def compared(output_dir):
    """[(label, {seed: final valid acc} with one sample, with eight, the paired difference of eight against one,
    and for diversity, against eight samples of the same head without it)] for each setting with runs of both."""
    found = []
    for folder, (label, _, reference) in SETTINGS.items():
        one, eight = final_accuracies(output_dir / reference, 1), final_accuracies(output_dir / folder, 8)
        without = stats.paired_by_seed(eight, final_accuracies(output_dir / reference, 8)) if reference != folder else None
        difference = stats.paired_by_seed(eight, one)
        found += [(label, one, eight, difference, without)] if difference else []
    return found


def final_accuracies(folder, dropout_num):
    """{seed: final valid accuracy} of the finished runs in folder with this dropout_num; one run per seed."""
    found = {}
    for r in trainingmonitor.finished_runs(folder):
        seed = r["config"]["seed"]
        if r["config"]["dropout_num"] != dropout_num:
            continue
        if seed in found:
            raise UserError(f"{folder} holds two runs of dropout_num {dropout_num} with seed {seed} ({found[seed]['dir'].name} "
                            f"and {r['dir'].name}): the study pairs by seed, so keep one protocol's runs per folder")
        found[seed] = r
    return {seed: r["history"][-1]["valid_acc"] for seed, r in found.items()}


def table(found):
    lines = ["| setting | final valid acc, 1 sample | 8 samples | seeds paired | Δ 8 samples − 1 [95% CI], "
             "seeds higher / lower | Δ against 8 samples without diversity |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {label} | {trainingmonitor.mean_std(list(one.values()))} | {trainingmonitor.mean_std(list(eight.values()))} "
              f"| {d['n']} | {difference_cell(d)} | {difference_cell(without)} |" for label, one, eight, d, without in found]
    return "\n".join(lines + [
        "", "Final valid accuracy: mean ± std over seeds. Δ: final valid accuracy of dropout_num=8 minus dropout_num=1, "
        "seed by seed (the same initial weights and data order; for flip and pad, the one-sample runs are --pool "
        "avg2's); the last column compares flip and pad with --pool avg2's eight-sample runs, seed by seed. 95% CI: "
        "Student t on the paired differences."]) + "\n"


def difference_cell(d):
    return f"{trainingmonitor.format_difference(d)}, {d['higher']} / {d['lower']}" if d else "-"


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
        status = run.main(["--data_dir", args.data_dir, "--output_dir", output_dir / folder, *PROTOCOLS[args.protocol][0],
                           "--seed", *seeds, "--dropout_num", *samples, *flags])
        if status:
            return status  # run.py said why, and how to resume: rerun this command
    return draw(output_dir)


def draw(output_dir):
    """gain.png and study.md from the finished runs under output_dir, titled with what those runs share."""
    found = compared(output_dir)
    if not found:
        raise UserError(f"{output_dir} holds no setting with finished runs of dropout_num 1 and 8; run the study first")
    try:
        trainingmonitor.plot_gain(output_dir / "gain.png", [(label, d) for label, _, _, d, _ in found], caption(output_dir))
        atomic_write(output_dir / "study.md", lambda tmp: Path(tmp).write_text(table(found)))
    except OSError as e:
        raise UserError(f"cannot write the study's figure or table in {output_dir} ({e.strerror or e}); choose another folder")
    print(f"study.py: wrote {output_dir / 'gain.png'} and {output_dir / 'study.md'}")
    return 0


def caption(output_dir):
    """'5000/5000 images, 10 epochs, fp32, seeds 42 43 44, cpu': the protocol as the runs themselves recorded it."""
    configs = [r["config"] for folder in SETTINGS for r in trainingmonitor.finished_runs(output_dir / folder)]
    values = {key: "/".join(sorted({str(c.get(key, "?")) for c in configs}))
              for key in ("train_images", "valid_images", "epochs", "precision", "device")}
    seeds = " ".join(str(s) for s in sorted({c["seed"] for c in configs}))
    return (f"{values['train_images']}/{values['valid_images']} images, {values['epochs']} epochs, "
            f"{values['precision']}, seeds {seeds}, {values['device']}")


if __name__ == "__main__":
    sys.exit(main())
