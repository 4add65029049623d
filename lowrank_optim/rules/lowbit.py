"""Low-bit optimizer state: how a rule's moments are stored in 8 bits.

A moment ``name`` of a rule whose declared bit widths include 8 (:attr:`Rule.bits`) is stored,
when the param group asks for ``bits=8`` and the tensor has at least ``min_8bit_size`` elements,
as two state entries: ``name + "_codes"`` (uint8, the moment's shape) and ``name + "_absmax"``
(fp32, one per ``block_size`` elements), in the codes of :mod:`lowrank_optim.kernels.blockwise`.
Whether a moment uses the signed or the unsigned table is the rule's declaration
(:attr:`lowrank_optim.rules.Moment.signed`: second moments are unsigned).  The settings live in
the param group (:data:`DEFAULTS`, checked by :func:`check_settings`).  Rules use this module;
nothing else reads the storage keys.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from lowrank_optim import kernels
from lowrank_optim.kernels.blockwise import CODES, num_blocks, zeros
from lowrank_optim.validation import check_choice, check_int_at_least

if TYPE_CHECKING:
    from lowrank_optim.rules.base import Moment

#: state precisions a param group may ask for with its ``bits`` key
BITS = (8, 32)
#: group keys of low-bit optimizer state and their defaults (as in bitsandbytes: tensors with
#: fewer than ``min_8bit_size`` elements keep 32-bit state)
DEFAULTS: dict[str, Any] = {"bits": 32, "block_size": 256, "code": "dynamic",
                            "min_8bit_size": 4096}
#: suffixes of the two state entries that hold one quantised tensor
CODES_SUFFIX = "_codes"
ABSMAX_SUFFIX = "_absmax"

#: why 8-bit state cannot be stepped on FSDP2 row shards
FSDP2_REASON = ("low-bit optimizer state is quantised in blocks of the flattened moments, which "
                "row shards would cut differently; use 32-bit state (galore_adamw, dct_adamw) "
                "under FSDP2")


def storage_keys(name: str) -> tuple[str, str]:
    """The two state entries (codes, absmax) of the quantised moment ``name``."""
    return name + CODES_SUFFIX, name + ABSMAX_SUFFIX


def check_settings(group: dict) -> None:
    """Raise ``ValueError`` naming the key when a group's low-bit settings are invalid.

    Keys (absent ones take :data:`DEFAULTS`): ``bits`` in :data:`BITS`, ``block_size`` an
    integer >= 1, ``code`` in :data:`CODES`, ``min_8bit_size`` an integer >= 0.
    """
    bits, block_size, code, min_size = settings(group)
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"Invalid bits={bits!r}: choose 32 (full-precision state) or 8 "
                         "(block-wise quantised moments).")
    check_int_at_least("block_size", block_size, 1)
    check_choice("code", code, CODES)
    check_int_at_least("min_8bit_size", min_size, 0)


def settings(group: dict) -> tuple[int, int, str, int]:
    """``(bits, block_size, code, min_8bit_size)`` of a param group, defaults filled in."""
    return tuple(group.get(key, default) for key, default in DEFAULTS.items())  # type: ignore


def use_8bit(group: dict, numel: int) -> bool:
    """Whether a new state tensor of ``numel`` elements is quantised under ``group``'s keys."""
    bits, _, _, min_size = settings(group)
    return bits == 8 and numel >= min_size


def quantized(state: dict, moments: Iterable[Moment]) -> list[Moment]:
    """The declared ``moments`` that ``state`` holds in 8 bits (codes + absmax entries)."""
    return [m for m in moments if m.storage[0] in state and m.storage[1] in state]


def init(state: dict, moment: Moment, like: torch.Tensor, group: dict) -> None:
    """Zero codes and scales for ``moment`` of a gradient like ``like`` (see :func:`zeros`)."""
    _, block_size, code, _ = settings(group)
    codes, absmax = zeros(moment.shape(like), like.device, block_size, code, moment.signed)
    state.update(zip(moment.storage, (codes, absmax), strict=True))


def check_blocks(state: dict, moments: Iterable[Moment], group: dict,
                 label: str | Callable[[], str]) -> None:
    """Raise ``ValueError`` if a quantised moment's scales do not match ``block_size``."""
    _, block_size, _, _ = settings(group)
    for m in quantized(state, moments):
        codes, absmax = (state[k] for k in m.storage)
        if absmax.numel() != num_blocks(codes.numel(), block_size):
            label = label() if callable(label) else label
            raise ValueError(
                f"{label}: 8-bit state {m.name!r} has {absmax.numel()} blocks for "
                f"{codes.numel()} elements, which does not match block_size={block_size}: the "
                "state was created with another block_size; keep the block_size it was saved "
                "with.")


@contextmanager
def dequantized(state: dict, group: dict, moments: Iterable[Moment]) -> Iterator[dict]:
    """Show the quantised ``moments`` of ``state`` as fp32 tensors under their plain names.

    Inside the ``with`` block ``state[name]`` is the dequantised fp32 moment (for code that
    works on plain moments: a rule without a fused 8-bit kernel, or a subspace change mapping
    the moments); on exit each is requantised into its codes and scales and removed again.
    A state without quantised moments is left alone.  Uses the kernel dispatch (Triton on
    CUDA).
    """
    held = quantized(state, moments)
    if not held:
        yield state
        return
    _, block_size, code, _ = settings(group)
    for m in held:
        codes, absmax = (state[k] for k in m.storage)
        state[m.name] = kernels.dequantize_blockwise(codes, absmax, block_size, code, m.signed)
    try:
        yield state
    finally:
        for m in held:
            out = tuple(state[k] for k in m.storage)
            kernels.quantize_blockwise(state.pop(m.name), block_size, code, m.signed, out=out)

