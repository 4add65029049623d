"""Sparse Spectral Training's projector: a sampled subset of columns of a singular-vector matrix.

The "subspace" of a singular-vector matrix ``U`` ``(m, k)`` (or ``V`` ``(n, k)``) is a set of
``r`` column indices, stored as ``proj_idx`` (int64) in the parameter's state.  Projection reads
the gradient's columns ``grad[:, idx]`` (``(m, r)``: the rule keeps moments for the sampled
vectors only); applying an update adds to those columns and renormalises them to unit length.
The indices are chosen by :class:`lowrank_optim.SSTAdamW` per layer (``U`` and ``V`` of a layer
share them, and the law depends on the layer's singular values), through :meth:`select`.
"""

from __future__ import annotations

import torch

from lowrank_optim import kernels
from lowrank_optim.projectors.base import Projector, index_overlap
from lowrank_optim.rules.base import Rule
from lowrank_optim.validation import check_int_at_least


class SampledColumnsProjector(Projector):
    """Columns ``idx`` of a matrix whose columns are unit vectors (SST's singular vectors).

    Parameters
    ----------
    normalize
        Rescale the updated columns to unit l2 norm after every update (SST's retraction).
    """

    name = "sampled"
    subspace_keys = {"proj_idx": "indices", "proj_width": "indices"}
    unshardable_reason = (
        "Sparse Spectral Training renormalises each sampled column of U and V over the whole "
        "column and re-decomposes whole matrices by SVD, which a row shard cannot do. Train "
        "SST with DDP (or convert back with lowrank_optim.sst.merge first)")
    #: a layer's schedule advances after its V is stepped (and may re-decompose U, S, V),
    #: which must not happen in the middle of a backward pass
    layerwise = False
    refresh_timing = "optimizer"

    def __init__(self, normalize: bool = True) -> None:
        self.normalize = normalize

    def validate(self, param: torch.Tensor, group: dict, label: str) -> None:
        rank = group["rank"]
        check_int_at_least("rank", rank, 1)
        if param.dim() != 2:
            raise ValueError(f"{label}: sampled-column projection needs a 2-D matrix of "
                             f"singular vectors but got {param.dim()}-D.")
        k = param.shape[1]
        if rank > k:
            raise ValueError(f"{label}: rank={rank} exceeds the number of singular vectors "
                             f"k={k}. Use rank <= {k}.")

    def select(self, state: dict, idx: torch.Tensor, width: int) -> None:
        """Make ``idx`` (int64, on the parameter's device) the subspace of this parameter."""
        state["proj_idx"] = idx
        state["proj_width"] = torch.tensor(width, dtype=torch.int64)

    def has_subspace(self, state: dict) -> bool:
        return "proj_idx" in state

    def refresh(self, grad: torch.Tensor, state: dict, group: dict, rule: Rule) -> None:
        raise RuntimeError(
            "SampledColumnsProjector has no sampled columns for this parameter: its indices are "
            "drawn per layer by SSTAdamW (construction, resample(), resvd()); a state loaded "
            "from another optimizer or edited by hand lacks 'proj_idx'."
        )

    def project(self, grad: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        return kernels.gather_lowrank(grad, state["proj_idx"], "right")

    def project_back(self, low: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        full = low.new_zeros(low.shape[0], int(state["proj_width"]))
        kernels.scatter_add_columns_(full, state["proj_idx"], low, 1.0)
        return full

    def apply_update(
        self, param: torch.Tensor, low: torch.Tensor, alpha: float, state: dict, group: dict,
        decay_before: float = 0.0, decay_after: float = 0.0,
    ) -> None:
        with kernels.decoupled_decay(param, decay_before, decay_after):
            kernels.scatter_add_columns_(param, state["proj_idx"], low, alpha, self.normalize)

    def overlap(self, old: dict, new: dict, group: dict) -> torch.Tensor | None:
        """Share of the newly sampled vectors that were already sampled."""
        return index_overlap(old.get("proj_idx"), new.get("proj_idx"))
