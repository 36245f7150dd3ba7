"""The process group of a torchrun launch: this rank's place, collectives, agreement checks, local launch.

One process per rank on torch.distributed's default group, initialised from torchrun's
environment variables when not yet initialised (gloo on CPU, NCCL on CUDA). Values exchanged
between ranks as JSON travel as UTF-8 bytes (no pickle). `run_local` spawns a local gloo group
for tests and benchmarks. What the ranks split and how: `clt.training.distributed`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


class DistributedError(ValueError):
    """The ranks of a distributed run disagree or cannot split the work; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class Dist:
    """This process's place in the run: rank, world size and parallel mode."""

    rank: int
    world_size: int
    mode: str

    @property
    def is_main(self) -> bool:
        """Whether this rank writes logs, progress and checkpoints."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """Whether the features are split across ranks."""
        return self.mode == "features"


def init_distributed(mode: str, device: str, timeout_s: float) -> Dist | None:
    """This run's ranks (initialising the process group from torchrun's env vars); None for one process."""
    if not dist.is_available():
        return None
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return None
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    if dist.get_world_size() == 1:
        return None
    return Dist(dist.get_rank(), dist.get_world_size(), mode)


def local_device(device: str) -> str:
    """'cuda' becomes this rank's GPU (torchrun's LOCAL_RANK); other devices are kept."""
    if device == "cuda":
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


def check_agreement(ctx: Dist, description: dict[str, Any], problems: list[str]) -> None:
    """Raise the same DistributedError on every rank if any rank has a problem or a different `description`."""
    gathered = _all_gather_json([description, problems], ctx.world_size)
    for rank, (_, found) in enumerate(gathered):
        if found:
            raise DistributedError(f"rank {rank}: " + "; ".join(found))
    first = gathered[0][0]
    for rank, (desc, _) in enumerate(gathered):
        differ = sorted(k for k in set(first) | set(desc) if first.get(k) != desc.get(k))
        if differ:
            detail = ", ".join(f"{k}: {first.get(k)!r} on rank 0, {desc.get(k)!r} on rank {rank}" for k in differ)
            raise DistributedError(f"the ranks disagree ({detail}); launch every rank with the same configs and store")


def all_reduce(t: Tensor, op: Any = dist.ReduceOp.SUM) -> Tensor:
    """All-reduced copy of `t`, half-precision tensors summed in float32 (gloo has no bf16 sums; partial sums
    keep their precision)."""
    half = t.dtype in (torch.float16, torch.bfloat16)
    wide = t.to(torch.float32 if half else t.dtype, copy=True).contiguous()
    dist.all_reduce(wide, op=op)
    return wide.to(t.dtype)


def comm_device() -> torch.device | None:
    """Where collectives need their tensors: this rank's GPU under NCCL, anywhere under gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None


def global_fvu(reconstruction: Tensor, target: Tensor) -> Tensor:
    """Overall FVU of rows split across ranks (sums of squares and of targets all-reduced), float64."""
    err = (reconstruction.detach().double() - target.detach().double()).reshape(-1, *target.shape[-2:])
    t = target.detach().double().reshape(err.shape)
    count = torch.full((1,), t.shape[0], dtype=t.dtype, device=t.device)  # a fill, not a host copy
    parts = torch.cat([err.square().sum().view(1), t.square().sum().view(1), count, t.sum(0).reshape(-1)])
    dist.all_reduce(parts)
    resid, sq, n, sums = parts[0], parts[1], parts[2], parts[3:]
    return resid / (sq - sums.square().sum() / n).clamp_min(torch.finfo(torch.float64).tiny)


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum of a tensor over ranks (no autograd)."""
    return all_reduce(t)


def _all_gather_json(value: Any, world_size: int) -> list[Any]:
    """Every rank's JSON-able value, in rank order (sent as UTF-8 bytes: no pickle)."""
    device = comm_device()
    data = torch.tensor(list(json.dumps(value).encode()), dtype=torch.uint8, device=device)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size)]
    dist.all_gather(sizes, torch.tensor([data.numel()], device=device))
    longest = max(int(n) for n in sizes)
    parts = [torch.zeros(longest, dtype=torch.uint8, device=device) for _ in range(world_size)]
    dist.all_gather(parts, torch.cat([data, data.new_zeros(longest - data.numel())]))
    return [json.loads(bytes(p[: int(n)].tolist()).decode()) for p, n in zip(parts, sizes)]


def broadcast_path(path: Path | None, world_size: int) -> Path | None:
    """Rank 0's path (or None) on every rank."""
    value = _all_gather_json(None if path is None else str(path), world_size)[0]
    return None if value is None else Path(value)


def barrier() -> None:
    """Wait until every rank gets here."""
    dist.barrier()


def run_local(
    fn: Callable[..., None], args: tuple = (), *, world_size: int = 2, timeout_s: float = 600.0, threads: int = 1
) -> None:
    """Run fn(rank, *args) in `world_size` spawned processes with torchrun's env vars for a local gloo group
    (tests, benchmarks); raises if a rank fails, kills them all after `timeout_s`."""
    import time

    import torch.multiprocessing as mp

    # This process hosts the rendezvous store, as torchrun's agent does: its port is bound from the start
    # (a port found free and released first could be taken before rank 0 binds it).
    store = dist.TCPStore(
        "127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout_s)
    )
    context = mp.start_processes(
        _local_rank,
        args=(world_size, store.port, threads, fn, args),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"{getattr(fn, '__name__', fn)} did not finish on {world_size} ranks in {timeout_s} s")
    del store


def _local_rank(rank: int, world_size: int, port: int, threads: int, fn: Callable[..., None], args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        TORCHELASTIC_USE_AGENT_STORE="True",
    )
    torch.set_num_threads(threads)
    try:
        fn(rank, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # A finished rank skips the interpreter's shutdown: a gloo thread still alive there can abort the
    # process ("terminate called without an active exception"), as the `clt` entry point does under torchrun.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def memory_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of this rank's parameters and optimizer state."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    state = sum(
        v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if isinstance(v, Tensor)
    )
    return params + state


__all__ = [
    "Dist",
    "DistributedError",
    "all_reduce",
    "all_reduce_sum",
    "barrier",
    "broadcast_path",
    "check_agreement",
    "comm_device",
    "global_fvu",
    "init_distributed",
    "local_device",
    "memory_bytes",
    "run_local",
]
