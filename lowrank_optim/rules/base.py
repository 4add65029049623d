"""The inner-rule interface: what is done inside the (possibly low-rank) space.

A rule owns its optimizer state.  It declares the moments it keeps (:class:`Moment`: name,
which axes of the gradient each keeps, signed or unsigned 8-bit table) and its capabilities
(:attr:`Rule.elementwise`, :attr:`Rule.bits`, :attr:`Rule.hyperparameters`); from that
declaration the base class creates the state, stores it in 8 bits where the group asks
(:mod:`lowrank_optim.rules.lowbit`), checks a loaded state, names each entry's memory category,
and re-expresses the moments when a projector changes the subspace (:meth:`Rule.map_moments`).
Projectors, engines and memory accounting use these methods and never a rule's key names.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from lowrank_optim import kernels
from lowrank_optim.rules import lowbit

#: ``fn(tensor, axis)`` of :meth:`Rule.map_moments`: the tensor re-expressed along ``axis``
MomentMap = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class Moment:
    """One state tensor a rule keeps per parameter, computed from the (low-rank) gradient.

    Parameters
    ----------
    name
        State key (the plain, 32-bit entry; 8-bit storage adds ``_codes`` / ``_absmax``).
    reduced
        Axis of the gradient the moment averages away (Adafactor's row statistic: ``-1``; its
        column statistic: ``-2``); ``None``: the gradient's shape.
    signed
        Whether the values can be negative (8-bit: the signed table; second moments are
        unsigned).
    float32
        Kept in fp32 for half-precision (fp16, bf16) gradients; else in the gradient's dtype.
    when
        ``when(grad, group)``: whether this moment exists for that gradient and group (e.g.
        only with ``beta1``, only for matrices); ``None``: always.
    """

    name: str
    reduced: int | None = None
    signed: bool = True
    float32: bool = False
    when: Callable[[torch.Tensor, dict], bool] | None = None
    #: the two state entries of the 8-bit storage (codes, absmax), set from ``name``
    storage: tuple[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "storage", lowbit.storage_keys(self.name))

    def applies(self, grad: torch.Tensor, group: dict) -> bool:
        """Whether the moment exists for ``grad`` under ``group``."""
        return self.when is None or bool(self.when(grad, group))

    def shape(self, grad: torch.Tensor) -> tuple[int, ...]:
        """The moment's shape for a gradient like ``grad``."""
        shape = tuple(grad.shape)
        if self.reduced is None:
            return shape
        return shape[: self.reduced % len(shape)] + shape[self.reduced % len(shape) + 1:]

    def axis_of(self, axis: int, ndim: int) -> int | None:
        """Position of gradient axis ``axis`` (of an ``ndim``-D gradient) in this moment, or
        ``None`` if the moment averages it away."""
        axis %= ndim
        if self.reduced is None:
            return axis
        reduced = self.reduced % ndim
        if axis == reduced:
            return None
        return axis if axis < reduced else axis - 1

    def zeros(self, grad: torch.Tensor) -> torch.Tensor:
        """A zero moment for ``grad`` in the declared dtype (contiguous)."""
        half = grad.dtype in (torch.float16, torch.bfloat16)
        dtype = torch.float32 if self.float32 and half else grad.dtype
        return torch.zeros(self.shape(grad), dtype=dtype, device=grad.device)


@dataclass(frozen=True)
class Projection:
    """What a rule with :attr:`Rule.full_gradient` sees of a projected step besides the
    low-rank gradient ``low``.

    Attributes
    ----------
    grad
        The full-size gradient ``G`` (``m x n``) that ``low`` was projected from.
    axis
        The axis of ``G`` (and of ``low``) that the projection reduced to the rank: 0 when
        ``low = P G`` is ``r x n`` (left side), 1 when ``low = G P`` is ``m x r`` (right).  A
        *channel* is an index of the other axis; ``low.norm(dim=axis)`` and
        ``grad.norm(dim=axis)`` are per-channel norms of the same channels.
    back
        ``back(low)``: the projector's full-size image of a low-rank tensor.
    """

    grad: torch.Tensor
    axis: int
    back: Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Update:
    """One step's change to a parameter.

    The core applies ``param *= 1 - decay`` (before or after everything else, per
    ``decay_first``), ``param += alpha * back(direction)`` where ``back`` is the projector's
    back-projection (identity for unprojected parameters), and, when ``full`` is set,
    ``param += full_alpha * full * full_scale`` (a full-size term: APOLLO's scaled gradient,
    Fira's scaled residual; ``full_scale`` broadcasts against ``full``: a per-channel column
    or row, or a 0-d tensor; ``None`` means 1).  ``direction=None`` means no low-rank term.
    The group's ``scale`` multiplies both ``alpha`` and ``full_alpha``.
    """

    direction: torch.Tensor | None
    alpha: float
    decay: float = 0.0
    decay_first: bool = False
    full: torch.Tensor | None = None
    full_scale: torch.Tensor | None = None
    full_alpha: float = 0.0

    @property
    def decays(self) -> tuple[float, float]:
        """``(decay_before, decay_after)`` as :func:`lowrank_optim.kernels.update_param` and
        the projectors' ``apply_update`` take them."""
        return (self.decay, 0.0) if self.decay_first else (0.0, self.decay)


class Rule(ABC):
    """An optimizer rule that works on any tensor, full-size or low-rank.

    A subclass declares :attr:`moments`, its capabilities and :attr:`hyperparameters`, checks
    a group in :meth:`validate` and implements :meth:`update` on plain (32-bit) moments; the
    base class does the rest.  ``state["step"]`` is already incremented when :meth:`update`
    runs.  A rule whose :attr:`bits` include 8 gets 8-bit moments for free (dequantised
    around :meth:`update`); one with a fused 8-bit kernel sets :attr:`fused_lowbit` and
    handles quantised entries in :meth:`update` itself (:class:`~lowrank_optim.rules.Adam`).
    """

    #: registry and structure name, e.g. ``"adam"``
    name: ClassVar[str] = ""
    #: the state tensors this rule keeps per parameter
    moments: ClassVar[tuple[Moment, ...]] = ()
    #: whether the update of each element depends on that element alone (then a row shard's
    #: step equals the unsharded one: FSDP2 can run it)
    elementwise: ClassVar[bool] = False
    #: state precisions this rule supports (a group's ``bits`` key)
    bits: ClassVar[tuple[int, ...]] = (32,)
    #: whether :meth:`update` handles 8-bit moments itself (a fused kernel)
    fused_lowbit: ClassVar[bool] = False
    #: the group keys of this rule's hyper-parameters, in the optimizers' signature order
    hyperparameters: ClassVar[tuple[str, ...]] = ()
    #: why 8-bit state is not offered, added to the ``bits`` error of a rule without it
    lowbit_note: ClassVar[str] = ""
    #: default values of :attr:`hyperparameters` (used by
    #: :func:`lowrank_optim.optim.compose`; the hand-written classes keep their own)
    defaults: ClassVar[dict[str, object]] = {}
    #: whether a projected step needs the full-size gradient (:class:`Projection`, passed
    #: to :meth:`step` as ``projection``): APOLLO scales it, Fira adds its residual.  Such a
    #: rule cannot take pre-projected (layer-wise accumulated) gradients.
    full_gradient: ClassVar[bool] = False
    #: state keys other than the moments (e.g. a norm-growth limiter's last norm), with
    #: their memory category
    extra_state: ClassVar[dict[str, str]] = {}

    @property
    def structure_keys(self) -> dict[str, object]:
        """Group keys (with defaults) that define the layout of this rule's state: a saved
        state only loads into groups with the same values (``load_state_dict``)."""
        if 8 not in self.bits:
            return {}
        return {k: lowbit.DEFAULTS[k] for k in ("bits", "block_size", "code")}

    # -- hyper-parameters -----------------------------------------------------------------
    def validate(self, group: dict) -> None:
        """Raise ``ValueError`` on bad hyper-parameters in ``group``; the base checks ``bits``
        against :attr:`bits` and the low-bit keys."""
        bits = group.get("bits", 32)
        if isinstance(bits, bool) or bits not in self.bits:
            if 8 in self.bits:
                lowbit.check_settings(group)  # its message lists the choices
            note = f" ({self.lowbit_note})" if self.lowbit_note else ""
            raise ValueError(
                f"Invalid bits={bits!r} for {type(self).__name__}: it supports "
                f"{' or '.join(map(str, self.bits))}-bit state{note}. Drop `bits`, or use an "
                "Adam-based optimizer (GaLoreAdamW8bit, DCTAdamW(bits=8), SSTAdamW(bits=8)) "
                "for 8-bit moments.")
        if 8 in self.bits:
            lowbit.check_settings(group)

    # -- state ----------------------------------------------------------------------------
    def has_state(self, state: dict) -> bool:
        """Whether ``state`` already holds this rule's moments (plain or 8-bit)."""
        return any(m.name in state or m.storage[0] in state for m in self.moments)

    def init_state(self, grad: torch.Tensor, state: dict, group: dict) -> None:
        """Zero moments for a gradient like ``grad``: 8-bit when the group asks for it (and
        this rule supports it) and the moment has at least ``min_8bit_size`` elements."""
        low_bit = 8 in self.bits
        for m in self.moments:
            if not m.applies(grad, group):
                continue
            if low_bit and lowbit.use_8bit(group, math.prod(m.shape(grad))):
                lowbit.init(state, m, grad, group)
            else:
                state[m.name] = m.zeros(grad)

    def step(self, low: torch.Tensor, state: dict, group: dict, param: torch.Tensor,
             projection: Projection | None = None) -> Update:
        """Create the state if needed, then :meth:`update` (on dequantised moments unless the
        rule has :attr:`fused_lowbit`).  What the core calls; ``projection`` is given to
        rules with :attr:`full_gradient` for projected parameters (then :meth:`update` is
        called with it as a keyword)."""
        if not self.has_state(state):
            self.init_state(low, state, group)
        extra = {} if projection is None else {"projection": projection}
        if self.fused_lowbit or 8 not in self.bits:
            return self.update(low, state, group, param, **extra)
        with lowbit.dequantized(state, group, self.moments):
            return self.update(low, state, group, param, **extra)

    def step_unprojected(
        self, params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict],
        group: dict,
    ) -> None:
        """Step parameters that have no projector, in place (each ``state["step"]`` already
        advanced): ``param += alpha * direction`` inside the update's decoupled decay.

        The core calls it with one parameter (:func:`lowrank_optim.core.lowrank_step`) or with
        all unprojected parameters of a group at once (:func:`lowrank_optim.core.plain_steps`);
        a rule with a multi-tensor kernel overrides it (:class:`~lowrank_optim.rules.Adam`:
        torch's fused AdamW), and must give each parameter the same result either way.  The
        default steps them one at a time through :meth:`step`.
        """
        for param, grad, state in zip(params, grads, states, strict=True):
            update = self.step(grad, state, group, param)
            kernels.update_param(param, update.direction, update.alpha, *update.decays)

    @abstractmethod
    def update(
        self, low: torch.Tensor, state: dict, group: dict, param: torch.Tensor
    ) -> Update:
        """Advance the moments with ``low`` and return the step to apply."""

    def map_moments(self, state: dict, group: dict, axis: int, fn: MomentMap) -> None:
        """Re-express the moments after the subspace changed along gradient axis ``axis``.

        Every moment that keeps that axis is replaced, in place, by ``fn(moment, position)``
        (``position``: where the axis lies in the moment); moments that average it away are
        left alone.  8-bit moments are dequantised, mapped and requantised.  Projectors call
        this on a refresh (DCT: rotate the moments into the new selection).
        """
        with lowbit.dequantized(state, group, self.moments):
            for m in self.moments:
                value = state.get(m.name)
                if value is None:
                    continue
                ndim = value.dim() + (m.reduced is not None)
                position = m.axis_of(axis, ndim)
                if position is not None:
                    value.copy_(fn(value, position))

    def state_categories(self) -> dict[str, str]:
        """Memory category of every state key this rule may create (``"moments"`` for the
        declared moments, :attr:`extra_state`'s for the others)."""
        keys = [m.name for m in self.moments]
        if 8 in self.bits:
            keys += [k for m in self.moments for k in m.storage]
        return {**dict.fromkeys(keys, "moments"), **self.extra_state}

    def check_state(self, state: dict, group: dict, label: str | Callable[[], str]) -> None:
        """Raise ``ValueError`` if ``state`` cannot be stepped under ``group``'s settings
        (called for every parameter before a step changes anything): 8-bit moments need one
        scale per ``block_size`` elements."""
        if 8 in self.bits:
            lowbit.check_blocks(state, self.moments, group, label)
