"""The projector interface: where a low-rank subspace comes from.

A projector is a stateless strategy.  Everything it learns about a parameter (a basis, a set of
indices) lives as tensors in that parameter's optimizer state under the keys it declares
(:attr:`Projector.subspace_keys`), so ``optimizer.state_dict()`` holds tensors only and loads
with ``torch.load(..., weights_only=True)``.  What it can do is declared too, as class
attributes the engines read (:attr:`~Projector.row_shardable` for FSDP2,
:attr:`~Projector.layerwise`, :attr:`~Projector.refresh_timing`); when the subspace changes it
asks the rule to re-express the moments (:meth:`lowrank_optim.rules.Rule.map_moments`) and
never touches the rule's entries itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

import torch

from lowrank_optim.rules.base import Rule

#: what a refresh timed by the optimizer means (:attr:`Projector.refresh_timing`)
REFRESH_TIMINGS = ("gap", "optimizer")


class Projector(ABC):
    """Maps a 2-D gradient to a low-rank tensor and a low-rank update back onto the weight."""

    #: registry name, e.g. ``"svd"`` or ``"dct"``
    name: ClassVar[str] = ""
    #: group keys (with their defaults) that define the layout of this projector's state: a
    #: saved state only loads into groups with the same values (``load_state_dict``)
    structure_keys: ClassVar[dict[str, object]] = {"rank": None, "proj_type": "std"}
    #: state keys holding the subspace, with their memory category (``"projectors"`` for
    #: float bases, ``"indices"`` for integer ones)
    subspace_keys: ClassVar[dict[str, str]] = {}
    #: other state keys this projector keeps, with their memory category
    extra_keys: ClassVar[dict[str, str]] = {}
    #: group keys of this projector's options (``rank`` first), in the optimizers' signature
    #: order; the projection keys are also constructor defaults, so engines that build the
    #: optimizer from keyword arguments alone (``ZeroRedundancyOptimizer``) can set them
    hyperparameters: ClassVar[tuple[str, ...]] = ("rank", "update_proj_gap", "scale",
                                                  "proj_type")
    #: defaults of the options beyond ``update_proj_gap`` / ``scale`` / ``proj_type`` (which
    #: :data:`lowrank_optim.optim.base.PROJECTION_DEFAULTS` holds)
    defaults: ClassVar[dict[str, object]] = {}
    #: FSDP2: whether a weight split by rows (``Shard(0)``) can be projected shard by shard
    #: (right side locally, left side on the gathered gradient; see
    #: :mod:`lowrank_optim.distributed.fsdp2`)
    row_shardable: ClassVar[bool] = False
    #: why not, for the error message when :attr:`row_shardable` is false
    unshardable_reason: ClassVar[str] = "it has no shard-local implementation"
    #: whether a refresh can be computed from row shards (partial scores summed across ranks,
    #: :meth:`refresh_rows`) instead of the gathered gradient
    refresh_from_rows: ClassVar[bool] = False
    #: whether parameters can be stepped one at a time as backward produces their gradients
    #: (:class:`lowrank_optim.LayerwiseOptimizer`)
    layerwise: ClassVar[bool] = True
    #: who times refreshes: ``"gap"`` (``update_proj_gap`` / ``request_refresh``, so refresh
    #: schedules may drive them) or ``"optimizer"`` (the optimizer class schedules its own)
    refresh_timing: ClassVar[str] = "gap"

    @abstractmethod
    def has_subspace(self, state: dict) -> bool:
        """Whether ``state`` already holds a subspace (false before the first refresh)."""

    @abstractmethod
    def refresh(self, grad: torch.Tensor, state: dict, group: dict,
                rule: Rule) -> torch.Tensor | None:
        """Compute a new subspace from ``grad`` and store it in ``state``.

        ``rule`` owns the moments in ``state``; a projector whose subspaces can be related
        (DCT) asks it to re-express them (:meth:`Rule.map_moments`).  May return the low-rank
        gradient when it falls out of the refresh for free (the DCT scores contain it);
        ``None`` makes the core call :meth:`project`.
        """

    @abstractmethod
    def project(self, grad: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        """Low-rank image of ``grad`` in the current subspace."""

    @abstractmethod
    def project_back(self, low: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        """Full-size image of a low-rank tensor (for diagnostics; steps use
        :meth:`apply_update`)."""

    @abstractmethod
    def apply_update(
        self, param: torch.Tensor, low: torch.Tensor, alpha: float, state: dict, group: dict,
        decay_before: float = 0.0, decay_after: float = 0.0,
    ) -> None:
        """In place: ``param *= 1 - decay_before``, then ``param += alpha *
        project_back(low)``, then ``param -= decay_after * param``.

        Fused where the backend allows (one ``kernels.project_back*_update`` pass over the
        weight); otherwise the decays run around the update through
        :func:`lowrank_optim.kernels.decoupled_decay`.
        """

    def apply(
        self, param: torch.Tensor, low: torch.Tensor, alpha: float, state: dict, group: dict
    ) -> None:
        """``param += alpha * project_back(low)`` (:meth:`apply_update` without decay)."""
        self.apply_update(param, low, alpha, state, group)

    def validate(self, param: torch.Tensor, group: dict, label: str) -> None:  # noqa: B027
        """Raise ``ValueError`` if ``group``'s settings cannot project ``param``."""

    def register(self, state: dict, group: dict, ordinal: int) -> None:  # noqa: B027
        """Called once per projected parameter, before its first step, with its position
        among the optimizer's parameters (stable across processes and resumes): a projector
        that draws random subspaces keeps a per-parameter seed from it."""

    def sides(self, shape: tuple[int, ...], group: dict) -> tuple[str, ...]:
        """The side(s) projected for a weight of ``shape`` (``"left"``, ``"right"``)."""
        return ("right",)

    # -- engines (FSDP2) --------------------------------------------------------------------
    def fsdp2_problem(self, group: dict) -> str | None:
        """Why ``group``'s projected weights cannot be stepped on FSDP2 row shards, or None."""
        return None if self.row_shardable else self.unshardable_reason

    def refresh_rows(
        self, rows: torch.Tensor, state: dict, group: dict, shape: tuple[int, ...],
        all_reduce: Callable[[torch.Tensor], object], rule: Rule,
    ) -> torch.Tensor:
        """Refresh from this rank's rows of a gradient of ``shape`` split by rows (FSDP2);
        returns this rank's rows of the low-rank gradient.  Only for projectors with
        :attr:`refresh_from_rows`."""
        raise NotImplementedError(f"{type(self).__name__} refreshes from the whole gradient "
                                  "(refresh_from_rows is False)")

    # -- state ------------------------------------------------------------------------------
    def state_categories(self) -> dict[str, str]:
        """Memory category of every state key this projector may create."""
        return {**self.subspace_keys, **self.extra_keys}

    def subspace(self, state: dict) -> dict:
        """The subspace part of a parameter's state (a new dict of its
        :attr:`subspace_keys`).

        Projecting with this view instead of the full state leaves the state untouched, even
        for projectors whose :meth:`project` also updates other entries (error feedback).
        """
        return {k: state[k] for k in self.subspace_keys if k in state}

    # -- diagnostics (read by LowRankOptimizer.subspace_stats; never called by a step) ------
    def captured_energy(self, grad: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        """Share of ``grad``'s energy inside the current subspace, ``||P(G)||^2 / ||G||^2``.

        ``P(G) = project_back(project(G))``; for an orthonormal basis this is the orthogonal
        projection, so the value lies in ``[0, 1]``.  Returns a 0-d float32 tensor on
        ``grad``'s device (no host sync); ``state`` is not modified.
        """
        view = self.subspace(state)
        back = self.project_back(self.project(grad, view, group), view, group)
        total = grad.float().square().sum()
        return back.float().square().sum() / total.clamp_min(torch.finfo(torch.float32).tiny)

    def overlap(self, old: dict, new: dict, group: dict) -> torch.Tensor | None:
        """How much of the ``new`` subspace the ``old`` one already spanned, in ``[0, 1]``
        (:meth:`subspace` views taken before and after a refresh); ``None`` where not
        meaningful (the default)."""
        return None

    def shared_buffers(self) -> list[torch.Tensor]:
        """Tensors shared by all parameters (e.g. one DCT basis per size); counted once by
        :func:`lowrank_optim.memory.state_bytes` as projector bytes."""
        return []


def index_overlap(old: torch.Tensor | None, new: torch.Tensor | None) -> torch.Tensor | None:
    """Overlap of two subspaces chosen as integer indices into one fixed orthonormal basis:
    the share of ``new`` indices already in ``old``, which is the mean squared cosine of the
    principal angles between them.  ``None`` when either is missing or empty."""
    if old is None or new is None or new.numel() == 0:
        return None
    return torch.isin(new, old.to(new.device)).float().mean()
