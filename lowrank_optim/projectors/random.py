"""APOLLO's projector: a seeded Gaussian random matrix, redrawn every ``update_proj_gap`` steps.

APOLLO (Zhu et al., 2025, arXiv:2412.05270) projects the gradient with ``P`` whose entries are
drawn from ``N(0, 1/r)``: ``R = P G`` keeps the norm of every channel of ``G`` in expectation
(``E ||P x||^2 = ||x||^2``, the Johnson-Lindenstrauss property), which is all APOLLO needs of
it (its rule only measures norm ratios in the projected space).  The matrix is never stored:
each parameter keeps the integers it is drawn from, ``proj_seed`` (its own seed, from the
group's ``proj_seed`` and its position in the optimizer), ``proj_step`` (the step of the
current draw) and ``proj_shape`` (the weight's shape, for :meth:`project_back`), so the state
is a few bytes per weight, ``optimizer.state_dict()`` holds tensors only, DDP replicas draw
the same matrix and a resumed run redraws it bit for bit.
"""

from __future__ import annotations

import math

import torch

from lowrank_optim import kernels
from lowrank_optim.projectors.base import Projector
from lowrank_optim.projectors.svd import galore_sides
from lowrank_optim.rules.base import Rule
from lowrank_optim.validation import PROJ_TYPES, check_choice, check_int_at_least, check_rank

#: the random projector's group keys beyond rank / update_proj_gap / scale / proj_type
RANDOM_DEFAULTS = {"proj_seed": 0}
_MIX = 1_000_003
_MOD = 2**63 - 1


def mix(seed: int, value: int) -> int:
    """A generator seed from two integers (the group seed and a parameter's position, then
    that and the step of a draw)."""
    return (int(seed) * _MIX + int(value)) % _MOD


class RandomProjector(Projector):
    """A Gaussian ``N(0, 1/r)`` projection on the side ``proj_type`` picks (GaLore's sides:
    ``"std"`` reduces the smaller dimension), redrawn at every refresh.

    The basis is laid out as the SVD projector's (``m x r`` on the left, ``r x n`` on the
    right), so projection and back-projection are the same kernels; back-projection is the
    transpose, which inverts the projection only in expectation (``E[P^T P] = I``): APOLLO's
    rule never back-projects.  The draw runs on the gradient's device with a generator seeded
    from ``(proj_seed, proj_step)``: each projection regenerates it (``r`` times the projected
    dimension normals), which is the price of storing no matrix.  CPU and CUDA generators
    draw different matrices for the same seed.

    Group keys: ``rank``, ``proj_type`` (one side: ``std``, ``reverse_std``, ``left`` or
    ``right``), ``update_proj_gap`` (steps between draws) and ``proj_seed`` (an integer >= 0,
    default 0).
    """

    name = "random"
    subspace_keys = {"proj_seed": "indices", "proj_step": "indices", "proj_shape": "indices"}
    hyperparameters = (*Projector.hyperparameters, *RANDOM_DEFAULTS)
    defaults = RANDOM_DEFAULTS
    unshardable_reason = (
        "a random projection of a row-sharded weight would need the whole gradient on each "
        "rank (left side) and APOLLO's channel norms span the shards; train APOLLO with DDP")

    def validate(self, param: torch.Tensor, group: dict, label: str) -> None:
        proj_type = group.get("proj_type", "std")
        check_choice("proj_type", proj_type, tuple(t for t in PROJ_TYPES if t != "full"))
        check_rank(group["rank"], param, label, proj_type)
        check_int_at_least("proj_seed", group.get("proj_seed", 0), 0)

    def sides(self, shape: tuple[int, ...], group: dict) -> tuple[str, ...]:
        return galore_sides(shape, group.get("proj_type", "std"))

    def register(self, state: dict, group: dict, ordinal: int) -> None:
        state["proj_seed"] = torch.tensor(mix(group.get("proj_seed", 0), ordinal),
                                          dtype=torch.int64)

    def has_subspace(self, state: dict) -> bool:
        return "proj_step" in state

    def refresh(self, grad: torch.Tensor, state: dict, group: dict, rule: Rule) -> None:
        if "proj_seed" not in state:  # stepped outside an optimizer (no register call)
            self.register(state, group, 0)
        state["proj_step"] = torch.tensor(int(state.get("step", 0)), dtype=torch.int64)
        state["proj_shape"] = torch.tensor(tuple(grad.shape), dtype=torch.int64)

    def basis(self, state: dict, group: dict, shape: tuple[int, ...], device: torch.device,
              dtype: torch.dtype) -> tuple[torch.Tensor, str]:
        """The current draw ``(basis, side)`` for a weight of ``shape``, in ``dtype``."""
        (side,) = self.sides(shape, group)
        rank = group["rank"]
        size = (shape[0], rank) if side == "left" else (rank, shape[1])
        if torch.device(device).type == "meta":
            return torch.empty(size, device=device, dtype=dtype), side
        generator = torch.Generator(device=device)
        generator.manual_seed(mix(int(state["proj_seed"]), int(state["proj_step"])))
        draw = torch.randn(size, generator=generator, device=device, dtype=torch.float32)
        return draw.mul_(1.0 / math.sqrt(rank)).to(dtype), side

    def project(self, grad: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        basis, side = self.basis(state, group, tuple(grad.shape), grad.device, grad.dtype)
        return kernels.project(grad, basis, side)

    def project_back(self, low: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        shape = tuple(int(s) for s in state["proj_shape"])
        basis, side = self.basis(state, group, shape, low.device, low.dtype)
        return kernels.project_back(low, basis, side)

    def apply_update(
        self, param: torch.Tensor, low: torch.Tensor, alpha: float, state: dict, group: dict,
        decay_before: float = 0.0, decay_after: float = 0.0,
    ) -> None:
        basis, side = self.basis(state, group, tuple(param.shape), param.device, param.dtype)
        kernels.project_back_update(param, low, basis, side, alpha, decay_before, decay_after)

    def captured_energy(self, grad: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        """Share of ``grad``'s energy in the span of the current draw (the orthogonal
        projection onto it, through a QR of the basis): about ``r / d`` for a random
        subspace of a ``d``-dimensional side, whatever the gradient."""
        basis, side = self.basis(state, group, tuple(grad.shape), grad.device, torch.float32)
        q = torch.linalg.qr(basis if side == "left" else basis.t()).Q
        low = kernels.project(grad.float(), q if side == "left" else q.t(), side)
        total = grad.float().square().sum()
        return low.square().sum() / total.clamp_min(torch.finfo(torch.float32).tiny)
