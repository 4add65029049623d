"""Block-wise 8-bit quantisation: documented error bounds, exact sizes, edge cases."""

import pytest
import torch

from lowrank_optim.kernels import blockwise as q

BLOCK = 64


def _data(kind: str, signed: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 37, generator=g)
    if kind == "heavy_tailed":  # Student-t with 1.5 dof: a few huge entries per block
        x = torch.distributions.StudentT(1.5).sample((300, 37))
    if kind == "adam_v":  # squared gradients spanning many decades
        x = (torch.randn(300, 37, generator=g) * torch.logspace(-4, 0, 37)) ** 2
    return x if signed else x.abs()


@pytest.mark.parametrize("code", q.CODES)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("kind", ["gaussian", "heavy_tailed", "adam_v"])
def test_roundtrip_error_within_documented_bound(code, signed, kind):
    x = _data(kind, signed)
    codes, absmax = q.quantize(x, BLOCK, code, signed)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    y = q.dequantize(codes, absmax, BLOCK, code, signed)
    per_elem = absmax.repeat_interleave(BLOCK)[: x.numel()].view(x.shape)
    bound = q.error_bound(x, per_elem, code, signed)
    assert torch.all((x - y).abs() <= bound)
    if code == "linear":  # half a step; a whole one below the unsigned table's first level
        step = 1 / 127 if signed else 1 / 255
        half = torch.full_like(x, step / 2)
        if not signed:
            half[x < per_elem * step] = step
        assert torch.all((x - y).abs() <= per_elem * half * 1.0001)
    # the block maximum is always exact
    assert torch.allclose(y.abs().reshape(-1)[: x.numel()].max(), x.abs().max())


def test_dynamic_code_keeps_small_values_that_linear_flushes_to_zero():
    x = torch.tensor([1.0] + [1e-3] * 63)
    for code, expect_zero in (("linear", True), ("dynamic", False)):
        y = q.dequantize(*q.quantize(x, BLOCK, code), BLOCK, code)
        assert (y[1:] == 0).all() == expect_zero
    y = q.dequantize(*q.quantize(x, BLOCK, "dynamic"), BLOCK, "dynamic")
    assert torch.allclose(y[1:], x[1:], rtol=0.1)


def test_zero_block_and_padding():
    x = torch.zeros(100)
    x[70:] = torch.linspace(-2, 2, 30)
    y = q.dequantize(*q.quantize(x, BLOCK), BLOCK)
    assert torch.equal(y[:64], torch.zeros(64))
    assert torch.allclose(y, x, atol=2 * 0.9 / 64)


def test_nbytes_is_codes_plus_scales():
    codes, absmax = q.quantize(torch.randn(1000), 256)
    real = codes.numel() * codes.element_size() + absmax.numel() * absmax.element_size()
    assert q.nbytes(1000, 256) == real == 1000 + 4 * 4


def test_bad_code_name():
    with pytest.raises(ValueError, match="code='fp8'"):
        q.quantize(torch.randn(4), 4, "fp8")


@pytest.mark.parametrize("code", q.CODES)
@pytest.mark.parametrize("signed", [True, False])
def test_lookup_codes_equal_bucketize_on_the_midpoints(code, signed):
    """The bit-bucket lookup of quantize() gives torch.bucketize's codes, ties and edges
    included (values on, just above and just below every midpoint; table values; +-0, +-1)."""
    mids, values = q.midpoints(code, signed), q.table(code, signed)
    g = torch.Generator().manual_seed(0)
    uniform = torch.rand(1 << 16, generator=g)
    heavy = torch.randn(1 << 14, generator=g) ** 7
    cases = [uniform * 2 - 1 if signed else uniform, heavy.clamp(-1 if signed else 0, 1),
             mids, values, torch.nextafter(mids, torch.tensor(2.0)),
             torch.nextafter(mids, torch.tensor(-2.0)),
             torch.tensor([0.0, -0.0, 1.0, 1e-30, 1e-45, -1e-45, -1.0, 0.5]).clamp_min(
                 -1 if signed else 0)]
    for x in cases:
        x = x.float().contiguous()
        want = torch.bucketize(x, mids, out_int32=True)
        assert torch.equal(q.codes_of(x, code, signed), want)
        assert torch.equal(q.codes_of(x.view(-1, 1), code, signed), want.view(-1, 1))
