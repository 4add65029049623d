"""Optimizer-state memory accounting, shared by callbacks, the profiler and benchmarks.

Bytes are counted per distinct storage actually held (a view into a larger tensor counts the
whole storage it keeps alive), so figures are what the optimizer really pins in memory.
A library optimizer names the category of each of its state keys itself
(:meth:`LowRankOptimizer.state_categories`, from the rule's and projector's declarations);
for foreign optimizers (``torch.optim.AdamW``, galore-torch, which keeps a projector *object*
in state) the usual names are recognised (``exp_*``, ``momentum_buffer``: moments; ``proj*``:
projectors, integer ones indices) and their objects are walked too, so comparisons are fair.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch

from lowrank_optim.distributed.tensors import local_tensor
from lowrank_optim.distributed.zero import local_optimizer

CATEGORIES = ("moments", "projectors", "indices", "other")
#: binary units of :func:`format_bytes`, each 1024 times the previous one
UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


@dataclass(frozen=True)
class StateBytes:
    """Optimizer-state bytes by category and per optimized parameter element."""

    moments: int = 0
    projectors: int = 0
    indices: int = 0
    other: int = 0
    num_params: int = 0

    @property
    def total(self) -> int:
        return self.moments + self.projectors + self.indices + self.other

    @property
    def bytes_per_param(self) -> float:
        return self.total / self.num_params if self.num_params else 0.0

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "total": self.total, "bytes_per_param": self.bytes_per_param}

    def __str__(self) -> str:
        """One line with units chosen by size and the bytes per parameter; says so when the
        optimizer holds no state yet (torch optimizers create it in their first ``step()``)."""
        if self.total == 0:
            return (f"no optimizer state yet over {self.num_params:,} params: optimizers "
                    "create their state in the first step() (call it, or forecast with "
                    "python -m lowrank_optim.profile)")
        parts = ", ".join(f"{c} {format_bytes(getattr(self, c))}" for c in CATEGORIES)
        return (f"{parts}; total {format_bytes(self.total)} over {self.num_params:,} params "
                f"= {self.bytes_per_param:.3f} B/param")


def byte_unit(num_bytes: float) -> tuple[str, int]:
    """``(unit, bytes per unit)``: the largest of :data:`UNITS` not above ``|num_bytes|``
    (``B`` below one KiB)."""
    size, unit = abs(num_bytes), 0
    while unit < len(UNITS) - 1 and size >= 1024 ** (unit + 1):
        unit += 1
    return UNITS[unit], 1024 ** unit


def format_bytes(num_bytes: float, sign: bool = False) -> str:
    """``num_bytes`` in the unit that fits it: ``"512 B"``, ``"1.50 KiB"``, ``"13.48 GiB"``.

    Parameters
    ----------
    num_bytes
        A byte count (negative for a shortfall).
    sign
        Show ``+`` in front of positive values (headroom).
    """
    unit, scale = byte_unit(num_bytes)
    plus = "+" if sign else ""
    if scale == 1:
        return f"{num_bytes:{plus}.0f} B"
    return f"{num_bytes / scale:{plus}.2f} {unit}"


def category(key: str, value: torch.Tensor) -> str:
    """Category of one state entry of a foreign optimizer, by the usual key names."""
    if key.startswith("exp_") or key in ("momentum_buffer", "max_exp_avg_sq"):
        return "moments"
    if key.startswith("proj"):
        return "projectors" if value.is_floating_point() else "indices"
    return "other"


def _tensors(value: object, depth: int = 0) -> Iterable[torch.Tensor]:
    """Tensors reachable from a state value (tensors, lists, projector objects); a DTensor
    (FSDP2 shard-local state) counts as the shard this rank holds."""
    if isinstance(value, torch.Tensor):
        yield local_tensor(value)
    elif depth < 3 and isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v, depth + 1)
    elif depth < 3 and isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v, depth + 1)
    elif depth < 3 and hasattr(value, "__dict__") and not isinstance(value, type):
        for v in vars(value).values():
            yield from _tensors(v, depth + 1)


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    if t.device.type == "meta":  # meta tensors have no storage: each counts on its own
        return ("meta", id(t))
    return (str(t.device), t.untyped_storage().data_ptr())


def _held_bytes(t: torch.Tensor) -> int:
    """Bytes ``t`` keeps alive: its whole storage (meta tensors: their own elements, which is
    what the same code allocates on a real device, so analytic runs on ``meta`` are exact)."""
    if t.device.type == "meta":
        return t.numel() * t.element_size()
    return t.untyped_storage().nbytes()


def state_bytes(optimizer: torch.optim.Optimizer) -> StateBytes:
    """Bytes of ``optimizer``'s state by category (moments / projectors / indices / other).

    Under ZeRO-1 (``ZeroRedundancyOptimizer``) this rank's: its local optimizer's state and
    parameters."""
    optimizer = local_optimizer(optimizer)
    if not isinstance(getattr(optimizer, "state", None), dict) or not hasattr(
            optimizer, "param_groups"):
        raise TypeError(f"state_bytes needs an optimizer (with .state and .param_groups), got "
                        f"{type(optimizer).__name__}; for a model, profile it with "
                        "lowrank_optim.profile or build the optimizer first.")
    counts = dict.fromkeys(CATEGORIES, 0)
    seen: set[tuple[str, int]] = set()
    declared = getattr(optimizer, "state_categories", None)
    declared = declared() if callable(declared) else None
    for state in optimizer.state.values():
        for key, value in state.items():
            for t in _tensors(value):
                k = _storage_key(t)
                if k in seen:
                    continue
                seen.add(k)
                if declared is not None:
                    cat = declared.get(key, "other")
                elif isinstance(value, torch.Tensor):
                    cat = category(key, t)
                else:
                    cat = "projectors" if key.startswith("proj") else category(key, t)
                counts[cat] += _held_bytes(t)
    shared = getattr(getattr(optimizer, "projector", None), "shared_buffers", None)
    for t in shared() if callable(shared) else []:
        k = _storage_key(t)
        if k not in seen:
            seen.add(k)
            counts["projectors"] += _held_bytes(t)
    num_params = sum(local_tensor(p).numel() for g in optimizer.param_groups
                     for p in g["params"])
    return StateBytes(**counts, num_params=num_params)


def adamw_state_bytes(params: Iterable[torch.Tensor]) -> int:
    """What ``torch.optim.AdamW`` would hold for ``params``: two moments + a step each."""
    return sum(2 * p.numel() * p.element_size() + 4 for p in params)
