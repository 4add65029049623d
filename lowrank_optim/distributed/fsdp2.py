"""FSDP2 (``torch.distributed.fsdp.fully_shard``): the library's one step on this rank's rows.

Parameters and gradients are DTensors sharded on dim 0 (rows).
:meth:`LowRankOptimizer.step_param` sends them to :func:`sharded_step`, which runs
:func:`lowrank_optim.core.lowrank_step` on the local rows:

- a projection on the **right** (it mixes columns, which every shard holds in full: GaLore and
  DCT when ``rows >= cols``) is local to the shard: ``R_k = G_k P^T``, moments ``m_k x r``
  (stored as DTensors sharded like the parameter), update ``N_k P``.  A refresh needs the whole
  gradient (GaLore's SVD runs on the gathered gradient, identical on every rank, every
  ``update_proj_gap`` steps) unless the projector refreshes from row shards
  (:attr:`Projector.refresh_from_rows`: DCT scores each rank's rows and the scores are
  all-reduced, ``n`` floats per weight instead of an all-gather of ``m n``);
- a projection on the **left** (it mixes rows, which are split across ranks: ``rows < cols``,
  ``proj_type="left"`` or ``"full"``) runs on the gathered gradient every step; the low-rank
  moments are replicated (the same on every rank) and each rank applies the rows of the
  back-projected update that it owns.  This costs one all-gather of that gradient per step;
- unprojected tensors take the elementwise step on their shard.

The result equals the unsharded step to floating-point rounding.  What cannot run this way is
refused before anything changes (:func:`lowrank_optim.distributed.layout.sharding_problem`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from lowrank_optim import kernels
from lowrank_optim.core import Refresher, local_refresh, lowrank_step
from lowrank_optim.distributed.ddp import BroadcastRefresh
from lowrank_optim.distributed.tensors import DTensor, Shard, broadcast_, is_dtensor, local_tensor
from lowrank_optim.projectors.base import Projector
from lowrank_optim.rules.base import Rule


def all_ranks_true(flag: bool, params: Iterable[torch.Tensor]) -> bool:
    """``flag`` AND-ed over the ranks when some of ``params`` are DTensors (sharded gradients
    are checked shard by shard); ``flag`` itself otherwise (replicated gradients agree)."""
    sharded = next((p for p in params if is_dtensor(p)), None)
    if sharded is None:
        return flag
    t = torch.tensor(int(flag), device=local_tensor(sharded).device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=sharded.device_mesh.get_group())
    return bool(t)


class _RowShard(Projector):
    """Runs a projector for a row-sharded weight; see the module docstring.

    ``gathered=False`` (right side): ``grad`` given to the core is the local shard; the refresh
    gathers the whole gradient (or sums row scores).  ``gathered=True`` (left / both sides):
    ``grad`` is the gathered gradient; the update is back-projected in full and this rank's
    rows are applied.
    """

    def __init__(self, inner: Projector, refresher: Refresher, dgrad: torch.Tensor,
                 rows: slice, gathered: bool, row_keys: frozenset[str], src: int,
                 pg: dist.ProcessGroup) -> None:
        self.inner = inner
        self.bcast = refresher if isinstance(refresher, BroadcastRefresh) else None
        self.dgrad, self.rows, self.gathered, self.src, self.pg = dgrad, rows, gathered, src, pg
        self.row_keys = row_keys

    def has_subspace(self, state: dict) -> bool:
        return self.inner.has_subspace(state)

    def refresh(self, grad: torch.Tensor, state: dict, group: dict,
                rule: Rule) -> torch.Tensor | None:
        if self.gathered:  # the whole state is replicated: refresh as unsharded
            if self.bcast is not None:
                return self.bcast.refresh_from_src(self.inner, grad, state, group, rule,
                                                   self.src, self.pg)
            return self.inner.refresh(grad, state, group, rule)
        if self.inner.refresh_from_rows and self.bcast is None:  # scores summed, no gather
            return self.inner.refresh_rows(grad, state, group, tuple(self.dgrad.shape),
                                           lambda t: dist.all_reduce(t, group=self.pg), rule)
        full = self.dgrad.full_tensor()  # the same bits on every rank
        low = self.inner.refresh(full, state, group, rule)
        if self.bcast is not None:  # moments are shards: send only the replicated entries
            keys = [k for k, v in state.items()
                    if isinstance(v, torch.Tensor) and k not in self.row_keys]
            self.bcast.broadcast_keys(state, keys, self.src, self.pg, grad.device)
            if low is not None:
                broadcast_(low, self.src, self.pg, low.device)
        # a right-side low-rank gradient (m x r) has the weight's rows: keep this rank's
        return None if low is None else low[self.rows]

    def project(self, grad: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        return self.inner.project(grad, state, group)

    def project_back(self, low: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        full = self.inner.project_back(low, state, group)
        return full[self.rows] if self.gathered else full

    def apply_update(self, param: torch.Tensor, low: torch.Tensor, alpha: float, state: dict,
                     group: dict, decay_before: float = 0.0, decay_after: float = 0.0) -> None:
        if not self.gathered:
            self.inner.apply_update(param, low, alpha, state, group, decay_before, decay_after)
            return
        rows = self.inner.project_back(low, state, group)[self.rows]
        kernels.update_param(param, rows, alpha, decay_before, decay_after)


def _row_keys(rule: Rule, gathered: bool) -> frozenset[str]:
    """State entries split by rows like the parameter: the moments of a shard-local step
    (an elementwise rule's moments have the gradient's shape)."""
    return frozenset() if gathered else frozenset(m.name for m in rule.moments)


def step_layout(rule: Rule, projector: Projector | None, shape: tuple[int, ...], group: dict
                ) -> tuple[tuple[str, ...], bool, frozenset[str]]:
    """How :func:`sharded_step` steps a row-sharded parameter of ``shape``: the projection's
    sides, whether it runs on the gathered gradient (any side but the right alone), and the
    state keys kept split by rows (also the profiler's per-rank accounting)."""
    sides = projector.sides(tuple(shape), group) if projector is not None else ()
    gathered = bool(sides) and sides != ("right",)
    return sides, gathered, _row_keys(rule, gathered)


def _as_row_dtensor(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    shape = (param.shape[0], *local.shape[1:])
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                              shape=torch.Size(shape), stride=stride)


def sharded_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict,
    group: dict,
    rule: Rule,
    projector: Projector | None,
    refresher: Refresher = local_refresh,
) -> None:
    """One optimizer step for a DTensor parameter sharded on dim 0 (FSDP2), on this rank's rows.

    ``state`` keeps the moments of shard-local steps as DTensors sharded like ``param`` (so
    ``torch.distributed.checkpoint`` saves and reshards them); replicated entries (bases,
    indices, counters, the moments of gathered steps) are plain tensors, equal on every rank.
    """
    mesh = param.device_mesh
    pg = mesh.get_group()
    if not is_dtensor(grad):
        raise RuntimeError(f"parameter is a DTensor but its gradient is a {type(grad).__name__}")
    if tuple(grad.placements) != tuple(param.placements):
        grad = grad.redistribute(mesh, param.placements)
    sides, gathered, row_keys = step_layout(rule, projector, tuple(param.shape), group)
    originals = {k: v.to_local() for k, v in state.items() if is_dtensor(v)}
    local_state = {k: originals.get(k, v) for k, v in state.items()}
    step_grad = grad.to_local()
    if projector is not None:
        size, offset = Shard.local_shard_size_and_offset(param.shape[0], mesh.size(),
                                                         mesh.get_local_rank())
        src = dist.get_global_rank(pg, 0)
        projector = _RowShard(projector, refresher, grad, slice(offset, offset + size),
                              gathered, row_keys, src, pg)
        group = {**group, "proj_type": sides[0] if len(sides) == 1 else "full"}
        if gathered:
            step_grad = grad.full_tensor()
    lowrank_step(param.to_local(), step_grad, local_state, group, rule, projector)
    for key in [k for k in state if k not in local_state]:
        del state[key]
    for key, value in local_state.items():
        if key in originals and originals[key] is value:
            continue  # updated in place
        if isinstance(value, torch.Tensor) and value.dim() and key in row_keys:
            value = _as_row_dtensor(value, param)
        state[key] = value
