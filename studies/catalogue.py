"""The studies as data: the protocols (run.py's flags), the settings (a folder each), and each study's runs,
paired comparisons and figure. study.py trains and draws them; nothing here imports torch.
"""
import collections

# --protocol: run.py's flags. --precision is left to auto (bf16 where the device computes it natively, else
# fp32) except where a protocol fixes it; a run records what it used, and the tables say where each pair ran.
PROTOCOLS = {
    "converged": (["--train_size", "10000", "--epochs", "25", "--lr_milestone", "20"],
                  "10,000 training images, all 10,000 test images, 25 epochs, lr / 10 after epoch 20: dropout_num=1 "
                  "ends at training accuracy 0.99 with a flat valid accuracy (the pilot in docs/pilot-converged-xeon)"),
    "reduced": (["--train_size", "5000", "--test_size", "5000", "--epochs", "10", "--lr_milestone", "5",
                 "--precision", "fp32"], "5,000 training and 5,000 test images, 10 epochs, lr / 10 after epoch 5, "
                "fp32 (far from converged: accuracies of 0.37 to 0.51)"),
    "full": (["--epochs", "20", "--lr_milestone", "10"],
             "the blog's recipe: all 50,000 / 10,000 images, 20 epochs, lr / 10 after epoch 10; precision auto: bf16 "
             "on CPUs with AVX512-BF16 or AMX and on GPUs with bf16, else fp32 (seeds 42-46 on the H200 ran fp32)"),
    "smoke": (["--train_size", "200", "--test_size", "100", "--epochs", "2", "--batch_size", "50"],
              "200 training and 100 test images, 2 epochs: checks that a study runs, measures nothing"),
}
# folder: (label, run.py flags). Every setting's runs live in their own folder under the protocol's.
SETTINGS = {
    "blog-head": ("the blog's head", []),
    "hidden512": ("--head_hidden 512", ["--head_hidden", "512"]),
    "avg2": ("--pool avg2", ["--pool", "avg2"]),
    "avg2-flip": ("--pool avg2 --diversity flip", ["--pool", "avg2", "--diversity", "flip"]),
    "avg2-pad": ("--pool avg2 --diversity pad", ["--pool", "avg2", "--diversity", "pad"]),
    "augment": ("the blog's head, --augment", ["--augment"]),
    "logits": ("mean of logits", ["--msd_reduce", "logits"]),
    "separate": ("separate heads", ["--msd_heads", "separate"]),
}
Study = collections.namedtuple("Study", "about seeds runs pairs figure")
Point = collections.namedtuple("Point", "setting dropout_num dropout_p")  # one setting's runs at one (M, p)


def eight_vs(setting, reference="blog-head", m=1):
    return Point(setting, 8, 0.5), Point(reference, m, 0.5)


FIRST_SEED = 42  # a study's seeds are 42, 43, ...: seeds run outermost, so the first ones complete first
MORE_SEEDS = 5  # the rule: a comparison whose interval over the study's seeds excludes zero gets this many more
SAMPLES = [1, 2, 4, 8, 16, 32, 64]
RATES = [0.1, 0.3, 0.5, 0.7, 0.9]
STUDIES = {
    "samples": Study("final valid error against the number of dropout samples M, at p = 0.5", 5,
                     [("blog-head", SAMPLES, [0.5])],
                     [(f"M={m} − M=1", Point("blog-head", m, 0.5), Point("blog-head", 1, 0.5)) for m in SAMPLES[1:]],
                     "samples"),
    "rate": Study("final valid error against the dropout probability p, for M = 1 and 8", 5,
                  [("blog-head", [1, 8], RATES)],
                  [(f"p={p}: M=8 − M=1", Point("blog-head", 8, p), Point("blog-head", 1, p)) for p in RATES], "rate"),
    "convergence": Study("valid accuracy and training loss epoch by epoch, no dropout, M = 1 and 8", 10,
                         [("blog-head", [0, 1, 8], [0.5])],
                         [("M=8 − M=1", *eight_vs("blog-head")), ("M=0 − M=1", Point("blog-head", 0, 0.5),
                                                                   Point("blog-head", 1, 0.5))], "convergence"),
    "where": Study("M=8 against M=1 for six heads and settings, and diversity against none", 5,
                   [("blog-head", [1, 8], [0.5]), ("hidden512", [1, 8], [0.5]), ("avg2", [1, 8], [0.5]),
                    ("avg2-flip", [8], [0.5]), ("avg2-pad", [8], [0.5]), ("augment", [1, 8], [0.5])],
                   [(f"{SETTINGS[s][0]}: M=8 − M=1", *eight_vs(s, s)) for s in ("blog-head", "hidden512", "avg2")]
                   + [(f"{SETTINGS[s][0]}: M=8 − avg2's M=1", *eight_vs(s, "avg2")) for s in ("avg2-flip", "avg2-pad")]
                   + [(f"{SETTINGS[s][0]}: M=8 − avg2's M=8", *eight_vs(s, "avg2", 8)) for s in ("avg2-flip", "avg2-pad")]
                   + [(f"{SETTINGS['augment'][0]}: M=8 − M=1", *eight_vs("augment", "augment"))], "gain"),
    "variants": Study("the three heads called multi-sample dropout, M=8, against M=1 and against the paper's", 5,
                      [("blog-head", [1, 8], [0.5]), ("logits", [8], [0.5]), ("separate", [8], [0.5])],
                      [("the paper's (mean of losses): M=8 − M=1", *eight_vs("blog-head"))]
                      + [(f"{SETTINGS[s][0]}: M=8 − M=1", *eight_vs(s)) for s in ("logits", "separate")]
                      + [(f"{SETTINGS[s][0]} − the paper's, M=8", *eight_vs(s, "blog-head", 8)) for s in ("logits", "separate")],
                      "gain"),
}


def own_seeds(study):
    """The seeds a study runs without --seed, where the rule decides: 42, 43, ..."""
    return range(FIRST_SEED, FIRST_SEED + study.seeds)


def study_points(study):
    return [Point(setting, m, p) for setting, samples, rates in study.runs for p in rates for m in samples]
