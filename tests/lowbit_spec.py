"""An independent statement of the 8-bit codes, written from the documentation alone.

Nothing here calls :mod:`lowrank_optim`: the tables are built in numpy (float64) from the
construction the module docs describe, codes are the nearest table entry found by brute force,
and values are ``table[code] * absmax``.  Tests compare the library's tables, codes and
optimizer states with these (``tests/test_lowbit_spec.py``, ``tests/test_quant_kernels.py``).

The documented construction (``lowrank_optim/kernels/blockwise.py``, README "8-bit"):

* ``"linear"``: signed ``k / 127`` for ``k = -127 .. 127`` plus a duplicate ``1`` (256 slots);
  unsigned ``k / 255`` for ``k = 0 .. 255``.
* ``"dynamic"``: decades ``10^-e``, ``e = 0 .. 6`` (signed: 7 decades) or ``0 .. 7``
  (unsigned: 8 decades), counted from the smallest, the ``d``-th decade holds ``2^d`` levels
  and the top one the rest (127 positive levels signed, 255 unsigned); a decade of scale ``s``
  with ``n`` levels holds the upper ends of ``n`` equal steps across ``(0.1 s, s]``.  Signed:
  mirrored negatives, one zero, the positives, a duplicate ``1``.  Unsigned: zero, then the
  positives.
* A value is stored as the nearest entry of its block-normalised value (``x / absmax``,
  ``absmax = max |x|`` over the block of ``block_size`` consecutive elements); the unsigned
  tables never store a positive value as zero (it rounds up to the smallest level).
"""

from __future__ import annotations

import math

import numpy as np

#: levels per decade, smallest decade first (the docs: 2^d per decade, the top one the rest)
DECADE_LEVELS = {True: [1, 2, 4, 8, 16, 32, 64], False: [1, 2, 4, 8, 16, 32, 64, 128]}


def table(code: str, signed: bool) -> np.ndarray:
    """The 256 entries (float64, sorted) of ``code`` as documented."""
    if code == "linear":
        if signed:
            return np.append(np.arange(-127, 128) / 127.0, 1.0)
        return np.arange(256) / 255.0
    assert code == "dynamic", code
    counts = DECADE_LEVELS[signed]
    top = len(counts) - 1
    positives = []
    for d, n in enumerate(counts):
        scale = 10.0 ** (d - top)  # the top decade has scale 1
        positives += [scale * (0.1 + 0.9 * j / n) for j in range(1, n + 1)]
    pos = np.array(sorted(positives))
    assert len(pos) == (127 if signed else 255)
    if signed:
        return np.concatenate([-pos[::-1], [0.0], pos, [1.0]])
    return np.concatenate([[0.0], pos])


def absmax(x: np.ndarray, block: int) -> np.ndarray:
    """``max |x|`` of every block of ``block`` consecutive elements (the last one partial)."""
    flat = np.abs(np.asarray(x, dtype=np.float64).reshape(-1))
    return np.array([flat[i:i + block].max() for i in range(0, flat.size, block)])


def per_element(scales: np.ndarray, block: int, n: int) -> np.ndarray:
    """Each element's block scale, flattened."""
    return np.repeat(scales, block)[:n]


def quantize(x: np.ndarray, block: int, code: str, signed: bool
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(codes, absmax, near_tie)`` of ``x`` (flattened): codes by brute-force nearest entry
    (the lower one on an exact tie), ``near_tie`` marks values within float32 rounding of the
    half-way point between two entries, where an fp32 implementation may pick either."""
    flat = np.asarray(x, dtype=np.float64).reshape(-1)
    scales = absmax(flat, block)
    scale = per_element(scales, block, flat.size)
    normed = flat / np.where(scale > 0, scale, 1.0)
    values = table(code, signed)
    dist = np.abs(normed[:, None] - values[None, :])
    codes = dist.argmin(1)
    ordered = np.sort(dist, 1)
    near_tie = (ordered[:, 1] - ordered[:, 0]) <= 1e-6 * np.maximum(np.abs(normed), 1e-30)
    if not signed:  # no flush to zero: a positive value gets at least the first level
        codes = np.where((normed > 0) & (codes == 0), 1, codes)
    return codes, scales, near_tie


def dequantize(codes: np.ndarray, scales: np.ndarray, block: int, code: str,
               signed: bool) -> np.ndarray:
    """``table[code] * absmax`` (float64, flattened)."""
    codes = np.asarray(codes).reshape(-1).astype(np.int64)
    return table(code, signed)[codes] * per_element(np.asarray(scales, np.float64), block,
                                                    codes.size)


def bound(x: np.ndarray, scales: np.ndarray, block: int, code: str, signed: bool
          ) -> np.ndarray:
    """How far the stored value of ``x`` may lie from ``x``: half the gap between the table
    entries around ``x / absmax`` (the whole first gap below the unsigned table's first level),
    in ``x``'s units, plus float32 rounding."""
    flat = np.asarray(x, dtype=np.float64).reshape(-1)
    scale = per_element(np.asarray(scales, np.float64), block, flat.size)
    normed = np.clip(flat / np.where(scale > 0, scale, 1.0), -1.0, 1.0)
    values = np.unique(table(code, signed))
    hi = np.clip(np.searchsorted(values, normed), 1, values.size - 1)
    gap = values[hi] - values[hi - 1]
    if not signed:
        gap = np.where(hi == 1, 2 * gap, gap)
    return gap / 2 * scale + 1e-6 * np.abs(flat) + 1e-30


def decade_histogram(values: np.ndarray) -> dict[int, int]:
    """Number of positive entries in each decade ``(10^(k-1), 10^k]``, keyed by ``k``."""
    out: dict[int, int] = {}
    for v in np.asarray(values, dtype=np.float64):
        if v > 0:
            k = math.ceil(math.log10(v) - 1e-6)
            out[k] = out.get(k, 0) + 1
    return dict(sorted(out.items()))
