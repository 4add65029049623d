"""Tensors under ``torch.distributed``: DTensor shards, digests, in-place broadcasts."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

try:  # DTensor exists wherever torch.distributed does
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = None
    Shard = None

__all__ = ["DTensor", "Shard", "broadcast_", "digest", "is_distributed", "is_dtensor",
           "local_tensor", "world_size"]


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (e.g. an FSDP2 parameter)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The shard this rank holds of a DTensor; any other tensor unchanged."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def is_distributed() -> bool:
    """Whether a default process group is up."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """The default process group's size; 1 without one."""
    return dist.get_world_size() if is_distributed() else 1


def digest(tensors: Iterable[torch.Tensor]) -> str:
    """SHA-256 of the bytes of ``tensors`` (local shards of DTensors), in order.

    Equal digests on two ranks mean bit-identical tensors; used to check that DDP replicas (or
    their subspaces) agree.
    """
    h = hashlib.sha256()
    for t in tensors:
        t = local_tensor(t).detach().cpu()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def broadcast_(tensor: torch.Tensor, src: int, group: dist.ProcessGroup | None,
               device: torch.device) -> None:
    """In-place broadcast from ``src`` that also works for CPU state tensors under NCCL."""
    if tensor.device == device and tensor.is_contiguous():
        dist.broadcast(tensor, src, group=group)
        return
    buf = tensor.to(device=device, memory_format=torch.contiguous_format)
    dist.broadcast(buf, src, group=group)
    tensor.copy_(buf)
