"""Low-bit storage of a projector's float state: SVD bases (``proj_bits``, the Q-GaLore idea,
Zhang et al., 2024, arXiv:2407.08296) and DCT error-feedback residuals
(``error_feedback_bits``, as the reference DCT-AdamW offers).

A tensor ``name`` kept at 8 or 4 bits is two state entries, ``name + "_codes"`` (uint8) and
``name + "_absmax"`` (fp32, one scale per ``block_size`` consecutive elements of the flattened
tensor), in the block-wise codes of :mod:`lowrank_optim.kernels.blockwise` with the signed
``"linear"`` table (:data:`CODE`: bases and residuals are spread evenly around zero, where the
evenly spaced levels give the smaller error; on Gaussian blocks of 256 the relative RMS error
is 0.7% at 8 bits and 12.6% at 4 bits, against 1.1% and 17% for ``"dynamic"``):

* 8 bits: one code per element, codes of the tensor's shape, ``numel + 4 * blocks`` bytes;
* 4 bits: two codes per byte along the last axis
  (:func:`~lowrank_optim.kernels.blockwise.packed_shape`), ``numel / 2 + 4 * blocks`` bytes
  (last axis even).

32 bits is the projectors' own path: the plain tensor under ``name``, untouched by this module.
Reading (:func:`load`) dequantises into a transient fp32 tensor; the state keeps only the
codes.  Every operation is a kernel dispatch (:func:`lowrank_optim.kernels.quantize_blockwise`,
``*_4bit``), so meta tensors (the analytic profiler) give meta codes of the right sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lowrank_optim import kernels
from lowrank_optim.kernels.blockwise import nbytes as nbytes_8bit
from lowrank_optim.kernels.blockwise import nbytes_4bit, num_blocks, packed_shape
from lowrank_optim.rules.lowbit import storage_keys

#: precisions a projector's float state may be kept in (32: plain tensors)
BITS = (32, 8, 4)
#: the block-wise table of quantised projector state (signed)
CODE = "linear"


@dataclass(frozen=True)
class Precision:
    """How one kind of projector state is stored, and the group keys that say so.

    Attributes
    ----------
    bits
        32 (plain), 8 or 4.
    block_size
        Elements per fp32 scale.
    bits_key, block_key
        The group keys of ``bits`` and ``block_size`` (``block_key`` ``None`` when the block
        size is fixed), named in error messages.
    """

    bits: int
    block_size: int
    bits_key: str
    block_key: str | None = None


def check_bits(name: str, value: object) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is one of :data:`BITS`."""
    if isinstance(value, bool) or not isinstance(value, int) or value not in BITS:
        raise ValueError(f"Invalid {name}={value!r}: choose 32 (full precision, the default), 8 "
                         "or 4 (block-wise quantised codes, about 1/4 or 1/8 of the fp32 bytes).")


def categories(name: str, category: str) -> dict[str, str]:
    """The memory category of ``name`` and of its two quantised entries."""
    return dict.fromkeys((name, *storage_keys(name)), category)


def holds(state: dict, name: str) -> bool:
    """Whether ``state`` holds ``name``, plain or quantised."""
    return name in state or storage_keys(name)[0] in state


def drop(state: dict, name: str) -> None:
    """Remove the quantised entries of ``name`` (before a plain tensor replaces them)."""
    for key in storage_keys(name):
        state.pop(key, None)


def store(state: dict, name: str, value: torch.Tensor, precision: Precision) -> None:
    """Quantise ``value`` (8 or 4 bits) into new entries ``name + "_codes"`` / ``"_absmax"`` of
    ``state`` and remove a plain ``name``.  New tensors, not written in place, so views of the
    old state (subspace overlap tracking) keep the old values."""
    if precision.bits == 8:
        codes, absmax = kernels.quantize_blockwise(value, precision.block_size, CODE, True)
    elif precision.bits == 4:
        codes, absmax = kernels.quantize_blockwise_4bit(value, precision.block_size, CODE, True)
    else:
        raise ValueError(f"store() quantises to 8 or 4 bits, not {precision.bits}")
    state.pop(name, None)
    state.update(zip(storage_keys(name), (codes, absmax), strict=True))


def problem(state: dict, name: str, shape: tuple[int, ...], precision: Precision) -> str | None:
    """Why the quantised ``name`` in ``state`` cannot hold a tensor of ``shape`` under
    ``precision`` (other bits, block size or shape than it was written with), or None."""
    codes, absmax = (state[k] for k in storage_keys(name))
    bits, block = precision.bits, precision.block_size
    if bits == 32:
        return (f"{name!r} is stored quantised but {precision.bits_key}=32; keep the "
                f"{precision.bits_key} the state was created with (8 or 4)")
    want = tuple(shape) if bits == 8 else packed_shape(shape)
    blocks = num_blocks(math.prod(shape), block)
    if tuple(codes.shape) == want and absmax.numel() == blocks:
        return None
    keys = precision.bits_key + (f" / {precision.block_key}" if precision.block_key else "")
    return (f"quantised {name!r} has codes {tuple(codes.shape)} and {absmax.numel()} scales, "
            f"not those of a {tuple(shape)} tensor at {bits} bits in blocks of {block} "
            f"(codes {want}, {blocks} scales): the state was created with other settings; keep "
            f"the {keys} (and rank) it was saved with")


def load(state: dict, name: str, shape: tuple[int, ...],
         precision: Precision) -> torch.Tensor | None:
    """``name`` of ``state``: the plain tensor as stored, the fp32 dequantisation of its codes
    (a transient tensor of ``shape``), or ``None`` when absent.

    Raises
    ------
    ValueError
        The codes do not fit ``shape`` / ``precision`` (:func:`problem`).
    """
    if name in state:
        return state[name]
    codes_key, absmax_key = storage_keys(name)
    if codes_key not in state:
        return None
    why = problem(state, name, shape, precision)
    if why is not None:
        raise ValueError(f"Cannot read the optimizer state: {why}.")
    codes, absmax = state[codes_key], state[absmax_key]
    if precision.bits == 8:
        return kernels.dequantize_blockwise(codes, absmax, precision.block_size, CODE, True)
    return kernels.dequantize_blockwise_4bit(codes, absmax, shape, precision.block_size, CODE,
                                             True)


def nbytes(shape: tuple[int, ...], bits: int, block_size: int, element_size: int = 4) -> int:
    """State bytes of one tensor of ``shape``: ``numel * element_size`` at 32 bits, codes plus
    fp32 scales at 8 or 4 bits."""
    if bits == 32:
        return math.prod(shape) * element_size
    if bits == 8:
        return nbytes_8bit(math.prod(shape), block_size)
    return nbytes_4bit(shape, block_size)
