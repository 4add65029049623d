"""ZeRO-1 by whole parameters: torch's ``ZeroRedundancyOptimizer`` over a low-rank optimizer.

``torch.distributed.optim.ZeroRedundancyOptimizer`` gives each rank a subset of the parameters
(whole tensors, balanced by size) and builds, on that rank, the wrapped optimizer class for its
subset only, with the keyword arguments it was given; after each step it broadcasts every
rank's updated parameters.  A low-rank optimizer's state is per parameter (subspace, moments),
so splitting it by whole tensors multiplies the low-rank saving by the number of ranks and the
step of each parameter is the one DDP would take: GaLore, DCT and 8-bit states equal DDP bit
for bit (tested on 2 gloo ranks).  The projection settings reach the per-rank optimizers as
param-group keys (the groups are partitioned with their keys) or as the classes' keyword
defaults (``rank=...``).

Not supported, refused by :func:`check_zero1`: optimizers whose projector schedules its own
refreshes per layer across several tensors (SST: a layer's ``U``, ``S`` and ``V`` would land on
different ranks), and refresh broadcasts (each parameter's refresh already runs on one rank
only).  APOLLO's random draws are seeded from a parameter's position in its rank's optimizer,
so they differ from DDP's draws (each replica stays consistent: one rank owns each parameter).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.optim import ZeroRedundancyOptimizer


def local_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that holds this rank's state: ``optimizer.optim`` for a
    ``ZeroRedundancyOptimizer``, else ``optimizer`` itself."""
    return optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer


def partition_by_size(param_groups: list[dict[str, Any]], world_size: int
                      ) -> list[list[dict[str, Any]]]:
    """The param groups each of ``world_size`` ranks gets, as ``ZeroRedundancyOptimizer``
    partitions them: group by group, parameters largest first, each to the rank with the fewest
    elements so far (the first such rank on ties); every group keeps its keys on every rank.
    For the analytic per-rank profile (:mod:`lowrank_optim.profile`)."""
    sizes = [0] * world_size
    ranks: list[list[dict[str, Any]]] = [[] for _ in range(world_size)]
    for group in param_groups:
        shares: list[list[torch.Tensor]] = [[] for _ in range(world_size)]
        for param in sorted(group["params"], key=lambda t: t.numel(), reverse=True):
            rank = sizes.index(min(sizes))
            shares[rank].append(param)
            sizes[rank] += param.numel()
        keys = {k: v for k, v in group.items() if k != "params"}
        for rank, share in enumerate(shares):
            ranks[rank].append({**keys, "params": share})
    return ranks


def check_zero1(optimizer_class: type, name: str | None = None) -> None:
    """Raise ``NotImplementedError`` if ``optimizer_class`` cannot run under ZeRO-1 by whole
    parameters (see the module notes), naming what does."""
    label = name or optimizer_class.__name__
    projector = getattr(optimizer_class, "projector_type", None)
    if projector is not None and getattr(projector, "refresh_timing", "gap") == "optimizer":
        raise NotImplementedError(
            f"{label} under ZeRO-1 (ZeroRedundancyOptimizer): its projector "
            f"{projector.name!r} schedules refreshes per layer across several tensors (SST's "
            "U, S and V), which ZeRO would place on different ranks; train it with DDP "
            "(zero1=False).")


def zero1(param_groups: list[dict[str, Any]], optimizer_class: type, *,
          name: str | None = None, **defaults: Any) -> ZeroRedundancyOptimizer:
    """``ZeroRedundancyOptimizer(param_groups, optimizer_class=..., **defaults)`` after
    :func:`check_zero1`; needs an initialised default process group.

    Raises
    ------
    RuntimeError
        ``torch.distributed`` is not initialised (launch with ``torchrun`` / ``accelerate``).
    NotImplementedError
        The optimizer cannot run under ZeRO-1 (:func:`check_zero1`).
    """
    check_zero1(optimizer_class, name)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError(
            f"zero1=True needs an initialised torch.distributed process group (one per rank: "
            f"launch with torchrun or accelerate launch); {name or optimizer_class.__name__} "
            "was not built.")
    return ZeroRedundancyOptimizer(param_groups, optimizer_class=optimizer_class, **defaults)
