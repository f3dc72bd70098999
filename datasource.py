"""The data: CIFAR-10, CIFAR-100 or SVHN as uint8 arrays (torchvision's official release, or an image-folder
copy), then on the training device as whole tensors, batched, augmented and normalised there.

--data_dir is either torchvision's root (the default `data/`: the official release is
downloaded there when missing) or a folder / .tar / .tar.gz in the image-folder layout
train/<class>/*.png|jpg and test/<class>/*, optionally inside one wrapping folder.
Image folders are decoded once and cached as uint8 arrays under the repo's data/cache/ (or $MSD_CACHE_DIR).
"""
import hashlib
import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bookkeeping import distributed, runlock
from bookkeeping.imagefolders import LAYOUT, decode_archive, decode_folder, split_root, visible
from tools import UserError, atomic_write

# Decoded image-folder copies; MSD_CACHE_DIR moves them (the tests send theirs, subprocesses too, to a temporary folder)
CACHE_DIR = Path(os.environ.get("MSD_CACHE_DIR") or Path(__file__).resolve().parent / "data" / "cache")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")

# Per-channel mean and std of each official training set, as fractions of 255. We could not recompute
# CIFAR-100's and SVHN's here (no copy offline), so these are the values public code uses for them.
STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),  # the 50,000 official training images
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),  # as in weiaicunzai/pytorch-cifar100
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),  # the 73,257 'train' images, as commonly quoted
}
# torchvision's "not found or corrupted", or a file cut short while another process's download rewrites it
UNREADABLE = (RuntimeError, EOFError, pickle.UnpicklingError)
CLASS_COUNTS = {"cifar10": 10, "cifar100": 100, "svhn": 10}  # a copy holds its set's classes or some of them
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
OFFICIAL = {  # (name, what to put in --data_dir by hand when offline)
    "cifar10": ("CIFAR-10", "the official cifar-10-python.tar.gz"),
    "cifar100": ("CIFAR-100", "the official cifar-100-python.tar.gz"),
    "svhn": ("SVHN", "the official train_32x32.mat and test_32x32.mat"),
}


def source_id(data_dir, dataset="cifar10"):
    """A short name for the data a run reads; part of the run's identity."""
    path = Path(data_dir)
    if path.name.endswith(ARCHIVE_SUFFIXES):
        if not path.is_file():
            raise UserError(f"--data_dir {data_dir}: no such archive; give an existing .tar/.tar.gz or a folder")
        return "archive-" + _file_sha256(path)[:12]
    if path.is_file():
        raise UserError(f"--data_dir {data_dir} is a file, not a folder or a {'/'.join(ARCHIVE_SUFFIXES)} archive")
    root = split_root(path) if path.is_dir() else None
    if root:
        return f"folder-{_folder_key(root)[:12]}"
    if path.is_dir() and any((d / "train").is_dir() for d in [path, *visible(path)] if d.is_dir()):
        raise UserError(f"--data_dir {data_dir} has train/ but no test/ beside it; expected {LAYOUT}")
    return f"torchvision-{dataset}"  # torchvision's root: the official release is downloaded into it


def load(data_dir, dataset="cifar10", made=None):
    """{'train_x','test_x': (N,32,32,3) uint8, 'train_y','test_y': (N,) int64, 'classes': [str]}. made: the folders
    a failed download removes where empty (default: those of data_dir this process finds missing)."""
    path = Path(data_dir)
    source = source_id(path, dataset)
    if source.startswith("torchvision"):
        return _load_torchvision(path, dataset, made)
    data = _read_cache(CACHE_DIR / f"{source}.npz") or _decode(path, source)
    problem = _copy_problem(data["classes"], dataset)
    if problem:
        raise UserError(f"--data_dir {data_dir} {problem}")
    return data


def _copy_problem(classes, dataset):
    """Why an image-folder copy cannot be one of --dataset (which sets its normalisation and its runs' names), or
    None. A copy holds the set's classes or some of them (three, for a quick check); CIFAR-10's are known by name."""
    if len(classes) > CLASS_COUNTS[dataset]:
        return (f"holds {len(classes)} classes, more than {OFFICIAL[dataset][0]}'s {CLASS_COUNTS[dataset]}: give the "
                "--dataset it is a copy of (cifar100 for CIFAR-100's 100)")
    if classes == CIFAR10_CLASSES and dataset != "cifar10":
        return f"holds CIFAR-10's ten classes, not {OFFICIAL[dataset][0]}: give --dataset cifar10"
    return None


def _decode(path, source):
    """An image-folder copy's arrays, decoded once and cached where the cache can be written."""
    cache = CACHE_DIR / f"{source}.npz"
    writable = _can_write(CACHE_DIR)
    print(f"decoding {path} once; the arrays are cached in {CACHE_DIR}" if writable else
          f"decoding {path}; {CACHE_DIR} cannot be written, so it is decoded again next time (set MSD_CACHE_DIR to a "
          "writable folder to keep it)", flush=True)
    scratch = CACHE_DIR if writable else None  # extract beside the cache, or in the system's temporary folder
    data = decode_archive(path, scratch) if source.startswith("archive") else decode_folder(split_root(path))
    if writable:
        atomic_write(cache, lambda tmp: _write_npz(tmp, data))
    return data


def download(data_dir, dataset="cifar10"):
    """The official release into torchvision's root data_dir, if it is one and lacks it (a one-line error offline);
    nothing for an image-folder copy. For a parent process: offline, it stops in one line before any worker starts."""
    if source_id(data_dir, dataset).startswith("torchvision"):
        _load_torchvision(Path(data_dir), dataset)


def _read_cache(cache):
    """The decoded arrays, or None if not cached yet or damaged (a cut copy, say: it is decoded again and replaced)."""
    if not cache.exists():
        return None
    try:
        with np.load(cache) as f:
            return {k: f[k] if k != "classes" else f[k].tolist() for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        print(f"{cache} cannot be read ({type(e).__name__}): decoding the images again", flush=True)
        return None


def _can_write(folder):
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
        return True
    except OSError:
        return False


def data_source(args):
    return source_id(args.data_dir, args.dataset)


def split(data, args):
    """(train, valid, test) index arrays in the data's order; --data_seed alone picks them.

    The validation images (--valid_split of them, none by default) come out of the training set.
    """
    n_train, n_test = len(data["train_y"]), len(data["test_y"])
    rng = np.random.default_rng(args.data_seed)
    train_order, test_order = rng.permutation(n_train), rng.permutation(n_test)
    train_size = n_train - args.valid_split if args.train_size is None else args.train_size
    test_size = n_test if args.test_size is None else args.test_size
    if args.valid_split >= n_train:
        raise UserError(f"--valid_split {args.valid_split} leaves none of the {n_train} training images to train on; "
                        "lower it")
    if args.valid_split + train_size > n_train or test_size > n_test:
        raise UserError(f"asked for {args.valid_split} validation + {train_size} training images of {n_train} and "
                        f"{test_size} test images of {n_test}; lower --train_size/--valid_split/--test_size")
    valid = train_order[:args.valid_split]
    train = train_order[args.valid_split:args.valid_split + train_size]
    return np.sort(train), np.sort(valid), np.sort(test_order[:test_size])


def to_device(x, y, device):
    """uint8 NHWC images -> uint8 NCHW on the device (normalised per batch), and their labels."""
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(device), torch.from_numpy(y).to(device)


def load_splits(args, device):
    """{'train', 'valid', 'test'}: (images, labels) on the device, and the number of classes."""
    data = load(args.data_dir, args.dataset, distributed.missing_on_every_rank(args.data_dir))  # all ranks, in step
    train, valid, test = split(data, args)
    splits = {"train": to_device(data["train_x"][train], data["train_y"][train], device),
              "test": to_device(data["test_x"][test], data["test_y"][test], device)}
    # without a validation split the curves are on the test set, as in the blog post's code
    splits["valid"] = to_device(data["train_x"][valid], data["train_y"][valid], device) if args.valid_split else splits["test"]
    return splits, len(data["classes"])


def input_transform(dataset, device):
    """uint8 images -> normalised float32, channels_last."""
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) * 255 for v in STATS[dataset])
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


def train_batches(x, y, batch_size, generator, augment, prepare, rank=0, world=1):
    """Shuffled full batches (the last incomplete one is dropped), prepared (normalised) on the device.

    Under torchrun every rank draws the same permutation and augments the whole batch, so the generators stay in
    step and a batch's images do not depend on the number of ranks; each rank then keeps its slice of it.
    """
    order = torch.randperm(len(y), generator=generator, device=x.device)
    mine = slice(rank * batch_size // world, (rank + 1) * batch_size // world)
    for i in range(len(y) // batch_size):
        idx = order[i * batch_size:(i + 1) * batch_size]
        xb = random_crop_flip(x[idx], generator) if augment else x[idx]
        yield prepare(xb[mine]), y[idx][mine]


def _write_npz(path, arrays):
    with open(path, "wb") as f:  # a file object, or np.savez appends .npz to the name
        np.savez(f, **arrays)


def _load_torchvision(root, dataset, made=None):
    """The official release in root, downloaded into it first where missing or damaged. One process downloads while
    the others (torchrun's ranks, several run.py on one data/) wait for its lock, then find the files there; a failed
    download leaves no folder it made."""
    name, files = OFFICIAL[dataset]
    try:
        try:
            splits = _official_splits(root, dataset, download=False)
        except UNREADABLE:
            with runlock.waiting(root / f".download-{dataset}.lock", f"download {name} into {root}/", made):
                splits = _official_splits(root, dataset, download=True)  # finds another process's download, if any
    except (OSError, *UNREADABLE) as e:  # URLError is an OSError
        raise UserError(f"{name} is not in {root}/ and could not be downloaded ({e}): put {files} in {root}/, "
                        f"or pass --data_dir an image-folder copy ({LAYOUT}, folder or .tar.gz)")
    (train_x, train_y), (test_x, test_y), classes = splits
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y, "classes": classes}


def _official_splits(root, dataset, download):
    """(train, test) as (N,32,32,3) uint8 and int64 arrays, and the class names, through torchvision (which
    raises RuntimeError where the files are missing or fail their md5 and download is False)."""
    from torchvision import datasets

    if dataset == "svhn":  # .mat files, NCHW, digits 0-9 (torchvision maps the file's label 10 to 0)
        splits = [datasets.SVHN(root, split=split, download=download) for split in ("train", "test")]
        return *[(s.data.transpose(0, 2, 3, 1), s.labels.astype(np.int64)) for s in splits], [str(d) for d in range(10)]
    official = datasets.CIFAR10 if dataset == "cifar10" else datasets.CIFAR100
    splits = [official(root, train=train, download=download) for train in (True, False)]
    return *[(s.data, np.asarray(s.targets, np.int64)) for s in splits], list(splits[0].classes)


def _folder_key(root):
    """Hash of every visible file's path, size and mtime: a changed source is decoded again."""
    h = hashlib.sha256()
    for f in sorted(root.rglob("*")):
        if f.is_file() and not any(part.startswith(".") for part in f.relative_to(root).parts):
            st = f.stat()
            h.update(f"{f.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
