"""The projector interface: where a low-rank subspace comes from.

A projector is a stateless strategy.  Everything it learns about a parameter (a basis, a set of
indices) lives as tensors in that parameter's optimizer state under keys that start with
``proj_``, so ``optimizer.state_dict()`` holds tensors only and loads with
``torch.load(..., weights_only=True)``.  Memory accounting reads the same keys: floating
``proj_*`` tensors count as projectors, integer ones as indices.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from lowrank_optim import kernels


class Projector(ABC):
    """Maps a 2-D gradient to a low-rank tensor and a low-rank update back onto the weight."""

    #: registry name, e.g. ``"svd"`` or ``"dct"``
    name: str = ""
    #: group keys (with their defaults) that define the layout of this projector's state: a
    #: saved state only loads into groups with the same values (``load_state_dict``)
    structure_keys: dict[str, object] = {"rank": None, "proj_type": "std"}

    @abstractmethod
    def has_subspace(self, state: dict) -> bool:
        """Whether ``state`` already holds a subspace (false before the first refresh)."""

    @abstractmethod
    def refresh(self, grad: torch.Tensor, state: dict, group: dict) -> torch.Tensor | None:
        """Compute a new subspace from ``grad`` and store it in ``state``.

        May return the low-rank gradient when it falls out of the refresh for free (the DCT
        scores contain it); ``None`` makes the core call :meth:`project`.
        """

    @abstractmethod
    def project(self, grad: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        """Low-rank image of ``grad`` in the current subspace."""

    @abstractmethod
    def project_back(self, low: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        """Full-size image of a low-rank tensor (for diagnostics; steps use :meth:`apply`)."""

    def apply(
        self, param: torch.Tensor, low: torch.Tensor, alpha: float, state: dict, group: dict
    ) -> None:
        """``param += alpha * project_back(low)``, fused where the backend allows.

        A projector overrides this or :meth:`apply_update` (each default calls the other):
        the plain update, or the one that also takes the decays into its kernel.
        """
        self.apply_update(param, low, alpha, state, group)

    def apply_update(
        self, param: torch.Tensor, low: torch.Tensor, alpha: float, state: dict, group: dict,
        decay_before: float = 0.0, decay_after: float = 0.0,
    ) -> None:
        """:meth:`apply` with decoupled weight decay: ``param *= 1 - decay_before``, then
        ``param += alpha * project_back(low)``, then ``param -= decay_after * param``.

        This default runs the decays as separate passes around :meth:`apply`
        (:func:`lowrank_optim.kernels.decoupled_decay`); a projector whose back-projection is
        one ``kernels.project_back*_update`` call overrides it to pass the decays to that
        kernel, which applies all three in one pass over the weight.
        """
        with kernels.decoupled_decay(param, decay_before, decay_after):
            self.apply(param, low, alpha, state, group)

    def validate(self, param: torch.Tensor, group: dict, label: str) -> None:  # noqa: B027
        """Raise ``ValueError`` if ``group``'s settings cannot project ``param``."""

    # -- diagnostics (read by LowRankOptimizer.subspace_stats; never called by a step) ------
    @staticmethod
    def subspace(state: dict) -> dict:
        """The subspace part of a parameter's state: its ``proj_*`` entries (a new dict).

        Projecting with this view instead of the full state leaves the state untouched, even
        for projectors whose :meth:`project` also updates other entries (error feedback).
        """
        return {k: v for k, v in state.items() if k.startswith("proj_")}

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
        """How much of the ``new`` subspace the ``old`` one already spanned, in ``[0, 1]``.

        ``old`` and ``new`` are :meth:`subspace` views taken before and after a refresh.  This
        default handles subspaces chosen as integer indices into a fixed orthonormal basis
        (an integer ``proj_idx``): the share of new indices that were already selected, which
        is the mean squared cosine of the principal angles between the two subspaces.  Other
        projectors return ``None`` (not meaningful) unless they override it.
        """
        a, b = old.get("proj_idx"), new.get("proj_idx")
        if a is None or b is None or a.is_floating_point() or b.numel() == 0:
            return None
        return torch.isin(b, a.to(b.device)).float().mean()

    def shared_buffers(self) -> list[torch.Tensor]:
        """Tensors shared by all parameters (e.g. one DCT basis per size); counted once by
        :func:`lowrank_optim.memory.state_bytes` as projector bytes."""
        return []
