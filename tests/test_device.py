"""What runs on the device, apart from the network: batched augmentation and the choice of precision."""
import json
import pathlib
from types import SimpleNamespace

import pytest
import torch

import datasource
import train
from bookkeeping import hardware
from conftest import cli


def test_random_crop_flip_is_a_shifted_window_of_the_padded_image_or_its_mirror():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.int32).view(2, 3, 32, 32) % 251 + 1  # no zeros: padding shows
    generator = torch.Generator().manual_seed(0)
    seen_shift, seen_flip = set(), set()
    for _ in range(20):
        out = datasource.random_crop_flip(x, generator)
        assert out.shape == x.shape and out.dtype == x.dtype
        padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
        for i in range(2):
            matches = [(dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (False, True)
                       if torch.equal(out[i], (lambda w: w.flip(2) if flip else w)(padded[i, :, dy:dy + 32, dx:dx + 32]))]
            assert matches, "every output image is one window of its own padded image, maybe mirrored"
            seen_shift.add(matches[0][:2])
            seen_flip.add(matches[0][2])
    assert len(seen_shift) > 10 and seen_flip == {False, True}  # random, not a fixed window


def test_augmentation_is_reproducible_from_the_generator():
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    first = datasource.random_crop_flip(x, torch.Generator().manual_seed(3))
    assert torch.equal(first, datasource.random_crop_flip(x, torch.Generator().manual_seed(3)))
    assert not torch.equal(first, datasource.random_crop_flip(x, torch.Generator().manual_seed(4)))


@pytest.mark.parametrize("native,expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_is_bf16_only_where_the_cpu_computes_it_natively(native, expected, monkeypatch):
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert hardware.resolve_precision("auto", cpu) == expected
    assert hardware.resolve_precision("fp32", cpu) == "fp32" and hardware.resolve_precision("bf16", cpu) == "bf16"
    assert train.precision_for(SimpleNamespace(dataset="cifar10", precision="auto"), cpu) == expected


@pytest.mark.parametrize("native,expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_on_cuda_ignores_emulated_bf16(native, expected, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: calls.append(including_emulation) or native)
    assert hardware.resolve_precision("auto", torch.device("cuda")) == expected and calls == [False]


def test_cpu_bf16_detection_reads_the_cpu_flags(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(hardware, "Path", lambda p: cpuinfo if p == "/proc/cpuinfo" else pathlib.Path(p))
    cpuinfo.write_text("flags\t\t: fpu avx2 avx512f\n")
    assert not hardware.cpu_has_native_bf16()
    cpuinfo.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert hardware.cpu_has_native_bf16()


def test_a_cpu_is_described_by_its_name_family_and_model_number(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(hardware, "Path", lambda p: cpuinfo if p == "/proc/cpuinfo" else pathlib.Path(p))
    zen3, zen4 = ("model name\t: AMD EPYC\ncpu family\t: 25\nmodel\t\t: %d\n" % n for n in (1, 17))
    cpuinfo.write_text(zen3)
    assert hardware.describe(torch.device("cpu")) == "AMD EPYC (family 25 model 1)"
    cpuinfo.write_text(zen4)  # same name and family, another generation: the tables must tell them apart
    assert hardware.describe(torch.device("cpu")) == "AMD EPYC (family 25 model 17)"


@pytest.mark.parametrize("precision,tf32", [("fp32", False), ("bf16", True)])
def test_fp32_turns_off_the_tf32_that_cudnn_uses_by_default(precision, tf32, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", not tf32)  # restored after the test
    # torch.backends.cuda.matmul is a proxy object that monkeypatch cannot restore: by hand, then
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        hardware.configure_precision(precision)
        assert torch.backends.cudnn.allow_tf32 is tf32 and torch.backends.cuda.matmul.allow_tf32 is tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32


@pytest.mark.slow
def test_an_fp32_run_trains_and_records_without_tf32(small_cifar, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)  # cuDNN's default; restored after the test
    rc, _, _ = cli(capsys, "--data_dir", small_cifar, "--output_dir", tmp_path, "--epochs", 1, "--batch_size", 100,
                   "--precision", "fp32")
    (config,) = [json.loads(p.read_text()) for p in tmp_path.glob("*/config.json")]
    assert rc == 0 and torch.backends.cudnn.allow_tf32 is False and "cudnn_tf32" not in config  # a CPU run: moot
    assert hardware.tf32_state(torch.device("cuda")) == {"cudnn_tf32": False}  # what a CUDA run records
    assert config["hardware"] == hardware.describe(torch.device("cpu")) and "family" in config["hardware"]
