"""The optimizer behind its wrappers (accelerate's ``AcceleratedOptimizer``,
:class:`~lowrank_optim.layerwise.LayerwiseOptimizer`): each holds the wrapped one as
``.optimizer``.  A leaf module, so that every part of the package may use it."""

from __future__ import annotations

from typing import Any


def wrapper_chain(optimizer: Any) -> list[Any]:
    """``optimizer`` and what it wraps (each ``.optimizer`` in turn), outermost first."""
    out, seen = [], set()
    while optimizer is not None and id(optimizer) not in seen:
        out.append(optimizer)
        seen.add(id(optimizer))
        optimizer = getattr(optimizer, "optimizer", None)
    return out


def innermost_optimizer(optimizer: Any) -> Any:
    """The optimizer holding the state, behind any wrappers (``None`` stays ``None``)."""
    chain = wrapper_chain(optimizer)
    return chain[-1] if chain else None
