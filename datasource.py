"""Loading CIFAR-10 as uint8 arrays: torchvision's official release, or an image-folder copy.

--data_dir is either torchvision's root (the default `data/`: the official release is
downloaded there when missing) or a folder / .tar / .tar.gz in the image-folder layout
train/<class>/*.png|jpg and test/<class>/*, optionally inside one wrapping folder.
Image folders are decoded once and cached as uint8 arrays under the repo's data/cache/.
"""
import hashlib
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from tools import UserError, atomic_write

CACHE_DIR = Path(__file__).resolve().parent / "data" / "cache"
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
LAYOUT = "train/<class>/*.png|jpg and test/<class>/*"


def source_id(data_dir, dataset="cifar10"):
    """A short name for the data a run reads; part of the run's identity."""
    path = Path(data_dir)
    if path.name.endswith(ARCHIVE_SUFFIXES):
        if not path.is_file():
            raise UserError(f"--data_dir {data_dir}: no such archive; give an existing .tar/.tar.gz or a folder")
        return "archive-" + _file_sha256(path)[:12]
    root = _split_root(path) if path.is_dir() else None
    if root:
        return f"folder-{_folder_key(root)[:12]}"
    if path.is_dir() and any((d / "train").is_dir() for d in [path, *_visible(path)] if d.is_dir()):
        raise UserError(f"--data_dir {data_dir} has train/ but no test/ beside it; expected {LAYOUT}")
    return f"torchvision-{dataset}"  # torchvision's root: the official release is downloaded into it


def load(data_dir, dataset="cifar10"):
    """{'train_x','test_x': (N,32,32,3) uint8, 'train_y','test_y': (N,) int64, 'classes': [str]}."""
    path = Path(data_dir)
    source = source_id(path, dataset)
    if source.startswith("torchvision"):
        return _load_torchvision(path)
    cache = CACHE_DIR / f"{source}.npz"
    if cache.exists():
        with np.load(cache) as f:
            return {k: f[k] if k != "classes" else f[k].tolist() for k in f.files}
    print(f"decoding {path} once; the arrays are cached in {CACHE_DIR}", flush=True)
    data = _decode_archive(path) if source.startswith("archive") else _decode_folder(_split_root(path))
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    atomic_write(cache, lambda tmp: _write_npz(tmp, data))
    return data


def _write_npz(path, arrays):
    with open(path, "wb") as f:  # a file object, or np.savez appends .npz to the name
        np.savez(f, **arrays)


def _load_torchvision(root):
    from torchvision.datasets import CIFAR10

    try:
        splits = [CIFAR10(root, train=train, download=True) for train in (True, False)]
    except (OSError, RuntimeError) as e:  # URLError is an OSError
        raise UserError(
            f"CIFAR-10 is not in {root}/ and could not be downloaded ({e}): put the official "
            f"cifar-10-python.tar.gz in {root}/, or pass --data_dir an image-folder copy ({LAYOUT}, folder or .tar.gz)")
    (train, test) = splits
    return {"train_x": train.data, "train_y": np.asarray(train.targets, np.int64),
            "test_x": test.data, "test_y": np.asarray(test.targets, np.int64), "classes": list(train.classes)}


def _split_root(path):
    """`path` or its single visible subfolder, whichever holds train/ and test/; else None."""
    if _has_splits(path):
        return path
    subdirs = [d for d in _visible(path) if d.is_dir()]
    return subdirs[0] if len(subdirs) == 1 and _has_splits(subdirs[0]) else None


def _has_splits(folder):
    return (folder / "train").is_dir() and (folder / "test").is_dir()


def _visible(folder):
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


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


def _decode_archive(path):
    if not hasattr(tarfile, "data_filter"):
        raise UserError("safe archive extraction needs Python 3.10.12+, 3.11.4+ or 3.12+; extract the archive "
                        "yourself and pass --data_dir the folder")
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE_DIR, prefix=".extract-") as tmp:
        try:
            with tarfile.open(path) as tar:
                tar.extractall(tmp, filter=_refuse_unsafe)
        except tarfile.FilterError as e:
            raise UserError(f"refusing archive {path}: {e}; it would write outside its folder")
        except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
            raise UserError(f"cannot read archive {path} ({e}); it may be truncated or corrupt: fetch it again")
        root = _split_root(Path(tmp))
        if root is None:
            raise UserError(f"archive {path} is not in the image-folder layout {LAYOUT}")
        return _decode_folder(root)


def _refuse_unsafe(member, dest):
    """tarfile's 'data' filter (no '..', no links out, no devices), and absolute names refused, not made relative."""
    if member.name.startswith(("/", "\\")):
        raise tarfile.AbsolutePathError(member)
    return tarfile.data_filter(member, dest)


def _decode_folder(root):
    classes = [d.name for d in _visible(root / "train") if d.is_dir()]
    test_classes = [d.name for d in _visible(root / "test") if d.is_dir()]
    if not classes:
        raise UserError(f"{root / 'train'} has no class folders; expected {LAYOUT}")
    if test_classes != classes:
        raise UserError(f"{root}: test classes {test_classes} differ from train classes {classes}; every class needs both")
    (train_x, train_y), (test_x, test_y) = (_decode_split(root / split, classes) for split in ("train", "test"))
    for split, x in (("train", train_x), ("test", test_x)):
        if x.shape[1:3] != (32, 32):
            raise UserError(f"{root / split} holds {x.shape[2]}x{x.shape[1]} images; the CIFAR networks take 32x32")
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y, "classes": classes}


def _decode_split(split_dir, classes):
    images, labels = [], []
    for label, name in enumerate(classes):
        files = [f for f in _visible(split_dir / name) if f.is_file()]
        if not files:
            raise UserError(f"{split_dir / name} holds no images; every class needs some")
        for f in files:
            images.append(_read_image(f, images[0].shape if images else None))
            labels.append(label)
    return np.stack(images), np.asarray(labels, np.int64)


def _read_image(path, expected_shape):
    try:
        with Image.open(path) as im:
            pixels = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"{path} is not a readable image ({e}); remove it or replace it")
    if expected_shape is not None and pixels.shape != expected_shape:
        raise UserError(f"{path} is {pixels.shape[1]}x{pixels.shape[0]}, the others {expected_shape[1]}x{expected_shape[0]}; remove or resize it")
    return pixels
