"""Block-wise 8-bit (and 4-bit) quantisation of optimizer state (pure torch reference).

A tensor is split into blocks of ``block_size`` consecutive elements (flattened); each block
stores one fp32 ``absmax`` and one uint8 code per element indexing a 256-entry table of values
in [-1, 1] (signed) or [0, 1] (unsigned).  Dequantised value = ``table[code] * absmax``; a
value is quantised to the nearest table entry: its code is the number of the table's
midpoints below it (``torch.bucketize``), found through a lookup table on the float's top 16
bits (:func:`codes_of`, several times faster than a binary search on CPU, same codes).

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
Computation: :func:`quantize` and :func:`dequantize` (and the fused 8-bit Adam step,
:func:`lowrank_optim.kernels.reference.adam_update_8bit`, built from :func:`quantize_chunk`
and :func:`dequantize_chunk`) walk a tensor in chunks of whole blocks (:class:`Workspace`): on
CPU every pass over a chunk runs before the next chunk, on scratch that stays in cache and is
reused from call to call, instead of one pass over the whole tensor per operation with fresh
full-size temporaries.  Every operation is elementwise or per block, so the codes and scales
do not depend on the chunk size (``tests/test_8bit_speed_equivalence.py`` checks the bits
against the whole-tensor formulation).

This module is the specification: :func:`lowrank_optim.kernels.quantize_blockwise` /
:func:`~lowrank_optim.kernels.dequantize_blockwise` run it on the torch backend, and the
Triton kernels (:mod:`lowrank_optim.kernels.triton_quant`) read the same :func:`table` and
:func:`midpoints`.

4-bit codes (:func:`quantize_4bit` / :func:`dequantize_4bit`, ``bits=4`` of :func:`table`):
the same blocks, absmax and nearest-entry rule with 16-entry tables built by the same
construction (``"linear"``: ``k / 7`` for ``k = -7 .. 7`` and a duplicate 1 signed, ``k / 15``
unsigned; ``"dynamic"``: 3 decades signed, 4 unsigned), two codes per byte along the last axis
(:func:`packed_shape`), so a tensor costs ``numel / 2 + 4 * blocks`` bytes
(:func:`nbytes_4bit`).  They are plain torch ops (``torch.bucketize``, no lookup tables, no
Triton kernel) and run as they are on every device; quantised projector state (bases, error
feedback) uses them, the optimizer moments do not.  The 8-bit codes and their bits are not
affected by the 4-bit tables.

The low-bit optimizer-state layout built on these codes (which entries, which table, the
param-group keys) is :mod:`lowrank_optim.rules.lowbit`.  This module imports nothing from
the rest of the package.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from functools import cache

import torch

CODES = ("dynamic", "linear")
#: code widths: 8 bits (one code per byte, :func:`quantize`) and 4 bits (two codes per byte,
#: :func:`quantize_4bit`)
BITS = (8, 4)


@cache
def _table_cpu(code: str, signed: bool, bits: int = 8) -> torch.Tensor:
    if code == "linear":
        if signed:  # 2^bits - 1 symmetric levels incl. an exact 0, plus a duplicate 1
            half = 2 ** (bits - 1) - 1
            return torch.cat([torch.arange(-half, half + 1) / float(half),
                              torch.ones(1)]).double()
        return (torch.arange(2**bits) / float(2**bits - 1)).double()
    # dynamic: decade e holds 2**k levels (k growing with the decade size)
    decades = bits - 1 if signed else bits
    levels = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
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
def _device_table(code: str, signed: bool, device: torch.device, bits: int = 8) -> torch.Tensor:
    t = _table_cpu(code, signed, bits)
    assert t.numel() == 2**bits, t.numel()
    return t.float().to(device)


@cache
def _device_midpoints(code: str, signed: bool, device: torch.device,
                      bits: int = 8) -> torch.Tensor:
    values = _device_table(code, signed, device, bits)
    mids = (values[1:] + values[:-1]) / 2
    if not signed:  # no flush to zero: every positive value gets at least the first level
        mids[0] = 0.0
    return mids


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"Invalid bits={bits!r}: block-wise codes are {BITS[0]}-bit (one code "
                         f"per byte) or {BITS[1]}-bit (two codes per byte).")


def table(code: str, signed: bool, device: torch.device | str = "cpu",
          bits: int = 8) -> torch.Tensor:
    """The ``2**bits`` representable normalised values (sorted, fp32) of ``code``: 256 for
    the 8-bit codes, 16 for the 4-bit ones (:data:`BITS`).

    Cached per device and shared: do not modify the returned tensor.
    """
    if code not in CODES:
        raise ValueError(f"Invalid code={code!r}: choose one of {CODES}.")
    _check_bits(bits)
    return _device_table(code, signed, torch.device(device), bits)


def midpoints(code: str, signed: bool, device: torch.device | str = "cpu",
              bits: int = 8) -> torch.Tensor:
    """The ``2**bits - 1`` decision boundaries (fp32) between consecutive :func:`table`
    entries: a value ``x`` (normalised by its block's absmax) gets the code
    ``#{boundaries < x}``.  Shared.

    Boundaries are the midpoints of consecutive entries, except the first boundary of the
    unsigned table, which is 0: a positive value is never stored as zero but rounds up to the
    smallest positive level (see the module notes on second moments)."""
    table(code, signed, bits=bits)  # validates the name and the width
    return _device_midpoints(code, signed, torch.device(device), bits)


#: elements one CPU chunk holds (rounded down to whole blocks, at least one): the loops of
#: :func:`quantize`, :func:`dequantize` and the fused 8-bit Adam step
#: (:func:`lowrank_optim.kernels.reference.adam_update_8bit`) run every pass on one chunk
#: before the next, so their few fp32 / int32 temporaries of this length stay in the core's
#: cache and are reused; whole-tensor temporaries would each cost a pass through memory (and,
#: above a few tens of MB, fresh pages).  Other devices take the whole tensor as one chunk.
CHUNK_ELEMENTS = 1 << 18
#: the number of buckets of :func:`codes_of`: one per value of an fp32's top 16 bits
_BUCKETS = 1 << 16


@cache
def _bucket_lut(code: str, signed: bool, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(below, boundary)`` for :func:`codes_of`: 65536 entries each, indexed by an fp32's top
    16 bits read as an unsigned number (sign, exponent and 7 mantissa bits).

    The floats sharing those bits (a *bucket*) are an interval; ``below[u]`` (uint8) counts
    the midpoints below bucket ``u`` and ``boundary[u]`` (fp32) is the next midpoint
    (``+inf`` past the last), the only one that can lie inside the bucket: no bucket of
    [-1, 1] holds two midpoints (checked here).  Buckets past +-1 (also +-inf and NaN) take
    the entries of the bucket of +-1.
    """
    mids = _device_midpoints(code, signed, torch.device("cpu")).contiguous()
    tops = mids.view(torch.int32) >> 16
    assert bool((tops[1:] != tops[:-1]).all()), f"{code} table: two midpoints share a bucket"
    top = torch.arange(_BUCKETS, dtype=torch.int32)
    one = int(torch.tensor(1.0).view(torch.int32)) >> 16  # the bucket of 1.0 (0x3F80)
    sign = _BUCKETS // 2
    top = torch.where(top % sign > one, top - top % sign + one, top)  # past +-1: +-1's bucket
    # the lowest float of each bucket: low bits 0 for a positive one, all ones for a negative
    lowest = ((top << 16) | (top >= sign).int() * 0xFFFF).view(torch.float32)
    below = torch.searchsorted(mids, lowest)  # midpoints < lowest
    boundary = torch.cat([mids, torch.full((1,), math.inf)])[below]
    return below.to(torch.uint8).to(device), boundary.to(device)


def _codes_into(normed: torch.Tensor, out: torch.Tensor, code: str, signed: bool,
                index: torch.Tensor, boundary: torch.Tensor, above: torch.Tensor) -> None:
    """Write the codes of the contiguous fp32 ``normed`` into the uint8 ``out`` (same length);
    ``index`` (int32), ``boundary`` (fp32) and ``above`` (bool) are scratch of that length."""
    below, bounds = _bucket_lut(code, signed, normed.device)
    torch.bitwise_right_shift(normed.view(torch.int32), 16, out=index).bitwise_and_(0xFFFF)
    torch.index_select(below, 0, index, out=out)
    torch.gt(normed, torch.index_select(bounds, 0, index, out=boundary), out=above)
    out.add_(above.view(torch.uint8))  # bool as 0 / 1 bytes


def codes_of(normed: torch.Tensor, code: str, signed: bool) -> torch.Tensor:
    """int32 codes of fp32 values in [-1, 1]: ``torch.bucketize(normed, midpoints(...))``.

    One table lookup on the value's top 16 bits (its bucket) gives the number of midpoints
    below the bucket, one comparison with the only midpoint that can lie inside it finishes
    the count: several times faster than a binary search on CPU, same codes.
    """
    flat = normed.reshape(-1).contiguous()
    out = torch.empty(flat.shape, dtype=torch.uint8, device=flat.device)
    _codes_into(flat, out, code, signed, torch.empty(flat.shape, dtype=torch.int32,
                                                     device=flat.device),
                torch.empty_like(flat), torch.empty_like(out, dtype=torch.bool))
    return out.int().view(normed.shape)


def zero_code(code: str, signed: bool, bits: int = 8) -> int:
    """The code of 0.0 (every table holds an exact zero): what a zero-initialised moment is."""
    return int(torch.bucketize(torch.zeros(()), midpoints(code, signed, bits=bits)))


def num_blocks(numel: int, block_size: int) -> int:
    """Number of blocks (and absmax scales) of a tensor of ``numel`` elements."""
    return math.ceil(numel / block_size)


def _blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """``x`` flattened to fp32 and zero-padded to ``(num_blocks, block_size)``."""
    flat = x.reshape(-1).float()
    pad = num_blocks(flat.numel(), block_size) * block_size - flat.numel()
    return (torch.nn.functional.pad(flat, (0, pad)) if pad else flat).view(-1, block_size)


class _Buffers:
    """Scratch of one chunk of up to ``capacity`` elements (and as many blocks)."""

    def __init__(self, capacity: int, device: torch.device):
        def empty(dtype: torch.dtype) -> torch.Tensor:
            return torch.empty(capacity, dtype=dtype, device=device)

        self.capacity = capacity
        self.moments = [empty(torch.float32) for _ in range(2)]  # the values of two tensors
        self.index, self.boundary, self.above = (empty(torch.int32), empty(torch.float32),
                                                 empty(torch.bool))
        self.high, self.low, self.scale = (empty(torch.float32) for _ in range(3))


#: per thread: CPU scratch buffers not in use, reused by the next loop (fresh buffers would
#: cost fresh pages on every call)
_POOL = threading.local()


class Chunk:
    """Views of the scratch for one chunk: ``count`` elements in ``blocks`` blocks (fewer
    than ``blocks * block_size`` elements only for a tensor's last chunk)."""

    def __init__(self, buffers: _Buffers, count: int, blocks: int, block_size: int):
        padded = blocks * block_size
        self.count, self.blocks = count, blocks
        #: each tensor's values (the elements) and the same memory as zero-padded blocks
        self.values = [b[:count] for b in buffers.moments]
        self.rows = [b[:padded].view(blocks, block_size) for b in buffers.moments]
        self.padding = [b[count:padded] for b in buffers.moments] if count < padded else None
        self.index, self.boundary, self.above = (
            b[:count] for b in (buffers.index, buffers.boundary, buffers.above))
        self.high, self.low, self.scale = (b[:blocks] for b in (buffers.high, buffers.low,
                                                                 buffers.scale))
        self.scale_column = self.scale.view(blocks, 1)


class Workspace:
    """The chunks of a tensor of ``numel`` elements and scratch for one chunk at a time.

    On CPU a chunk is :data:`CHUNK_ELEMENTS` (whole blocks, at least one) and the scratch
    comes from a per-thread pool while the ``with`` block runs; on other devices the whole
    tensor is one chunk.  A chunk holds up to two tensors' values (:attr:`Chunk.values`).

    Parameters
    ----------
    numel, block_size
        Size of the tensor and its block length.
    device
        Where the scratch lives.
    """

    def __init__(self, numel: int, block_size: int, device: torch.device):
        self.numel, self.block_size, self.device = numel, block_size, device
        blocks = num_blocks(numel, block_size)
        per = max(1, CHUNK_ELEMENTS // block_size) if device.type == "cpu" else blocks
        self.blocks_per_chunk = max(1, min(per, blocks))
        self._buffers: _Buffers | None = None

    def __enter__(self) -> Workspace:
        size = self.blocks_per_chunk * self.block_size
        pool = getattr(_POOL, "free", None) if self.device.type == "cpu" else None
        if pool is None and self.device.type == "cpu":
            pool = _POOL.free = []
        fits = [b for b in pool or () if b.capacity >= size and b.index.device == self.device]
        if fits:
            pool.remove(fits[0])
        self._buffers = fits[0] if fits else _Buffers(size, self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cpu":
            _POOL.free.append(self._buffers)
        self._buffers = None

    def chunks(self) -> Iterator[tuple[slice, slice, Chunk]]:
        """``(elements, blocks, chunk)`` of each chunk in order: the slices of the tensor's
        elements (flat) and of its scales, and the chunk's scratch views."""
        assert self._buffers is not None, "use the workspace in a with block"
        size, per = self.block_size, self.blocks_per_chunk
        total = num_blocks(self.numel, size)
        views: dict[tuple[int, int], Chunk] = {}
        for first in range(0, total, per):
            last = min(first + per, total)
            elems = slice(first * size, min(last * size, self.numel))
            key = (elems.stop - elems.start, last - first)
            if key not in views:
                views[key] = Chunk(self._buffers, *key, size)
            yield elems, slice(first, last), views[key]


def dequantize_chunk(chunk: Chunk, slot: int, codes: torch.Tensor, absmax: torch.Tensor,
                     values: torch.Tensor) -> torch.Tensor:
    """``values[codes] * absmax`` of one chunk into ``chunk.values[slot]`` (returned).

    ``codes`` holds the chunk's elements (flat), ``absmax`` its blocks' scales and ``values``
    the :func:`table`.
    """
    torch.index_select(values, 0, chunk.index.copy_(codes), out=chunk.values[slot])
    if chunk.padding is not None:
        chunk.padding[slot].zero_()
    chunk.rows[slot].mul_(absmax.unsqueeze(1))
    return chunk.values[slot]


def quantize_chunk(chunk: Chunk, slot: int, code: str, signed: bool, codes: torch.Tensor,
                   absmax: torch.Tensor) -> None:
    """Quantise ``chunk.values[slot]`` into the uint8 ``codes`` (the chunk's elements,
    contiguous) and ``absmax`` (its blocks' scales).

    The values are the scratch of the computation: zero-padded to whole blocks and
    normalised in place.
    """
    if chunk.padding is not None:
        chunk.padding[slot].zero_()
    rows = chunk.rows[slot]
    high, low = torch.amax(rows, 1, out=chunk.high), torch.amin(rows, 1, out=chunk.low)
    absmax = torch.maximum(high, low.neg_(), out=absmax).abs_()  # abs: a zero block's is +0.0
    torch.clamp_min(absmax, torch.finfo(torch.float32).tiny, out=chunk.scale)
    rows.div_(chunk.scale_column)
    _codes_into(chunk.values[slot], codes, code, signed, chunk.index, chunk.boundary,
                chunk.above)


def writable(t: torch.Tensor, dtype: torch.dtype, keep: bool = False) -> torch.Tensor:
    """``t`` itself when it is contiguous of ``dtype`` (then written in place), else a
    contiguous tensor of ``dtype`` to copy into ``t`` afterwards (holding ``t``'s values
    when ``keep``)."""
    if t.dtype == dtype and t.is_contiguous():
        return t
    if keep:
        return t.to(dtype, memory_format=torch.contiguous_format, copy=True)
    return torch.empty(t.shape, dtype=dtype, device=t.device)


def quantize(
    x: torch.Tensor, block_size: int = 256, code: str = "dynamic", signed: bool = True,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes uint8 of x.shape, absmax fp32 of ceil(numel / block_size))``.

    The blocks are zero-padded (the last one), ``absmax`` is ``max |x|`` of each block and the
    codes those of ``x / absmax`` (:func:`codes_of`; a zero block divides by the smallest
    normal float instead of 0).  Computed chunk by chunk (:class:`Workspace`).

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
    if out is None:
        codes = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
        absmax = torch.empty(num_blocks(n, block_size), dtype=torch.float32, device=x.device)
    else:
        codes, absmax = writable(out[0], torch.uint8), writable(out[1], torch.float32)
    flat, flat_codes, flat_absmax = x.reshape(-1), codes.view(-1), absmax.view(-1)
    with Workspace(n, block_size, x.device) as work:
        for elems, blocks, chunk in work.chunks():
            chunk.values[0].copy_(flat[elems])  # in fp32
            quantize_chunk(chunk, 0, code, signed, flat_codes[elems], flat_absmax[blocks])
    if out is None:
        return codes, absmax
    for dest, result in zip(out, (codes, absmax), strict=True):
        if dest is not result:
            dest.copy_(result)
    return out


def dequantize(
    codes: torch.Tensor, absmax: torch.Tensor, block_size: int = 256, code: str = "dynamic",
    signed: bool = True, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """fp32 tensor of ``codes.shape``: ``table[code] * absmax`` (written into ``out`` when
    given).  Computed chunk by chunk (:class:`Workspace`)."""
    values = table(code, signed, codes.device)
    direct = (out is not None and out.dtype == torch.float32 and out.is_contiguous()
              and out.shape == codes.shape)
    result = out if direct else torch.empty(codes.shape, dtype=torch.float32,
                                            device=codes.device)
    flat_codes, flat_absmax, dest = codes.reshape(-1), absmax.reshape(-1), result.view(-1)
    with Workspace(codes.numel(), block_size, codes.device) as work:
        for elems, blocks, chunk in work.chunks():
            dest[elems].copy_(dequantize_chunk(chunk, 0, flat_codes[elems], flat_absmax[blocks],
                                               values))
    if out is None or direct:
        return result
    return out.copy_(result)


def error_bound(x: torch.Tensor, absmax_per_elem: torch.Tensor, code: str, signed: bool,
                bits: int = 8) -> torch.Tensor:
    """Per-element bound on ``|x - dequantize(quantize(x))|`` (``bits=4``: of
    :func:`dequantize_4bit` of :func:`quantize_4bit`): half the table gap around x (the whole
    first gap for positive values below the unsigned table's first level, which round up to
    it)."""
    values = table(code, signed, x.device, bits)
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


# -- 4-bit codes: two per byte -----------------------------------------------------------------
def packed_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the packed 4-bit codes of a tensor of ``shape`` (at least 1-D): the last axis
    holds two codes per byte, ``ceil(shape[-1] / 2)`` bytes per row."""
    dims = tuple(int(s) for s in shape)
    if not dims:
        raise ValueError("4-bit codes pack the last axis in pairs: quantise a tensor of at "
                         "least one dimension (reshape a scalar to (1,)).")
    return (*dims[:-1], math.ceil(dims[-1] / 2))


def nbytes_4bit(shape: torch.Size | tuple[int, ...], block_size: int) -> int:
    """Bytes of one 4-bit quantised tensor of ``shape``: packed codes + fp32 absmax
    (``numel / 2 + 4 * blocks`` when the last axis is even)."""
    return math.prod(packed_shape(shape)) + 4 * num_blocks(math.prod(shape), block_size)


def _pack(codes: torch.Tensor) -> torch.Tensor:
    """uint8 pairs of the 4-bit ``codes`` (integers < 16) along the last axis: element ``2j``
    in the low nibble, ``2j + 1`` in the high one (an odd axis is padded with code 0)."""
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    pairs = codes.reshape(*codes.shape[:-1], -1, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)


def _unpack(packed: torch.Tensor, last: int) -> torch.Tensor:
    """The uint8 4-bit codes of :func:`_pack`'s ``packed``, ``last`` of them per row."""
    pairs = torch.stack((packed & 0xF, packed >> 4), dim=-1)
    return pairs.reshape(*packed.shape[:-1], -1)[..., :last]


def quantize_4bit(
    x: torch.Tensor, block_size: int = 256, code: str = "dynamic", signed: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed codes uint8 of packed_shape(x.shape), absmax fp32 of ceil(numel /
    block_size))``: the 4-bit codes of ``x``.

    The same block-wise scheme as :func:`quantize` with a 16-entry table (:func:`table` with
    ``bits=4``: ``"linear"`` holds ``k / 7``, ``k = -7 .. 7``, and a duplicate 1; ``"dynamic"``
    three decades of 1, 2 and 4 levels): blocks of ``block_size`` consecutive elements of the
    flattened ``x`` (the last one zero-padded), ``absmax = max |x|`` per block, each element
    the nearest entry of ``x / absmax`` (``torch.bucketize`` on :func:`midpoints`).  Codes are
    packed two per byte along the last axis (:func:`packed_shape`), so the tensor costs
    :func:`nbytes_4bit` bytes.  Pure torch ops (any device); a meta tensor gives meta results of
    the right shapes without computing anything.

    Parameters
    ----------
    x
        Tensor of at least one dimension (any floating dtype; computed in fp32).
    block_size, code, signed
        Block length, table name (:data:`CODES`) and table sign.
    """
    mids = midpoints(code, signed, x.device, bits=4)
    shape, n = tuple(x.shape), x.numel()
    packed = packed_shape(shape)
    absmax = torch.empty(num_blocks(n, block_size), dtype=torch.float32, device=x.device)
    if x.is_meta:
        return torch.empty(packed, dtype=torch.uint8, device=x.device), absmax
    rows = _blocks(x, block_size)
    torch.amax(rows.abs(), 1, out=absmax)
    normed = rows / absmax.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
    codes = torch.bucketize(normed.view(-1)[:n], mids, out_int32=True).view(shape)
    return _pack(codes), absmax


def dequantize_4bit(
    packed: torch.Tensor, absmax: torch.Tensor, shape: torch.Size | tuple[int, ...],
    block_size: int = 256, code: str = "dynamic", signed: bool = True,
) -> torch.Tensor:
    """fp32 tensor of ``shape`` held by :func:`quantize_4bit`'s ``(packed, absmax)``:
    ``table[code] * absmax``.  Pure torch ops; meta in, meta out.

    Raises
    ------
    ValueError
        ``packed`` / ``absmax`` do not have the sizes of a tensor of ``shape`` in blocks of
        ``block_size`` (a state written with other settings).
    """
    values = table(code, signed, packed.device, bits=4)
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    if tuple(packed.shape) != packed_shape(shape) or absmax.numel() != num_blocks(n, block_size):
        raise ValueError(f"4-bit codes of shape {tuple(packed.shape)} with {absmax.numel()} "
                         f"scales do not hold a tensor of shape {shape} in blocks of "
                         f"{block_size} (expected codes {packed_shape(shape)} and "
                         f"{num_blocks(n, block_size)} scales).")
    if packed.is_meta:
        return torch.empty(shape, dtype=torch.float32, device=packed.device)
    codes = _unpack(packed, shape[-1])
    flat = torch.index_select(values, 0, codes.reshape(-1).int())
    return (_blocks(flat, block_size) * absmax.view(-1, 1)).view(-1)[:n].view(shape)
