"""Data parallelism under torchrun: which rank this process is, and the few collectives training needs.

`torchrun --nproc_per_node=N run.py ...` starts N processes with RANK, LOCAL_RANK and WORLD_SIZE set;
they join one process group (NCCL on CUDA, gloo on the CPU) and DistributedDataParallel averages
their gradients. `python run.py ...` alone starts no process group: it is rank 0 of 1, and every
helper here is then a no-op that returns its input.
"""
import contextlib
import os

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.rendezvous import rendezvous

import tools


def check_ranks(batch_size, sync_bn, device):
    """The ranks split every batch evenly; SyncBatchNorm needs NCCL, so CUDA."""
    if batch_size % world():
        raise tools.UserError(f"--batch_size {batch_size} does not split evenly over {world()} ranks; make it a "
                              "multiple of --nproc_per_node")
    if sync_bn and device.type != "cuda":
        raise tools.UserError("--sync_bn synchronises BatchNorm over GPUs (NCCL); it does not run on the CPU: drop it")


def launched():
    """Started by torchrun (which sets RANK and WORLD_SIZE for every worker)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main():
    """Rank 0 alone prints, writes files and draws."""
    return rank() == 0


@contextlib.contextmanager
def process_group(device):
    """torchrun's process group for the duration of the command, on `device`'s backend; nothing without torchrun."""
    if not launched():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(local_device(device))
    # Keys under this attempt's prefix: after torchrun restarts the workers, a store that outlived the dead attempt
    # must not hand the new ranks the old ranks' addresses (seen here under load: connection refused, run lost).
    store, rank_, world_ = next(rendezvous("env://"))
    store = dist.PrefixStore(f"attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank_, world_size=world_)
    try:
        yield
    finally:
        dist.destroy_process_group()


def local_device(device):
    """Under torchrun each rank takes the GPU of its LOCAL_RANK; CPU ranks share the CPU."""
    return torch.device("cuda", int(os.environ["LOCAL_RANK"])) if device.type == "cuda" and launched() else device


def missing_on_every_rank(folder):
    """The folders that making `folder` would make, as every rank sees them before any rank makes them. Each rank
    removes them at the end where nothing came to be in them, and the last rank out succeeds: the rank that made
    them need not be the last to leave (an empty --output_dir stayed when it was not)."""
    made = tools.missing_folders(folder)
    if world() > 1:  # NCCL wants the rank's GPU named, or guesses it
        dist.barrier(device_ids=[torch.cuda.current_device()] if dist.get_backend() == "nccl" else None)
    return made


def seed_dropout(seed):
    """Rank r > 0 reseeds torch's RNG (the dropout masks) from (seed, r): masks differ between ranks, while
    rank 0 draws what a single process draws."""
    if rank() > 0:
        torch.manual_seed(int(np.random.SeedSequence([seed, rank()]).generate_state(1)[0]))


def shard(n):
    """This rank's contiguous share of n items (evaluation): all of them in a single process."""
    return slice(n * rank() // world(), n * (rank() + 1) // world())


def sum_across(tensor):
    """The sum over ranks, in place (a 0-d or small tensor on the device)."""
    if world() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def max_across(tensor):
    if world() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def any_rank(flag):
    """True on every rank if `flag` is true on one of them."""
    if world() == 1:
        return flag
    agreed = torch.tensor(float(flag), device="cuda" if dist.get_backend() == "nccl" else "cpu")
    return bool(max_across(agreed).item())


def stop_requested():
    """Whether a stop was asked of this rank or any other: the ranks agree, so none is left waiting for the rest."""
    return any_rank(bool(tools.STOP))


def gather_on_main(obj):
    """[every rank's obj] on rank 0 (None elsewhere); [obj] in a single process."""
    if world() == 1:
        return [obj]
    gathered = [None] * world() if is_main() else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def share_buffers(model):
    """Rank 0's buffers (BatchNorm's running statistics) on every rank: the model every rank evaluates is the one
    rank 0 saves. (DDP broadcasts them before each training forward, not after the last one.)"""
    if world() > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
