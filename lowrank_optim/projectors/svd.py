"""GaLore's projector: the top singular vectors of the gradient (exact SVD in fp32)."""

from __future__ import annotations

import torch

from lowrank_optim import kernels
from lowrank_optim.projectors.base import Projector
from lowrank_optim.rules.base import Rule
from lowrank_optim.validation import PROJ_TYPES, check_choice, check_rank


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
    ``full``).  The SVD runs in fp32 whatever the gradient dtype and the basis is stored in the
    gradient's dtype, as in galore-torch.  The basis is stored as its own compact tensor (not a
    view into the SVD output), so the optimizer holds exactly ``r * min(m, n)`` elements.
    """

    name = "svd"
    subspace_keys = {"proj_left": "projectors", "proj_right": "projectors"}
    row_shardable = True

    def validate(self, param: torch.Tensor, group: dict, label: str) -> None:
        check_choice("proj_type", group.get("proj_type", "std"), PROJ_TYPES)
        check_rank(group["rank"], param, label, group.get("proj_type", "std"))

    def sides(self, shape: tuple[int, ...], group: dict) -> tuple[str, ...]:
        return galore_sides(shape, group.get("proj_type", "std"))

    def has_subspace(self, state: dict) -> bool:
        return "proj_left" in state or "proj_right" in state

    def refresh(self, grad: torch.Tensor, state: dict, group: dict, rule: Rule) -> None:
        rank = group["rank"]
        u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
        for side in self.sides(grad.shape, group):
            basis = u[:, :rank] if side == "left" else vh[:rank]
            state[f"proj_{side}"] = basis.to(dtype=grad.dtype, copy=True).contiguous()

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
