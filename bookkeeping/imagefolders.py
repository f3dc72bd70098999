"""Image-folder copies of a data set on disk: train/<class>/* and test/<class>/*, as a folder or a .tar/.tar.gz
(optionally inside one wrapping folder), found and decoded into uint8 arrays. datasource.py caches what this decodes."""
import tarfile
import tempfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from tools import UserError

LAYOUT = "train/<class>/*.png|jpg and test/<class>/*"


def split_root(path):
    """`path` or its single visible subfolder, whichever holds train/ and test/; else None."""
    if _has_splits(path):
        return path
    subdirs = [d for d in visible(path) if d.is_dir()]
    return subdirs[0] if len(subdirs) == 1 and _has_splits(subdirs[0]) else None


def _has_splits(folder):
    return (folder / "train").is_dir() and (folder / "test").is_dir()


def visible(folder):
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def decode_archive(path, scratch):
    if not hasattr(tarfile, "data_filter"):
        raise UserError("safe archive extraction needs Python 3.10.12+, 3.11.4+ or 3.12+; extract the archive "
                        "yourself and pass --data_dir the folder")
    with tempfile.TemporaryDirectory(dir=scratch, prefix=".extract-") as tmp:
        try:
            with tarfile.open(path) as tar:
                tar.extractall(tmp, filter=_refuse_unsafe)
        except tarfile.FilterError as e:
            raise UserError(f"refusing archive {path}: {e}; it would write outside its folder")
        except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
            reason = " ".join(str(e).split())  # tarfile's ReadError lists each method it tried, a line each
            raise UserError(f"cannot read archive {path} ({reason}); it may be truncated or corrupt: fetch it again")
        root = split_root(Path(tmp))
        if root is None:
            raise UserError(f"archive {path} is not in the image-folder layout {LAYOUT}")
        try:
            return decode_folder(root)
        except UserError as e:  # it names files in the temporary folder, gone once we return: name them in the archive
            raise UserError(str(e).replace(tmp, str(path))) from None


def _refuse_unsafe(member, dest):
    """tarfile's 'data' filter (no '..', no links out, no devices), and absolute names refused, not made relative."""
    if member.name.startswith(("/", "\\")):
        raise tarfile.AbsolutePathError(member)
    return tarfile.data_filter(member, dest)


def decode_folder(root):
    classes = [d.name for d in visible(root / "train") if d.is_dir()]
    test_classes = [d.name for d in visible(root / "test") if d.is_dir()]
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
        files = [f for f in visible(split_dir / name) if f.is_file()]
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
