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


class Projector(ABC):
    """Maps a 2-D gradient to a low-rank tensor and a low-rank update back onto the weight."""

    #: registry name, e.g. ``"svd"`` or ``"dct"``
    name: str = ""

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

    @abstractmethod
    def apply(
        self, param: torch.Tensor, low: torch.Tensor, alpha: float, state: dict, group: dict
    ) -> None:
        """``param += alpha * project_back(low)``, fused where the backend allows."""

    def validate(self, param: torch.Tensor, group: dict, label: str) -> None:  # noqa: B027
        """Raise ``ValueError`` if ``group``'s settings cannot project ``param``."""

    def shared_buffers(self) -> list[torch.Tensor]:
        """Tensors shared by all parameters (e.g. one DCT basis per size); counted once by
        :func:`lowrank_optim.memory.state_bytes` as projector bytes."""
        return []
