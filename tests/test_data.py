import io
import pickle
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

import datasource
from tools import UserError

CLASSES = ["cat", "dog", "frog"]


def write_folder(root, per_class=(4, 2), size=32, seed=0, classes=CLASSES):
    """An image-folder copy: train/<class>/*.png and test/<class>/*.png, plus hidden clutter."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "test"), per_class):
        for c in classes:
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")
            (folder / ".DS_Store").write_bytes(b"\x00junk")
    (root / "train" / ".ipynb_checkpoints").mkdir()
    return root


def write_tar(folder, path, arcname):
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname=arcname)
    return path


def test_image_folder_loads_in_class_order_and_ignores_hidden_files(tmp_path):
    data = datasource.load(write_folder(tmp_path / "cifar"))
    assert data["classes"] == CLASSES
    assert data["train_x"].shape == (12, 32, 32, 3) and data["train_x"].dtype == np.uint8
    assert data["test_x"].shape == (6, 32, 32, 3)
    assert data["train_y"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    first = np.asarray(Image.open(tmp_path / "cifar" / "train" / "cat" / "0000.png"))
    assert np.array_equal(data["train_x"][0], first)


@pytest.mark.parametrize("arcname", [".", "cifar10"])  # without and with a wrapping folder
def test_tar_gz_gives_the_same_arrays_as_the_folder(tmp_path, arcname):
    folder = write_folder(tmp_path / "cifar")
    archive = write_tar(folder, tmp_path / "cifar.tar.gz", arcname)
    from_folder, from_tar = datasource.load(folder), datasource.load(archive)
    for key in ("train_x", "train_y", "test_x", "test_y"):
        assert np.array_equal(from_folder[key], from_tar[key])
    assert from_tar["classes"] == CLASSES


def test_wrapping_folder_is_found(tmp_path):
    write_folder(tmp_path / "outer" / "cifar10")
    assert datasource.load(tmp_path / "outer")["classes"] == CLASSES


def test_second_load_reads_the_cache_and_a_changed_source_is_decoded_again(tmp_path, monkeypatch):
    folder = write_folder(tmp_path / "cifar")
    first = datasource.load(folder)
    decode = datasource.decode_folder
    monkeypatch.setattr(datasource, "decode_folder", lambda root: pytest.fail("decoded again"))
    assert np.array_equal(datasource.load(folder)["train_x"], first["train_x"])
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "train" / "cat" / "0000.png")
    calls = []
    monkeypatch.setattr(datasource, "decode_folder", lambda root: calls.append(root) or decode(root))
    changed = datasource.load(folder)
    assert len(calls) == 1 and changed["train_x"][0].max() == 0


def unsafe_member(kind, target):
    """A tar member that would write outside the extraction folder."""
    if kind == "dotdot":
        return tarfile.TarInfo("../escaped.png")
    if kind == "absolute":
        return tarfile.TarInfo(str(target / "escaped.png"))
    link = tarfile.TarInfo("train/cat/link.png")
    link.type, link.linkname = tarfile.SYMTYPE, str(target / "escaped.png")
    return link


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_archive_member_outside_the_target_is_refused(tmp_path, kind):
    folder = write_folder(tmp_path / "cifar")
    archive, outside = tmp_path / "evil.tar.gz", tmp_path / "outside"
    outside.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=".")
        member = unsafe_member(kind, outside)
        payload = b"not really a png"
        member.size = 0 if member.issym() else len(payload)
        tar.addfile(member, None if member.issym() else io.BytesIO(payload))
    with pytest.raises(UserError, match="refusing archive"):
        datasource.load(archive)
    assert not list(tmp_path.parent.rglob("escaped.png"))


def test_truncated_archive_is_a_clear_error(tmp_path):
    archive = write_tar(write_folder(tmp_path / "cifar"), tmp_path / "cifar.tar.gz", ".")
    archive.write_bytes(archive.read_bytes()[:2000])
    with pytest.raises(UserError, match="truncated or corrupt"):
        datasource.load(archive)


def test_an_archive_that_is_not_a_tar_is_one_line(tmp_path):
    garbage = tmp_path / "garbage.tar.gz"
    garbage.write_bytes(b"not an archive at all" * 100)
    with pytest.raises(UserError, match="truncated or corrupt") as refused:
        datasource.load(garbage)
    assert "\n" not in str(refused.value)  # tarfile's message has a line per method it tried


def test_a_plain_file_as_data_dir_is_named_as_a_file(tmp_path):
    (tmp_path / "images.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="images.bin is a file, not a folder or a .tar/.tar.gz/.tgz archive"):
        datasource.load(tmp_path / "images.bin")


def test_an_unwritable_cache_decodes_without_caching(tmp_path, monkeypatch, capsys):
    archive = write_tar(write_folder(tmp_path / "cifar"), tmp_path / "cifar.tar.gz", ".")
    (tmp_path / "a file").write_text("")
    monkeypatch.setattr(datasource, "CACHE_DIR", tmp_path / "a file" / "cache")  # cannot be made, as root too
    data = datasource.load(archive)
    assert data["train_x"].shape == (12, 32, 32, 3) and "cannot be written" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a file", "cifar", "cifar.tar.gz"]


def test_a_damaged_cache_is_decoded_again_and_replaced(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(datasource, "CACHE_DIR", tmp_path / "cache")
    archive = write_tar(write_folder(tmp_path / "cifar"), tmp_path / "cifar.tar.gz", ".")
    first = datasource.load(archive)
    (cache,) = (tmp_path / "cache").glob("*.npz")
    cache.write_bytes(cache.read_bytes()[:500])  # cut by a copy that failed
    capsys.readouterr()
    again = datasource.load(archive)
    assert np.array_equal(again["train_x"], first["train_x"]) and "cannot be read" in capsys.readouterr().out
    assert np.array_equal(datasource.load(archive)["train_x"], first["train_x"]) and capsys.readouterr().out == ""


def test_an_empty_image_folder_is_a_clear_error(tmp_path):
    (tmp_path / "cifar" / "train").mkdir(parents=True)
    (tmp_path / "cifar" / "test").mkdir()
    with pytest.raises(UserError, match="has no class folders"):
        datasource.load(tmp_path / "cifar")


def test_bad_folders_name_the_problem(tmp_path):
    missing_class = write_folder(tmp_path / "a")
    for f in (missing_class / "test" / "frog").iterdir():
        f.unlink()
    (missing_class / "test" / "frog").rmdir()
    with pytest.raises(UserError, match="test classes"):
        datasource.load(missing_class)
    not_image = write_folder(tmp_path / "b")
    (not_image / "train" / "dog" / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="notes.txt is not a readable image"):
        datasource.load(not_image)
    wrong_size = write_folder(tmp_path / "c")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(wrong_size / "train" / "dog" / "0001.png")
    with pytest.raises(UserError, match="0001.png is 20x20"):
        datasource.load(wrong_size)


@pytest.mark.parametrize("classes, dataset, message", [
    (datasource.CIFAR10_CLASSES, "cifar100", "holds CIFAR-10's ten classes, not CIFAR-100: give --dataset cifar10"),
    (datasource.CIFAR10_CLASSES, "svhn", "holds CIFAR-10's ten classes, not SVHN: give --dataset cifar10"),
    ([f"class{i:02d}" for i in range(11)], "cifar10", "holds 11 classes, more than CIFAR-10's 10: give the --dataset"),
])
def test_a_copy_of_another_set_than_dataset_is_one_line_and_exit_2(classes, dataset, message, tmp_path, capsys):
    import run
    folder = write_folder(tmp_path / "images", per_class=(1, 1), classes=classes)
    out = tmp_path / "out"
    rc = run.main(["--dataset", dataset, "--data_dir", str(folder), "--output_dir", str(out), "--epochs", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and message in err, err
    assert not out.exists()  # no run folder, no lock left behind
    fits = "cifar10" if classes == datasource.CIFAR10_CLASSES else "cifar100"  # the set it can be a copy of: fine
    assert datasource.load(folder, fits)["classes"] == classes
    assert datasource.load(write_folder(tmp_path / "few", per_class=(1, 1)), dataset)["classes"] == CLASSES


# --- torchvision's official release, with its download and md5 check replaced by test doubles ---

def write_official_cifar10(root, per_batch=6, seed=0):
    """cifar-10-batches-py as the official release lays it out: pickled dicts of uint8 rows."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    images, labels = {}, {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images[name] = rng.integers(0, 256, (per_batch, 3 * 32 * 32), dtype=np.uint8)
        labels[name] = rng.integers(0, 10, per_batch).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"data": images[name], "labels": labels[name]}, f)  # str keys, as the py2 pickles load
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer",
                                     "dog", "frog", "horse", "ship", "truck"]}, f)
    return images, labels


def write_official_cifar100(root, per_split=(8, 4), seed=0):
    """cifar-100-python as the official release lays it out: 'train' and 'test' pickles with fine labels."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    images, labels = {}, {}
    for name, n in zip(("train", "test"), per_split):
        images[name] = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        labels[name] = rng.integers(0, 100, n).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"data": images[name], "fine_labels": labels[name], "coarse_labels": [0] * n}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class{i:02d}" for i in range(100)]}, f)
    return images, labels


def write_official_svhn(root, per_split=(7, 3), seed=0):
    """train_32x32.mat and test_32x32.mat as the official release lays them out: X (32,32,3,N), y (N,1) in 1..10."""
    rng = np.random.default_rng(seed)
    images, labels = {}, {}
    for name, n in zip(("train", "test"), per_split):
        images[name] = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        labels[name] = np.array([10, *rng.integers(1, 11, n - 1)])[:, None]  # 10 is the digit 0
        scipy.io.savemat(root / f"{name}_32x32.mat", {"X": images[name], "y": labels[name]})
    return images, labels


def test_official_release_loads_through_torchvision(tmp_path, no_network):
    images, labels = write_official_cifar10(tmp_path)
    data = datasource.load(tmp_path)
    assert data["train_x"].shape == (30, 32, 32, 3) and data["test_x"].shape == (6, 32, 32, 3)
    chw = images["data_batch_1"][0].reshape(3, 32, 32)
    assert np.array_equal(data["train_x"][0], chw.transpose(1, 2, 0))
    assert data["train_y"].tolist() == sum((labels[f"data_batch_{i}"] for i in range(1, 6)), [])
    assert data["test_y"].tolist() == labels["test_batch"]
    assert data["classes"][0] == "airplane" and len(data["classes"]) == 10
    assert datasource.source_id(tmp_path) == "torchvision-cifar10"


def test_without_the_jpeg_copy_the_tests_train_on_the_official_releases_first_images_pixel_for_pixel(tmp_path, no_network):
    import conftest  # its small_cifar fixture cuts the subset with cut_official when only data/ has CIFAR-10

    write_official_cifar10(tmp_path / "official", per_batch=200)
    conftest.cut_official(tmp_path / "official", tmp_path / "small.tar.gz")
    small, full = datasource.load(tmp_path / "small.tar.gz"), datasource.load(tmp_path / "official")
    assert small["classes"] == full["classes"]
    for split, n in conftest.SUBSET.items():
        x, y = small[f"{split}_x"], small[f"{split}_y"]
        assert len(x) == 10 * n
        for label in range(10):
            first = full[f"{split}_x"][full[f"{split}_y"] == label][:n]
            assert np.array_equal(x[y == label], first)


def test_offline_and_missing_is_one_clear_error(tmp_path, no_network):
    with pytest.raises(UserError) as e:
        datasource.load(tmp_path)
    message = str(e.value)
    assert "could not be downloaded" in message and str(tmp_path) in message and "image-folder" in message
    assert "\n" not in message


@pytest.mark.slow
def test_processes_that_find_the_release_missing_download_it_once_while_the_others_wait(tmp_path, monkeypatch):
    """torchrun's ranks, or several run.py on one fresh data/: one downloads, the others wait, then read its files."""
    downloads, release = [], (np.zeros((2, 32, 32, 3), np.uint8), np.arange(2))

    def official_splits(root, dataset, download):  # torchvision, with a download that takes a while
        if not (root / "cifar-10-batches-py").is_dir():
            if not download:
                raise RuntimeError("Dataset not found or corrupted. You can use download=True to download it")
            downloads.append(dataset)
            time.sleep(0.5)  # the other three ask meanwhile
            (root / "cifar-10-batches-py").mkdir()
        return release, release, ["cat", "dog"]
    monkeypatch.setattr(datasource, "_official_splits", official_splits)
    with ThreadPoolExecutor(4) as pool:  # flock tells apart each open() of the lock file, threads' too
        loaded = list(pool.map(lambda _: datasource.load(tmp_path / "data"), range(4)))
    assert downloads == ["cifar10"] and all(d["classes"] == ["cat", "dog"] for d in loaded)
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["cifar-10-batches-py"]  # the lock file is gone


def test_offline_through_the_command_line_exits_2_with_one_line(tmp_path, no_network, capsys):
    import run
    rc = run.main(["--data_dir", str(tmp_path / "empty" / "cifar"), "--output_dir", str(tmp_path / "out" / "runs")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "could not be downloaded" in err
    assert list(tmp_path.iterdir()) == []  # neither the data folder torchvision made nor the run lock's folder stays


def test_official_cifar100_loads_through_torchvision(tmp_path, no_network):
    images, labels = write_official_cifar100(tmp_path)
    data = datasource.load(tmp_path, "cifar100")
    assert data["train_x"].shape == (8, 32, 32, 3) and data["test_x"].shape == (4, 32, 32, 3)
    assert np.array_equal(data["test_x"][1], images["test"][1].reshape(3, 32, 32).transpose(1, 2, 0))
    assert data["train_y"].tolist() == labels["train"] and data["test_y"].tolist() == labels["test"]
    assert len(data["classes"]) == 100 and data["classes"][7] == "class07"
    assert datasource.source_id(tmp_path, "cifar100") == "torchvision-cifar100"


def test_official_svhn_loads_through_torchvision(tmp_path, no_network):
    images, labels = write_official_svhn(tmp_path)
    data = datasource.load(tmp_path, "svhn")
    assert data["train_x"].shape == (7, 32, 32, 3) and data["test_x"].shape == (3, 32, 32, 3)
    assert data["train_x"].dtype == np.uint8 and data["train_y"].dtype == np.int64
    assert np.array_equal(data["train_x"][2], images["train"][:, :, :, 2])  # HWC, as the .mat holds it
    assert data["train_y"].tolist() == [0, *(labels["train"][1:, 0] % 10)]  # label 10 -> digit 0
    assert data["classes"] == [str(d) for d in range(10)]


@pytest.mark.parametrize("dataset,name,files", [
    ("cifar10", "CIFAR-10", "cifar-10-python.tar.gz"),
    ("cifar100", "CIFAR-100", "cifar-100-python.tar.gz"),
    ("svhn", "SVHN", "train_32x32.mat and test_32x32.mat"),
])
def test_each_dataset_offline_and_missing_is_one_clear_error(tmp_path, no_network, capsys, dataset, name, files):
    import run
    rc = run.main(["--dataset", dataset, "--data_dir", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and f"{name} is not in" in err and files in err and "image-folder" in err


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100", "svhn"])
def test_each_dataset_trains_from_an_image_folder_with_its_own_normalisation(tmp_path, capsys, dataset):
    import run
    folder = write_folder(tmp_path / "images", per_class=(8, 2))
    rc = run.main(["--dataset", dataset, "--data_dir", str(folder), "--output_dir", str(tmp_path / "out"),
                   "--batch_size", "8", "--epochs", "1"])
    assert rc == 0, capsys.readouterr().err
    (run_dir,) = (tmp_path / "out").glob(f"miniresnet_{dataset}_m0_*")
    assert (run_dir / "last.pt").exists()
    mean, std = datasource.STATS[dataset]
    pixel = torch.full((1, 3, 1, 1), 200, dtype=torch.uint8)
    expected = torch.tensor([(200 / 255 - m) / s for m, s in zip(mean, std)])
    assert torch.allclose(datasource.input_transform(dataset, torch.device("cpu"))(pixel).flatten(), expected, rtol=1e-5)
