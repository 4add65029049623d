"""Block-wise 8-bit quantisation of optimizer moments (pure torch reference).

A tensor is split into blocks of ``block_size`` consecutive elements (flattened); each block
stores one fp32 ``absmax`` and one uint8 code per element indexing a 256-entry table of values
in [-1, 1] (signed) or [0, 1] (unsigned).  Dequantised value = ``table[code] * absmax``.

Two tables:

* ``"linear"``: evenly spaced.  Error bound ``|x - q(x)| <= absmax / 254`` (signed) or
  ``absmax / 510`` (unsigned): half a step.
* ``"dynamic"``: decades ``10^-e`` (e = 0 .. 6 signed, 0 .. 7 unsigned), each split linearly,
  with more levels for the larger decades (the idea of Dettmers et al.'s dynamic tree
  quantisation, implemented from the description).  Relative error is bounded per decade, so
  small moments inside a block with one large entry keep their magnitude; the bound for each
  value is the half-gap of the table around it (:func:`error_bound`).

Codes and scales are plain tensors (uint8 + fp32), so a quantised state is tensors only.
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


def table(code: str, signed: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256 representable normalised values (sorted, fp32) of ``code``."""
    if code not in CODES:
        raise ValueError(f"Invalid code={code!r}: choose one of {CODES}.")
    t = _table_cpu(code, signed)
    assert t.numel() == 256, t.numel()
    return t.float().to(device)


def _midpoints(values: torch.Tensor) -> torch.Tensor:
    return (values[1:] + values[:-1]) / 2


def quantize(
    x: torch.Tensor, block_size: int = 256, code: str = "dynamic", signed: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes uint8 of x.shape, absmax fp32 of ceil(numel / block_size))``."""
    values = table(code, signed, x.device)
    flat = x.reshape(-1).float()
    n = flat.numel()
    blocks = math.ceil(n / block_size)
    padded = torch.nn.functional.pad(flat, (0, blocks * block_size - n)).view(blocks, block_size)
    absmax = padded.abs().amax(dim=1)
    normed = padded / absmax.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
    codes = torch.bucketize(normed, _midpoints(values)).to(torch.uint8)
    return codes.reshape(-1)[:n].view(x.shape), absmax


def dequantize(
    codes: torch.Tensor, absmax: torch.Tensor, block_size: int = 256, code: str = "dynamic",
    signed: bool = True, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """fp32 tensor of ``codes.shape`` (written into ``out`` when given)."""
    values = table(code, signed, codes.device)
    n = codes.numel()
    blocks = absmax.numel()
    flat = torch.nn.functional.pad(values[codes.reshape(-1).long()], (0, blocks * block_size - n))
    deq = (flat.view(blocks, block_size) * absmax.unsqueeze(1)).reshape(-1)[:n].view(codes.shape)
    if out is None:
        return deq
    return out.copy_(deq)


def error_bound(x: torch.Tensor, absmax_per_elem: torch.Tensor, code: str, signed: bool
                ) -> torch.Tensor:
    """Per-element bound on ``|x - dequantize(quantize(x))|``: half the table gap around x."""
    values = table(code, signed, x.device)
    normed = (x / absmax_per_elem.clamp_min(torch.finfo(torch.float32).tiny)).clamp(-1, 1)
    hi = torch.bucketize(normed, values).clamp(1, values.numel() - 1)
    gap = values[hi] - values[hi - 1]
    return gap / 2 * absmax_per_elem * (1 + 1e-5) + 1e-30


def nbytes(numel: int, block_size: int) -> int:
    """Bytes of one quantised tensor: codes + fp32 absmax."""
    return numel + 4 * math.ceil(numel / block_size)
