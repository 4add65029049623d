"""The inner-rule interface: what is done inside the (possibly low-rank) space."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Update:
    """One step's change to a parameter, before back-projection.

    The core applies ``param *= 1 - decay`` (before or after, per ``decay_first``) and
    ``param += alpha * back(direction)`` where ``back`` is the projector's back-projection
    (identity for unprojected parameters) and already includes the group's ``scale``.
    """

    direction: torch.Tensor
    alpha: float
    decay: float = 0.0
    decay_first: bool = False


class Rule(ABC):
    """An optimizer rule that works on any tensor, full-size or low-rank.

    Moment tensors it keeps in ``state`` use keys starting with ``exp_`` (memory accounting
    counts them as moments).  ``state["step"]`` is already incremented when :meth:`update` runs.
    """

    name: str = ""
    #: group keys (with their defaults) that define the layout of this rule's state: a saved
    #: state only loads into groups with the same values (``load_state_dict``)
    structure_keys: dict[str, object] = {}

    @abstractmethod
    def validate(self, group: dict) -> None:
        """Raise ``ValueError`` on bad hyper-parameters in ``group``."""

    def check_state(self, state: dict, group: dict, label: str | Callable[[], str]) -> None:
        """Raise ``ValueError`` if ``state`` cannot be stepped under ``group``'s settings
        (called for every parameter before a step changes anything).  Default: no check."""
        return None

    @abstractmethod
    def update(
        self, low: torch.Tensor, state: dict, group: dict, param: torch.Tensor
    ) -> Update:
        """Advance the moments with ``low`` and return the step to apply."""
