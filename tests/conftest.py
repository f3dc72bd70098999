"""Shared fixtures: a small real CIFAR-10 subset, a private cache, and torchvision offline."""
import csv
import io
import json
import os
import sys
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar as tv_cifar
import torchvision.datasets.svhn as tv_svhn
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import datasource  # noqa: E402
import tools  # noqa: E402
from nn import MultiSampleDropout  # noqa: E402

SHARED_ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"  # the JPEG copy (see the README)
OFFICIAL_ROOT = ROOT / "data"  # where run.py downloads the official release
SUBSET = {"train": 30, "test": 10}  # images a class


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory):
    """Decoded arrays go to a temporary folder, not the repo's data/cache: this process's, and its subprocesses'."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasource, "CACHE_DIR", cache)
        mp.setenv("MSD_CACHE_DIR", str(cache))
        yield


@pytest.fixture(scope="session")
def small_cifar(tmp_path_factory):
    """A real CIFAR-10 subset as an image-folder .tar.gz: the first 30 train and 10 test images of each class,
    cut from the shared JPEG copy, or else from the official release that run.py downloads into data/."""
    out = tmp_path_factory.mktemp("small") / "cifar10-small.tar.gz"
    if SHARED_ARCHIVE.exists():
        cut_archive(SHARED_ARCHIVE, out)
    elif (OFFICIAL_ROOT / "cifar-10-batches-py").is_dir():
        cut_official(OFFICIAL_ROOT, out)
    else:
        where = f"run `python run.py` once to download it into {OFFICIAL_ROOT}, or put the JPEG copy at {SHARED_ARCHIVE}"
        if os.environ.get("CI"):
            pytest.fail(f"CI needs CIFAR-10 for the tests that train: {where}")
        pytest.skip(f"no CIFAR-10 for the tests that train: {where}")
    return out


def cut_archive(archive, out):
    counts = {}
    with tarfile.open(archive) as src, tarfile.open(out, "w:gz") as dst:
        for member in src:  # streamed: the archive is read once, front to back
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 3 and parts[0] in SUBSET:
                key = tuple(parts[:2])
                if counts.get(key, 0) < SUBSET[parts[0]]:
                    counts[key] = counts.get(key, 0) + 1
                    dst.addfile(member, src.extractfile(member))
    assert len(counts) == 20 and sum(counts.values()) == 400


def cut_official(root, out):
    """The same subset from the official release as datasource reads it, each image a PNG, so no pixel changes."""
    data = datasource.load(root)
    with tarfile.open(out, "w:gz") as dst:
        for split, n in SUBSET.items():
            x, y = data[f"{split}_x"], data[f"{split}_y"]
            for label, name in enumerate(data["classes"]):
                first = np.flatnonzero(y == label)[:n]
                assert len(first) == n
                for i, index in enumerate(first):
                    png = io.BytesIO()
                    Image.fromarray(x[index]).save(png, "PNG")
                    member = tarfile.TarInfo(f"{split}/{name}/{i:04d}.png")
                    member.size = png.tell()
                    png.seek(0)
                    dst.addfile(member, png)


def cli(capsys, *args):
    """run.main in-process: (exit status, stdout, stderr)."""
    import run
    rc = run.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def rows(run_dir, drop=("seconds",)):
    """metrics.csv as dicts of strings, without the (machine-dependent) seconds column."""
    with open(run_dir / "metrics.csv") as f:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(f)]


def result_tables(summary_path):
    """The rows (lines below the header) of each results table in a summary.md: those whose first column is dropout_num."""
    blocks = Path(summary_path).read_text().split("\n\n")
    return [b.splitlines()[2:] for b in blocks if b.startswith("| dropout_num")]


def fake_run(m, seed, accs, p=0.5):
    """A finished run as finished_runs() gives it, with this valid accuracy curve."""
    history = [{"epoch": e, "lr": 0.01, "train_loss": 1.0, "train_acc": a, "valid_loss": 2.0 - a, "valid_acc": a,
                "seconds": 1.0} for e, a in enumerate(accs, 1)]
    config = {"dropout_num": m, "dropout_p": p, "seed": seed, "data_source": "x", "data_dir": "data", "rdrop_alpha": 0.0,
              "valid_split": 0, "head_hidden": 0, "pool": "avg4", "diversity": "none", "msd_reduce": "loss",
              "msd_heads": "shared", "compile": False}
    return {"dir": Path(f"m{m}_s{seed}"), "config": config, "history": history, "test": None}


def run_dirs(output_dir, dropout_num):
    return sorted(Path(output_dir).glob(f"miniresnet_cifar10_m{dropout_num}_*"))


# --- for the head's tests (test_head.py, test_head_options.py) ---

B, D, C = 64, 16, 10


class RecordingHead(torch.nn.Module):
    """A linear head that counts its calls and keeps its last input and output."""

    def __init__(self, head=None):
        super().__init__()
        self.head = head or torch.nn.Linear(D, C)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        self.input, self.output = x, self.head(x)
        return self.output


def make_msd(dropout_num, p=0.5, head=None, train=True, rdrop_alpha=0.0):
    torch.manual_seed(0)
    msd = MultiSampleDropout(RecordingHead(head), dropout_num, p, rdrop_alpha)
    return msd.train(train)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, D, generator=g), torch.randint(0, C, (B,), generator=g)


def write_json(path, obj):
    """A run's JSON file as training writes it."""
    tools.atomic_write(path, tools.json_writer(obj))


def offline(url, root, *args, **kwargs):
    os.makedirs(root, exist_ok=True)  # as torchvision's download_url does before it tries the network
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


@pytest.fixture
def no_network(monkeypatch):
    """Integrity = the file exists (the real md5s fit only the real files); downloads fail as offline."""
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))
    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    monkeypatch.setattr(tv_svhn, "check_integrity", lambda path, md5=None: os.path.isfile(path))

    def download_url(url, root, filename, md5):  # torchvision's skips a file that is already there
        if not os.path.isfile(os.path.join(root, filename)):
            offline(url, root)
    monkeypatch.setattr(tv_svhn, "download_url", download_url)


def write_runs(folder, finals, seeds=(42, 43, 44), precision="fp32", train_size=5000):
    """Finished runs whose final valid accuracies are finals[(m, p)][seed index] (or finals[m] at p = 0.5)."""
    for key, values in finals.items():
        m, p = key if isinstance(key, tuple) else (key, 0.5)
        for seed, final in zip(seeds, values):
            run = fake_run(m, seed, [0.3, final], p)
            run["config"].update(epochs=2, dataset="cifar10", model="miniresnet", data_source="x", batch_size=128,
                                 lr=0.01, lr_milestone=1, augment=False, data_seed=0, train_size=train_size,
                                 test_size=5000, precision=precision, train_images=5000, valid_images=5000, device="cpu",
                                 hardware="Some CPU (family 1)", setup="miniresnet_cifar10-x")
            name = f"m{m}_p{p}_s{seed}-{precision}"
            (folder / name).mkdir(parents=True)
            write_json(folder / name / "config.json", run["config"])
            write_json(folder / name / "metrics.json", run["history"])


def set_curves(folder, m, seed, **per_epoch):
    """Give a write_runs run these per-epoch values (train_loss=[...], ...), as many epochs as they have."""
    run = folder / f"m{m}_p0.5_s{seed}-fp32"
    n = len(next(iter(per_epoch.values())))
    history = [{**row, **{k: v[e] for k, v in per_epoch.items()}} for e, row in enumerate(fake_run(m, seed, [0.5] * n)["history"])]
    write_json(run / "metrics.json", history)
    write_json(run / "config.json", {**json.loads((run / "config.json").read_text()), "epochs": n})
