"""Which device and precision a run uses, and the determinism switches that go with them."""
import logging
import os
from pathlib import Path

import torch

from tools import UserError


def configure_determinism(deterministic, device):
    """Bit-identical CUDA reruns cost speed: deterministic kernels and no cudnn autotuning.

    On the CPU, runs are bit-identical for the same machine and thread count either way.
    """
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = device.type == "cuda" and not deterministic


def configure_precision(precision):
    """fp32 means fp32 on every device: cuDNN runs fp32 convolutions in TF32 (10 bits of mantissa) on
    Ampere and later GPUs unless told not to. Under bf16 autocast the convolutions are bf16 anyway.
    Matrix products are fp32 by default; fp32 makes sure nothing else in the process changed that."""
    torch.backends.cudnn.allow_tf32 = precision != "fp32"
    if precision == "fp32":
        torch.backends.cuda.matmul.allow_tf32 = False


def tf32_state(device):
    """{'cudnn_tf32': ...} on CUDA, where it matters (runs before fp32 turned it off had it on); nothing elsewhere."""
    return {"cudnn_tf32": torch.backends.cudnn.allow_tf32} if device.type == "cuda" else {}


def pick_device(name):
    """'auto' means cuda, else mps, else cpu; a named device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):  # torch knows more kinds ('meta', 'xpu', ...)
        raise UserError(f"unknown --device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        raise UserError(f"--device {name}: no such CUDA device here; use --device cpu (or auto)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: MPS is not available here; use --device cpu (or auto)")
    return device


def memory_bytes(device):
    """The device's memory: the GPU's, or this machine's RAM on the CPU; None where unknown (MPS shares the RAM)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu" and hasattr(os, "sysconf"):
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            return None
    return None


def cpu_has_native_bf16():
    """AVX512-BF16 or AMX: the CPUs where bf16 autocast is faster than fp32 (Linux only)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision, device):
    """'auto' picks bf16 where the device computes it natively, else fp32.

    Measured on 2-core AMD EPYCs without native bf16 (Zen 2 and Zen 3, AVX2): bf16 autocast is
    8 to 12 times slower than fp32 there, which is why 'auto' checks for native support.
    """
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"


def describe(device):
    """The machine a run used, for tables that say where each pair ran: the GPU's name, or the CPU's name, family and
    model number (one name, "AMD EPYC" say, covers CPUs of several generations, with and without native bf16)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type != "cpu":
        return device.type
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "cpu"
    info = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in lines)}  # the last CPU's
    name, family, model = info.get("model name", "cpu"), info.get("cpu family", "?"), info.get("model", "?")
    return f"{name} (family {family} model {model})"


def compiled(model, mode=None):
    """torch.compile(model) (mode "reduce-overhead": inductor's own CUDA graphs), without the warning that a CUDA
    build of torch logs on a machine without CUDA when inductor imports torch.utils.cpp_extension."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    return torch.compile(model, mode=mode)
