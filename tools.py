"""Small helpers: user errors, seeding and RNG state, device and precision choice, atomic files."""
import contextlib
import json
import os
import random
import signal
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch


class UserError(Exception):
    """Bad input: run.py prints the message as one line and exits 2."""


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; the training loop stopped at a step boundary."""


STOP = {}  # {'signal': name} once SIGINT or SIGTERM arrived


@contextlib.contextmanager
def stop_on_signals():
    """SIGINT/SIGTERM ask the training loop to stop at the next step; a second one stops at once."""
    def request_stop(signum, frame):
        if STOP:
            raise KeyboardInterrupt
        STOP["signal"] = signal.Signals(signum).name

    STOP.clear()
    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def configure_determinism(deterministic, device):
    """Bit-identical CUDA reruns cost speed: deterministic kernels and no cudnn autotuning.

    On the CPU, runs are bit-identical for the same machine and thread count either way.
    """
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = device.type == "cuda" and not deterministic


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state(generator):
    """Every RNG a run draws from, as tensors and lists so torch.load(weights_only=True) reads it."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": _to_lists(random.getstate()),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "mps": torch.mps.get_rng_state() if torch.backends.mps.is_available() else None,
        "generator": generator.get_state(),  # shuffling and augmentation
    }


def set_rng_state(state, generator):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if state["mps"] is not None and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])
    generator.set_state(state["generator"])


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def pick_device(name):
    """'auto' means cuda, else mps, else cpu; a named device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        raise UserError(f"--device {name}: no such CUDA device here; use --device cpu (or auto)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: MPS is not available here; use --device cpu (or auto)")
    return device


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


def atomic_write(path, write):
    """Call write(tmp_path), then rename over `path`: a crash leaves the old file whole."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # on disk before the rename, so a power cut cannot leave an empty file
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path, obj):
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


def read_json(path):
    return json.loads(Path(path).read_text())


def save_checkpoint(path, checkpoint):
    atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


def load_checkpoint(path):
    """weights_only=True: a checkpoint file can hold tensors and plain data, never code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}); rerun with --overwrite to start afresh")


def git_state():
    """(commit, dirty) of the repo this file lives in, or (None, None) outside git."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, check=True).stdout.strip()
    try:
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain"))
    except (OSError, subprocess.CalledProcessError):
        return None, None
