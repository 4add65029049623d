"""GaLore's projector: the top singular vectors of the gradient (fp32 SVD: exact, randomized or
warm-started)."""

from __future__ import annotations

from typing import Any

import torch

from lowrank_optim import kernels
from lowrank_optim.projectors import fast_svd
from lowrank_optim.projectors.base import Projector
from lowrank_optim.rules.base import Rule
from lowrank_optim.validation import PROJ_TYPES, check_choice, check_int_at_least, check_rank

SVD_METHODS = ("exact", "randomized", "warm")
#: the SVD projector's group keys beyond rank / update_proj_gap / scale / proj_type
SVD_DEFAULTS: dict[str, Any] = {
    "svd_method": "exact",
    "svd_oversample": 10,
    "svd_power_iters": None,
    "svd_seed": 0,
}
#: power iterations when ``svd_power_iters`` is None
DEFAULT_POWER_ITERS = {"randomized": 1, "warm": 2}


def _opt(group: dict, key: str) -> Any:
    return group.get(key, SVD_DEFAULTS[key])


def power_iterations(group: dict) -> int:
    """The group's ``svd_power_iters``, or its method's default (:data:`DEFAULT_POWER_ITERS`)."""
    value = _opt(group, "svd_power_iters")
    return DEFAULT_POWER_ITERS.get(_opt(group, "svd_method"), 0) if value is None else value


def refresh_seed(group: dict, step: int) -> int:
    """Seed of a randomized refresh at optimizer step ``step``: a function of ``svd_seed`` and
    the step only, so replicas draw the same matrix and a resumed run redraws it."""
    return (int(_opt(group, "svd_seed")) * 1_000_003 + step) % (2**63 - 1)


def galore_sides(shape: torch.Size | tuple[int, int], proj_type: str) -> tuple[str, ...]:
    """Which side(s) GaLore projects for a weight of ``shape`` (moments are r x max(m, n))."""
    m, n = shape
    if proj_type == "std":
        return ("right",) if m >= n else ("left",)
    if proj_type == "reverse_std":
        return ("left",) if m >= n else ("right",)
    if proj_type == "full":
        return ("left", "right")
    return (proj_type,)


class SVDProjector(Projector):
    """Top-``rank`` singular vectors of the gradient at refresh time.

    Group keys: ``rank``, ``proj_type`` (``std``, ``reverse_std``, ``left``, ``right``,
    ``full``) and how a refresh computes the basis (missing keys take :data:`SVD_DEFAULTS`):

    ``svd_method``
        ``"exact"`` (default): ``torch.linalg.svd``, galore-torch's refresh bit for bit.
        ``"randomized"``: the randomized range finder (:func:`fast_svd.randomized_bases`,
        ``svd_oversample`` extra samples, ``svd_power_iters`` power iterations, default 1).
        ``"warm"``: subspace iteration from the current basis (:func:`fast_svd.warm_bases`,
        ``svd_power_iters`` iterations, default 2); the first refresh of a parameter (no basis
        yet, or one of another shape) is exact.
    ``svd_oversample``
        Extra random samples of ``"randomized"`` (default 10).
    ``svd_power_iters``
        Power / subspace iterations (default ``None``: 1 for ``"randomized"``, 2 for
        ``"warm"``; on the tiny recipe's gradients these keep >= 99% (randomized) and a median
        99.3% (warm) of the exact SVD's captured energy, see
        ``benchmarks/results/refresh_cost_cpu.md``).
    ``svd_seed``
        Seed of ``"randomized"``'s Gaussian samples; the draw of a refresh at step ``t`` is
        seeded from ``(svd_seed, t)`` (:func:`refresh_seed`), so DDP replicas agree and a
        resumed run redraws the same matrix without generator state.

    The SVD runs in fp32 whatever the gradient dtype and the basis is stored in the gradient's
    dtype, as in galore-torch.  The basis is stored as its own compact tensor (not a view into
    the SVD output), so the optimizer holds exactly ``r * min(m, n)`` elements.
    """

    name = "svd"
    subspace_keys = {"proj_left": "projectors", "proj_right": "projectors"}
    hyperparameters = (*Projector.hyperparameters, *SVD_DEFAULTS)
    defaults = SVD_DEFAULTS
    row_shardable = True

    def validate(self, param: torch.Tensor, group: dict, label: str) -> None:
        check_choice("proj_type", group.get("proj_type", "std"), PROJ_TYPES)
        check_rank(group["rank"], param, label, group.get("proj_type", "std"))
        check_choice("svd_method", _opt(group, "svd_method"), SVD_METHODS)
        check_int_at_least("svd_oversample", _opt(group, "svd_oversample"), 0)
        check_int_at_least("svd_seed", _opt(group, "svd_seed"), 0)
        if _opt(group, "svd_power_iters") is not None:
            least = 1 if _opt(group, "svd_method") == "warm" else 0
            check_int_at_least("svd_power_iters", _opt(group, "svd_power_iters"), least)

    def sides(self, shape: tuple[int, ...], group: dict) -> tuple[str, ...]:
        return galore_sides(shape, group.get("proj_type", "std"))

    def has_subspace(self, state: dict) -> bool:
        return "proj_left" in state or "proj_right" in state

    def refresh(self, grad: torch.Tensor, state: dict, group: dict, rule: Rule) -> None:
        rank, sides = group["rank"], self.sides(grad.shape, group)
        method = _opt(group, "svd_method")
        g = grad.float()
        m, n = grad.shape
        shapes = {"left": (m, rank), "right": (rank, n)}
        previous = {s: state.get(f"proj_{s}") for s in sides}
        if method == "warm" and all(b is not None and tuple(b.shape) == shapes[s]
                                    for s, b in previous.items()):
            bases = fast_svd.warm_bases(g, {s: b.float() for s, b in previous.items()},
                                        power_iterations(group))
        elif method == "randomized":
            generator = torch.Generator(device=g.device)
            generator.manual_seed(refresh_seed(group, int(state.get("step", 0))))
            bases = fast_svd.randomized_bases(g, rank, sides, _opt(group, "svd_oversample"),
                                              power_iterations(group), generator)
        else:
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            bases = {"left": u[:, :rank], "right": vh[:rank]}
        for side in sides:
            state[f"proj_{side}"] = bases[side].to(dtype=grad.dtype, copy=True).contiguous()

    def project(self, grad: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        low = grad
        for side in ("left", "right"):
            if f"proj_{side}" in state:
                low = kernels.project(low, state[f"proj_{side}"], side)
        return low

    def project_back(self, low: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        for side in ("left", "right"):
            if f"proj_{side}" in state:
                low = kernels.project_back(low, state[f"proj_{side}"], side)
        return low

    def overlap(self, old: dict, new: dict, group: dict) -> torch.Tensor | None:
        """Mean squared cosine of the principal angles between the old and new bases,
        ``||B_old B_new^T||_F^2 / r`` (1: same subspace, 0: orthogonal), averaged over the
        projected sides; sign flips of singular vectors do not count."""
        values = []
        for side in ("left", "right"):
            a, b = old.get(f"proj_{side}"), new.get(f"proj_{side}")
            if a is None or b is None:
                continue
            a, b = a.float(), b.float()
            cross = a.t() @ b if side == "left" else a @ b.t()  # r x r
            values.append(cross.square().sum() / min(cross.shape))
        return torch.stack(values).mean() if values else None

    def apply_update(
        self, param: torch.Tensor, low: torch.Tensor, alpha: float, state: dict, group: dict,
        decay_before: float = 0.0, decay_after: float = 0.0,
    ) -> None:
        if "proj_left" in state and "proj_right" in state:  # proj_type="full"
            low = kernels.project_back(low, state["proj_left"], "left")
            side = "right"
        else:
            side = "left" if "proj_left" in state else "right"
        kernels.project_back_update(param, low, state[f"proj_{side}"], side, alpha,
                                    decay_before, decay_after)
