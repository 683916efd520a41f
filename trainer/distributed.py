"""Process-group setup for torchrun (env RANK / WORLD_SIZE / LOCAL_RANK) and small collectives.

One process per GPU under ``torchrun``; a plain ``python``/``medsass-train`` call is world size 1
and never touches ``torch.distributed``. Backend: nccl on CUDA, gloo on CPU.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from medsass.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(preference: str, local_rank: int = 0, *, option: str = "runtime.device") -> torch.device:
    """The torch device of ``preference`` (one of :data:`DEVICES`; auto: CUDA when torch sees it): on CUDA, GPU
    ``local_rank``, made the current one. ``option`` names the setting in errors (``runtime.device``, ``--device``)."""
    def setting(value: str) -> str:
        return f"{option} {value}" if option.startswith("-") else f"{option}={value}"

    if preference not in DEVICES:
        raise ConfigError(f"{setting(repr(preference))}: use auto, cpu or cuda")
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError(f"{setting('cuda')} but torch sees no CUDA device; use {setting('cpu')} or auto")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup(device_preference: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (if any) and pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_preference, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def in_torchrun() -> bool:
    """Whether this process is one of several that torchrun started (world size > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def leave(code: int = 0) -> None:
    """End a torchrun process (world size > 1) at once, after flushing stdio and logging; return where there is none.

    After a DDP run torch keeps the process group, and the gloo/nccl worker threads with it, alive past
    ``destroy_process_group``. A worker thread that is still releasing the last collective's tensors when the
    interpreter finalizes needs the GIL, cannot get it, and aborts the process: SIGABRT, "terminate called without an
    active exception", after every file was written (pytorch/pytorch#179291 tried an atexit fix and was abandoned).
    torchrun then reports a finished job as failed. Leaving without finalization skips that race."""
    if not in_torchrun():
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum over ranks (in place, and returned). nccl needs the tensor on the GPU."""
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj``, in rank order."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out
