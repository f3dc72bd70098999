"""What defines a run: the flags that change its numbers, its directory name, and the setup it is compared within.

No torch in here: run.py reads it before the slow imports, so --help stays instant.
"""
import hashlib
import json

from tools import UserError

IMAGE_SETS = ["cifar10", "cifar100", "svhn"]
# The flags that change a run's numbers (with the data's identity and the resolved precision).
# They name the run directory and decide what may be resumed and what may be compared.
DEFINING = ["dataset", "data_source", "model", "dropout_num", "dropout_p", "batch_size", "lr", "lr_milestone",
            "augment", "seed", "data_seed", "train_size", "test_size", "valid_split", "precision", "rdrop_alpha",
            "head_hidden", "pool", "diversity", "msd_reduce", "msd_heads", "compile", "cuda_graph"]
# Defining flags added after the first runs: at this value they stay out of a run's name and hash, so the
# runs from before them keep theirs; another value enters both.
OMITTED_AT_DEFAULT = {"valid_split": 0, "rdrop_alpha": 0.0, "head_hidden": 0, "pool": "avg4", "diversity": "none",
                      "msd_reduce": "loss", "msd_heads": "shared", "compile": False, "cuda_graph": False}
HEAD_OPTIONS = ["head_hidden", "pool", "diversity", "msd_reduce", "msd_heads"]  # the ResNet head's options
GRID = ["seed", "dropout_p", "dropout_num", "rdrop_alpha"]  # flags that take several values; runs differing only in these are compared


def short_hash(values):
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:8]


def defining_flags(config):
    """The values that define the experiment; a later flag at its default is left out, so older runs keep their names."""
    values = {k: config.get(k, OMITTED_AT_DEFAULT.get(k)) for k in DEFINING}
    return {k: v for k, v in values.items() if not (k in OMITTED_AT_DEFAULT and v == OMITTED_AT_DEFAULT[k])}


def setup_flags(config):
    """The defining flags that are not grid flags: what every run of one comparison shares (--compile and
    --cuda_graph only when on, so the summaries of eager runs read as they did before those defined a run)."""
    flags = {k: config.get(k, OMITTED_AT_DEFAULT.get(k)) for k in DEFINING if k not in GRID}
    return {k: v for k, v in flags.items() if k not in ("compile", "cuda_graph") or v}


def run_identity(config):
    """(run directory name, setup name) from the defining flags."""
    defining = defining_flags(config)
    setup = {k: v for k, v in defining.items() if k not in GRID}
    c = config
    rdrop = f"_r{c['rdrop_alpha']}" if c.get("rdrop_alpha") else ""
    head = "".join(f"_{label}{c[k]}" for k, label in zip(HEAD_OPTIONS, ("h", "", "", "", ""))
                   if c.get(k, OMITTED_AT_DEFAULT[k]) != OMITTED_AT_DEFAULT[k])  # _h512_avg2_flip, _logits; nothing by default
    # inductor draws its own dropout masks, and a CUDA graph runs Adam capturable: another experiment each
    step = "_compiled" if c.get("compile") else "_graph" if c.get("cuda_graph") else ""
    run = f"{c['model']}_{c['dataset']}_m{c['dropout_num']}_p{c['dropout_p']}{rdrop}{head}{step}_s{c['seed']}-{short_hash(defining)}"
    return run, f"{c['model']}_{c['dataset']}-{short_hash(setup)}"


def step_of(config):
    """How the run's training step ran: eager, compiled (--compile) or CUDA graph (--cuda_graph)."""
    return "compiled" if config.get("compile") else "CUDA graph" if config.get("cuda_graph") else "eager"


def check_same_experiment(saved, wanted, path, advice="use another --output_dir or --overwrite"):
    """Refuse a checkpoint whose defining flags differ from this command's."""
    saved, wanted = (dict(OMITTED_AT_DEFAULT, **defining_flags(c)) for c in (saved, wanted))  # a flag at its default, named
    for flag in DEFINING:
        if saved.get(flag) != wanted.get(flag):
            name = "data (--data_dir)" if flag == "data_source" else f"--{flag}"  # the data's identity, not a flag
            raise UserError(f"{path} is another experiment: its {name} is {saved.get(flag)!r}, "
                            f"this command's {wanted.get(flag)!r}; {advice}")
