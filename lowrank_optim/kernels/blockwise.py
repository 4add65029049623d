"""Block-wise 8-bit quantisation of optimizer moments (pure torch reference).

A tensor is split into blocks of ``block_size`` consecutive elements (flattened); each block
stores one fp32 ``absmax`` and one uint8 code per element indexing a 256-entry table of values
in [-1, 1] (signed) or [0, 1] (unsigned).  Dequantised value = ``table[code] * absmax``; a
value is quantised to the nearest table entry: its code is the number of the table's
midpoints below it (``torch.bucketize``), found through a lookup table on the float's bits
(:func:`codes_of`, several times faster than a binary search on CPU, same codes).

Two tables:

* ``"linear"``: evenly spaced.  Error bound ``|x - q(x)| <= absmax / 254`` (signed) or
  ``absmax / 510`` (unsigned): half a step (a whole step, ``absmax / 255``, for positive
  values below the unsigned table's first level: they round up, see below).
* ``"dynamic"``: decades ``10^-e`` (e = 0 .. 6 signed, 0 .. 7 unsigned), each split linearly,
  with more levels for the larger decades (the idea of Dettmers et al.'s dynamic tree
  quantisation, implemented from the description).  Relative error is bounded per decade, so
  small moments inside a block with one large entry keep their magnitude; the bound for each
  value is the half-gap of the table around it (:func:`error_bound`).

Second moments never flush to zero.  Adam divides by ``sqrt(V) + eps``: a second moment
stored as 0 while its first moment is not turns into a step of ``M / eps`` (with eps 1e-8, up
to 10^4 times Adam's normal step), and that is what happens to rows that get no gradient in a
step (e.g. embedding rows of tokens absent from the batch) when the rest of their block is
large: ``V`` decays below the table's range long before ``M`` does (``V`` spans the square of
``M``'s range).  So the first decision boundary of the unsigned table is 0 instead of a
midpoint: a positive value below the smallest level rounds *up* to it (a smaller step, never a
larger one), and only an exact zero is stored as zero.  Bound per element (what the tests
check): each stored moment is within :func:`error_bound` of its fp32 value, and a positive
second moment stays positive, so the 8-bit direction ``M' / (sqrt(V') + eps)`` lies between
the fp32 directions at the corners ``M -/+ e_M``, ``V +/- e_V`` of that box
(:func:`adam_direction_bounds`): it is finite and bounded by the moments, never by
``1 / eps``, and an element whose moments are zero gets exactly zero update.

Codes and scales are plain tensors (uint8 + fp32), so a quantised state is tensors only.
This module is the specification: :func:`lowrank_optim.kernels.quantize_blockwise` /
:func:`~lowrank_optim.kernels.dequantize_blockwise` run it on the torch backend, and the
Triton kernels (:mod:`lowrank_optim.kernels.triton_quant`) read the same :func:`table` and
:func:`midpoints`.

The low-bit optimizer-state layout built on these codes (which entries, which table, the
param-group keys) is :mod:`lowrank_optim.rules.lowbit`.  This module imports nothing from
the rest of the package.
"""

from __future__ import annotations

import math
from functools import cache

import torch

CODES = ("dynamic", "linear")


@cache
def _table_cpu(code: str, signed: bool) -> torch.Tensor:
    if code == "linear":
        if signed:  # 255 symmetric levels incl. an exact 0, plus a duplicate 1 (256 slots)
            return torch.cat([torch.arange(-127, 128) / 127.0, torch.ones(1)]).double()
        return (torch.arange(256) / 255.0).double()
    # dynamic: decade e holds 2**k levels (k growing with the decade size)
    decades = 7 if signed else 8
    levels = 127 if signed else 255
    pos: list[float] = []
    for i in range(decades):  # decade 10^-(decades-1-i) gets 2^i levels, the top the rest
        n = levels - len(pos) if i == decades - 1 else 2**i
        scale = 10.0 ** -(decades - 1 - i)
        pos += [scale * (0.1 + 0.9 * (j + 1) / n) for j in range(n)]
    pos_t = torch.tensor(sorted(pos), dtype=torch.float64)
    pos_t[-1] = 1.0
    if signed:
        values = torch.cat([-pos_t.flip(0), torch.zeros(1), pos_t, torch.ones(1)])
    else:
        values = torch.cat([torch.zeros(1), pos_t])
    return values


@cache
def _device_table(code: str, signed: bool, device: torch.device) -> torch.Tensor:
    t = _table_cpu(code, signed)
    assert t.numel() == 256, t.numel()
    return t.float().to(device)


@cache
def _device_midpoints(code: str, signed: bool, device: torch.device) -> torch.Tensor:
    values = _device_table(code, signed, device)
    mids = (values[1:] + values[:-1]) / 2
    if not signed:  # no flush to zero: every positive value gets at least the first level
        mids[0] = 0.0
    return mids


def table(code: str, signed: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256 representable normalised values (sorted, fp32) of ``code``.

    Cached per device and shared: do not modify the returned tensor.
    """
    if code not in CODES:
        raise ValueError(f"Invalid code={code!r}: choose one of {CODES}.")
    return _device_table(code, signed, torch.device(device))


def midpoints(code: str, signed: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 255 decision boundaries (fp32) between consecutive :func:`table` entries: a value
    ``x`` (normalised by its block's absmax) gets the code ``#{boundaries < x}``.  Shared.

    Boundaries are the midpoints of consecutive entries, except the first boundary of the
    unsigned table, which is 0: a positive value is never stored as zero but rounds up to the
    smallest positive level (see the module notes on second moments)."""
    table(code, signed)  # validates the name
    return _device_midpoints(code, signed, torch.device(device))


def _order_key(x: torch.Tensor) -> torch.Tensor:
    """int32 keys of fp32 ``x`` ordered like the floats (sign-magnitude -> two's complement)."""
    bits = x.view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@cache
def _bucket_lut(code: str, signed: bool, device: torch.device
                ) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """``(shift, offset, lut, midpoints + [inf])`` for :func:`codes_of`.

    The keys of [-1, 1] are cut into buckets of ``2**shift`` consecutive floats (the top
    exponent and mantissa bits), fine enough that no bucket holds two midpoints; ``lut[b]``
    counts the midpoints below bucket ``b``.
    """
    mids = _device_midpoints(code, signed, torch.device("cpu")).contiguous()
    keys = _order_key(mids)
    shift = next(s for s in range(16, -1, -1)
                 if bool(((keys[1:] >> s) > (keys[:-1] >> s)).all()))
    lo = int(_order_key(torch.tensor([-1.0]))[0]) >> shift
    hi = int(_order_key(torch.tensor([1.0]))[0]) >> shift
    first_keys = torch.arange(lo, hi + 1, dtype=torch.int64) << shift
    lut = torch.searchsorted(keys.long(), first_keys).to(torch.int32)
    padded = torch.cat([mids, torch.full((1,), math.inf)])
    return shift, lo, lut.to(device), padded.to(device)


def codes_of(normed: torch.Tensor, code: str, signed: bool) -> torch.Tensor:
    """int32 codes of fp32 values in [-1, 1]: ``torch.bucketize(normed, midpoints(...))``.

    One table lookup on the value's top bits gives the midpoints below its bucket; one
    comparison with the only midpoint that can share the bucket finishes the count.
    """
    shift, lo, lut, padded = _bucket_lut(code, signed, normed.device)
    flat = normed.reshape(-1)
    bucket = (_order_key(flat) >> shift).sub_(lo).clamp_(0, lut.numel() - 1)
    below = lut.index_select(0, bucket)
    return below.add_(flat > padded.index_select(0, below)).view(normed.shape)


def zero_code(code: str, signed: bool) -> int:
    """The code of 0.0 (every table holds an exact zero): what a zero-initialised moment is."""
    return int(torch.bucketize(torch.zeros(()), midpoints(code, signed)))


def num_blocks(numel: int, block_size: int) -> int:
    """Number of blocks (and absmax scales) of a tensor of ``numel`` elements."""
    return math.ceil(numel / block_size)


def _blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """``x`` flattened to fp32 and zero-padded to ``(num_blocks, block_size)``."""
    flat = x.reshape(-1).float()
    pad = num_blocks(flat.numel(), block_size) * block_size - flat.numel()
    return (torch.nn.functional.pad(flat, (0, pad)) if pad else flat).view(-1, block_size)


def quantize(
    x: torch.Tensor, block_size: int = 256, code: str = "dynamic", signed: bool = True,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes uint8 of x.shape, absmax fp32 of ceil(numel / block_size))``.

    Parameters
    ----------
    x
        Tensor to quantise (any floating dtype; computed in fp32).
    block_size, code, signed
        Block length, table name (:data:`CODES`) and table sign.
    out
        ``(codes, absmax)`` to write into in place (e.g. an optimizer's state); returned.
    """
    table(code, signed)  # validates the name
    n = x.numel()
    padded = _blocks(x, block_size)
    low, high = torch.aminmax(padded, dim=1)
    absmax = torch.maximum(high, low.neg_())
    normed = padded / absmax.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
    codes = codes_of(normed, code, signed).reshape(-1)[:n].view(x.shape)
    if out is None:  # uint8 and compact (not a view of the padded blocks)
        return codes.to(torch.uint8), absmax
    out[0].copy_(codes)  # int32 -> uint8 in the copy
    out[1].copy_(absmax)
    return out


def dequantize(
    codes: torch.Tensor, absmax: torch.Tensor, block_size: int = 256, code: str = "dynamic",
    signed: bool = True, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """fp32 tensor of ``codes.shape`` (written into ``out`` when given)."""
    values = table(code, signed, codes.device)
    n = codes.numel()
    blocks = absmax.numel()
    pad = blocks * block_size - n
    flat = values.index_select(0, codes.reshape(-1).int())
    flat = torch.nn.functional.pad(flat, (0, pad)) if pad else flat
    deq = (flat.view(blocks, block_size) * absmax.unsqueeze(1)).reshape(-1)[:n].view(codes.shape)
    if out is None:
        return deq
    return out.copy_(deq)


def error_bound(x: torch.Tensor, absmax_per_elem: torch.Tensor, code: str, signed: bool
                ) -> torch.Tensor:
    """Per-element bound on ``|x - dequantize(quantize(x))|``: half the table gap around x
    (the whole first gap for positive values below the unsigned table's first level, which
    round up to it)."""
    values = table(code, signed, x.device)
    normed = (x / absmax_per_elem.clamp_min(torch.finfo(torch.float32).tiny)).clamp(-1, 1)
    hi = torch.bucketize(normed, values).clamp(1, values.numel() - 1)
    gap = values[hi] - values[hi - 1]
    if not signed:
        gap = torch.where(hi == 1, gap * 2, gap)
    return gap / 2 * absmax_per_elem * (1 + 1e-5) + 1e-30


def adam_direction_bounds(
    m: torch.Tensor, v: torch.Tensor, grad: torch.Tensor, beta1: float, beta2: float,
    eps: float, block_size: int = 256, code: str = "dynamic", denom_correction: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The stated bound of the 8-bit Adam step: ``(low, high)`` per element.

    The step whose stored moments are the 8-bit round trips ``M'``, ``V'`` of the fp32
    moments ``m``, ``v`` computes ``N' = A / (sqrt(B) / c + eps)`` with ``A = beta1 M' +
    (1 - beta1) grad`` and ``B = beta2 V' + (1 - beta2) grad^2`` (``c = denom_correction``:
    ``sqrt(1 - beta2^t)`` for ``formula="torch"``, 1 otherwise); the fp32 step computes the
    same from ``m``, ``v``.  With ``|M' - m| <= e_M`` and ``|V' - v| <= e_V``
    (:func:`error_bound`) and ``V' >= min(v, first level)`` for ``v > 0`` (no flush to zero),
    both directions lie in ``[low, high]``: ``N`` is monotonic in ``A`` and in ``B``, so its
    extremes over the box are at its corners.
    """
    def per_element(x: torch.Tensor) -> torch.Tensor:
        absmax = _blocks(x, block_size).abs().amax(1)  # the scale quantize() stores
        return absmax.repeat_interleave(block_size)[: x.numel()].view(x.shape)

    m, v, grad = m.float(), v.float(), grad.float()
    absmax_v = per_element(v)
    # exact zeros are stored exactly (both tables hold 0)
    e_m = torch.where(m == 0, 0.0, error_bound(m, per_element(m), code, True))
    e_v = torch.where(v == 0, 0.0, error_bound(v, absmax_v, code, False))
    first_level = float(table(code, False)[1]) * absmax_v
    v_low = torch.where(v > 0, torch.maximum(v - e_v, torch.minimum(v, first_level)),
                        torch.zeros_like(v))

    def direction(mm: torch.Tensor, vv: torch.Tensor) -> torch.Tensor:
        a = beta1 * mm + (1 - beta1) * grad
        b = beta2 * vv + (1 - beta2) * grad * grad
        return a / (b.sqrt() / denom_correction + eps)

    corners = torch.stack([direction(mm, vv) for mm in (m - e_m, m + e_m)
                           for vv in (v_low, v + e_v)])
    return corners.amin(0), corners.amax(0)


def zeros(
    shape: torch.Size | tuple[int, ...], device: torch.device, block_size: int, code: str,
    signed: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, absmax)`` of an all-zero tensor of ``shape``: exactly ``nbytes`` allocated."""
    codes = torch.full(tuple(shape), zero_code(code, signed), dtype=torch.uint8, device=device)
    absmax = torch.zeros(num_blocks(codes.numel(), block_size), dtype=torch.float32,
                         device=device)
    return codes, absmax


def nbytes(numel: int, block_size: int) -> int:
    """Bytes of one quantised tensor: codes + fp32 absmax."""
    return numel + 4 * num_blocks(numel, block_size)
