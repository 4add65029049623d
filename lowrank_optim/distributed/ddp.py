"""Replicated training (DDP, DeepSpeed ZeRO stage 0): replicas in sync, refreshes from one rank.

Every rank holds the whole parameter and the all-reduced gradient, bit-identical on every rank,
so a deterministic refresh (SVD, DCT selection) gives every rank the same subspace and nothing
needs to be done.  Where the refresh may not be deterministic across ranks (mixed hardware, a
nondeterministic SVD backend), :func:`broadcast_refreshes` makes one rank compute each refresh
and send it to the others; :func:`check_in_sync` verifies that replicas agree.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from lowrank_optim.distributed.tensors import broadcast_, digest, is_distributed
from lowrank_optim.projectors.base import Projector
from lowrank_optim.rules.base import Rule

if TYPE_CHECKING:
    from lowrank_optim.optim.base import LowRankOptimizer


def subspace_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every subspace tensor (bases, indices: the projector's declared
    :attr:`~lowrank_optim.projectors.Projector.subspace_keys`), in parameter order."""
    projector = getattr(optimizer, "projector", None)
    if projector is None:
        return []
    out = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            view = projector.subspace(optimizer.state.get(p, {}))
            out += [view[k] for k in sorted(view) if isinstance(view[k], torch.Tensor)]
    return out


def check_in_sync(
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    group: dist.ProcessGroup | None = None,
) -> str:
    """Raise ``RuntimeError`` unless every rank holds bit-identical parameters / subspaces.

    For replicated training (DDP).  Returns the digest (the same on every rank).  Without a
    process group it only computes the digest.
    """
    tensors: list[torch.Tensor] = []
    if model is not None:
        tensors += [p for p in model.parameters()]
    if optimizer is not None:
        tensors += subspace_tensors(optimizer)
    mine = digest(tensors)
    if not is_distributed():
        return mine
    every: list[str] = [""] * dist.get_world_size(group)
    dist.all_gather_object(every, mine, group=group)
    if len(set(every)) != 1:
        what = " and ".join(n for n, x in (("parameters", model), ("subspaces", optimizer)) if x)
        raise RuntimeError(f"Ranks disagree on their {what}: digests {every}. With DDP this "
                           "means a nondeterministic refresh; see "
                           "lowrank_optim.distributed.broadcast_refreshes.")
    return mine


class BroadcastRefresh:
    """A :data:`~lowrank_optim.core.Refresher` that computes each refresh on rank ``src`` and
    broadcasts it to the others.

    On replicated state (DDP) the source rank runs the projector's refresh, then sends the
    parameter's whole optimizer state (the new subspace and anything the refresh changed, such
    as rotated moments) and the low-rank gradient it may return; the other ranks skip the
    computation.  Under FSDP2 (:mod:`lowrank_optim.distributed.fsdp2`) every rank refreshes from
    the same gathered gradient and only the replicated entries are sent.  Install with
    :func:`broadcast_refreshes`.
    """

    def __init__(self, src: int = 0, group: dist.ProcessGroup | None = None) -> None:
        self.src = src
        self.group = group

    def __call__(self, projector: Projector, grad: torch.Tensor, state: dict, group: dict,
                 rule: Rule) -> torch.Tensor | None:
        if not is_distributed():
            return projector.refresh(grad, state, group, rule)
        return self.refresh_from_src(projector, grad, state, group, rule, self.src, self.group)

    @staticmethod
    def refresh_from_src(projector: Projector, grad: torch.Tensor, state: dict, group: dict,
                         rule: Rule, src: int,
                         pg: dist.ProcessGroup | None) -> torch.Tensor | None:
        """Refresh on ``src`` only; send every state tensor and the returned tensor."""
        out = None
        meta: list[Any] = [None]
        if dist.get_rank() == src:
            out = projector.refresh(grad, state, group, rule)
            meta[0] = ([(k, v.dtype, tuple(v.shape)) for k, v in sorted(state.items())
                        if isinstance(v, torch.Tensor)],
                       None if out is None else (out.dtype, tuple(out.shape)))
        dist.broadcast_object_list(meta, src=src, group=pg)
        entries, out_meta = meta[0]
        keys = {k for k, _, _ in entries}
        for key in [k for k, v in state.items() if isinstance(v, torch.Tensor) and k not in keys]:
            del state[key]
        for key, dtype, shape in entries:
            have = state.get(key)
            if not (isinstance(have, torch.Tensor) and have.dtype == dtype
                    and tuple(have.shape) == shape):
                state[key] = torch.empty(shape, dtype=dtype, device=grad.device)
            broadcast_(state[key], src, pg, grad.device)
        if out_meta is not None:
            if out is None:
                out = torch.empty(out_meta[1], dtype=out_meta[0], device=grad.device)
            broadcast_(out, src, pg, grad.device)
        return out

    @staticmethod
    def broadcast_keys(state: dict, keys: Iterable[str], src: int,
                       pg: dist.ProcessGroup | None, device: torch.device) -> None:
        """Send ``state[key]`` for ``keys`` from ``src`` (every rank already holds them)."""
        for key in sorted(keys):
            broadcast_(state[key], src, pg, device)


def broadcast_refreshes(
    optimizer: LowRankOptimizer, src: int = 0, group: dist.ProcessGroup | None = None
) -> LowRankOptimizer:
    """Make ``optimizer`` compute each subspace refresh on rank ``src`` and broadcast it.

    Not needed for correctness when the refresh is deterministic (DDP all-reduces gradients, so
    every rank refreshes from the same bits); use it when ranks may run different hardware or
    a nondeterministic SVD.  Costs one small object broadcast plus one tensor broadcast per
    state entry per refreshed parameter, at refresh steps only; other ranks skip the SVD.
    Returns ``optimizer`` (its :attr:`~lowrank_optim.LowRankOptimizer.refresher` is replaced;
    calling twice is a no-op).
    """
    if not isinstance(optimizer.refresher, BroadcastRefresh):
        optimizer.refresher = BroadcastRefresh(src, group)
    return optimizer
