"""The chunked 8-bit path computes, bit for bit, what the whole-tensor formulation computed.

``blockwise.quantize`` / ``dequantize`` and ``reference.adam_update_8bit`` walk a tensor in
chunks of whole blocks with reused scratch, find codes through a lookup table on an fp32's top
16 bits and take a block's scale from ``amax`` / ``amin``.  Below is a frozen copy of the
formulation they replaced (one pass over the whole tensor per operation, codes through an
order-preserving integer key, scales from ``torch.aminmax``, Adam through
``reference.adam_update`` as it was); the tests compare codes, scales and directions bit for
bit over many inputs, chunk sizes, block sizes, codes and dtypes.

One documented difference: the scale of an all-zero block is now always ``+0.0``.  The old
``torch.maximum(high, -low)`` returned ``-0.0`` or ``+0.0`` for such a block depending on
where the block fell in torch's vector loop (its scalar tail keeps the first argument, its
vector body the second), i.e. on the tensor's length and the thread count; both are the
value zero, dequantise to zero and give the same codes.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from lowrank_optim import kernels
from lowrank_optim.kernels import blockwise as q
from lowrank_optim.kernels import reference


# -- the frozen whole-tensor formulation (lowrank_optim before the chunked path) ---------------
def _old_order_key(x: torch.Tensor) -> torch.Tensor:
    bits = x.view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _old_bucket_lut(code: str, signed: bool) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    mids = q.midpoints(code, signed).contiguous()
    keys = _old_order_key(mids)
    shift = next(s for s in range(16, -1, -1)
                 if bool(((keys[1:] >> s) > (keys[:-1] >> s)).all()))
    lo = int(_old_order_key(torch.tensor([-1.0]))[0]) >> shift
    hi = int(_old_order_key(torch.tensor([1.0]))[0]) >> shift
    first_keys = torch.arange(lo, hi + 1, dtype=torch.int64) << shift
    lut = torch.searchsorted(keys.long(), first_keys).to(torch.int32)
    return shift, lo, lut, torch.cat([mids, torch.full((1,), math.inf)])


def old_codes_of(normed: torch.Tensor, code: str, signed: bool) -> torch.Tensor:
    shift, lo, lut, padded = _old_bucket_lut(code, signed)
    flat = normed.reshape(-1)
    bucket = (_old_order_key(flat) >> shift).sub_(lo).clamp_(0, lut.numel() - 1)
    below = lut.index_select(0, bucket)
    return below.add_(flat > padded.index_select(0, below)).view(normed.shape)


def old_quantize(x: torch.Tensor, block_size: int, code: str, signed: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.numel()
    flat = x.reshape(-1).float()
    pad = q.num_blocks(n, block_size) * block_size - n
    padded = (torch.nn.functional.pad(flat, (0, pad)) if pad else flat).view(-1, block_size)
    low, high = torch.aminmax(padded, dim=1)
    absmax = torch.maximum(high, low.neg_())
    normed = padded / absmax.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
    codes = old_codes_of(normed, code, signed).reshape(-1)[:n].view(x.shape)
    return codes.to(torch.uint8), absmax


def old_dequantize(codes: torch.Tensor, absmax: torch.Tensor, block_size: int, code: str,
                   signed: bool) -> torch.Tensor:
    values = q.table(code, signed)
    n, blocks = codes.numel(), absmax.numel()
    flat = values.index_select(0, codes.reshape(-1).int())
    flat = torch.nn.functional.pad(flat, (0, blocks * block_size - n))
    return (flat.view(blocks, block_size) * absmax.unsqueeze(1)).reshape(-1)[:n].view(
        codes.shape)


def old_adam_update_8bit(grad: torch.Tensor, state: list[torch.Tensor], beta1: float,
                         beta2: float, eps: float, formula: str, bias_correction2: float,
                         block_size: int, code: str) -> torch.Tensor:
    """The old composition (and the old ``reference.adam_update``), ``state`` updated."""
    m = old_dequantize(state[0], state[1], block_size, code, True)
    v = old_dequantize(state[2], state[3], block_size, code, False)
    m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    if formula == "torch":
        denom = (v.sqrt() / math.sqrt(bias_correction2)).add_(eps)
    else:
        denom = v.sqrt().add_(eps)
    direction = torch.div(m, denom, out=denom)
    state[:2] = old_quantize(m, block_size, code, True)
    state[2:] = old_quantize(v, block_size, code, False)
    return direction.to(grad.dtype)


# -- comparisons ---------------------------------------------------------------------------------
def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor (int view), the tensor itself otherwise."""
    views = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float64: torch.int64}
    return t.view(views[t.dtype]) if t.dtype in views else t


def assert_bit_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(bits(got), bits(want))


def assert_scales_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    """Bit for bit, except that a zero scale is +0.0 (the old sign was position-dependent)."""
    assert got.dtype == want.dtype == torch.float32 and got.shape == want.shape
    zero = want == 0
    assert torch.equal(bits(got)[~zero], bits(want)[~zero])
    assert torch.equal(bits(got)[zero], torch.zeros_like(bits(got)[zero]))


def moments_like(n: int, seed: int, signed: bool) -> torch.Tensor:
    """Values over many decades with exact zeros (runs longer than a block too), tiny and
    huge magnitudes, subnormals, infinities and ties of magnitude; no NaN."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.logspace(-30, 30, 61)[
        torch.randint(0, 61, (n,), generator=g)]
    x[torch.rand(n, generator=g) < 0.1] = 0.0
    start = int(torch.randint(0, max(1, n - 1), (1,), generator=g))
    x[start:start + 600] = 0.0  # whole zero blocks (for blocks up to 600)
    special = torch.tensor([1e-45, -1e-45, 1e-40, -1e-38, 3.4e38, -3.4e38, math.inf, -math.inf,
                            1.0, -1.0, 0.5, -0.5, 1e-30, 2.0, -2.0])
    picks = torch.randint(0, n, (min(n, 64),), generator=g)
    x[picks] = special[torch.randint(0, special.numel(), (picks.numel(),), generator=g)]
    return x if signed else x.abs()


@pytest.fixture(params=[None, 1, 3], ids=["chunk-default", "chunk-1-block", "chunk-3-blocks"])
def chunk_blocks(request, monkeypatch):
    """Set per test from its block size: chunks of the default size (returns the sizes to
    test beyond it), or of 1 or 3 blocks of at least 512 elements (returns none)."""
    def set_for(block_size: int) -> tuple[int, ...]:
        if request.param is None:
            return (q.CHUNK_ELEMENTS + 1, 2 * q.CHUNK_ELEMENTS + 3 * block_size + 1)
        monkeypatch.setattr(q, "CHUNK_ELEMENTS", request.param * max(block_size, 512))
        return ()
    return set_for


# -- the code lookup -----------------------------------------------------------------------------
@pytest.mark.parametrize("code", q.CODES)
@pytest.mark.parametrize("signed", [True, False])
def test_top_bits_lookup_equals_the_order_key_lookup_on_every_kind_of_float(code, signed):
    """Same codes for random bit patterns (any float: NaN, inf, subnormal, outside [-1, 1]),
    the first, middle and last float of every one of the 65536 buckets, and the midpoints,
    table values and their neighbours."""
    g = torch.Generator().manual_seed(0)
    random_bits = torch.randint(-2**31, 2**31 - 1, (1 << 20,), dtype=torch.int32, generator=g)
    top = torch.arange(1 << 16, dtype=torch.int32) << 16
    edges = torch.cat([top, top | 0x7FFF, top | 0x8000, top | 0xFFFF])
    mids, values = q.midpoints(code, signed), q.table(code, signed)
    near = torch.cat([mids, values, *(torch.nextafter(t, torch.tensor(d)) for t in (mids, values)
                                      for d in (2.0, -2.0))])
    for x in (random_bits.view(torch.float32), edges.view(torch.float32), near):
        assert torch.equal(q.codes_of(x, code, signed), old_codes_of(x, code, signed))


# -- quantize / dequantize -----------------------------------------------------------------------
@pytest.mark.parametrize("code", q.CODES)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("block_size", [1, 7, 64, 256, 2048])
def test_quantize_and_dequantize_equal_the_whole_tensor_formulation(code, signed, block_size,
                                                                    chunk_blocks):
    beyond = chunk_blocks(block_size)
    for seed, n in enumerate((1, block_size, 3 * block_size + 1, 5000, 20011, *beyond)):
        x = moments_like(n, seed, signed)
        for dtype in (torch.float32, torch.bfloat16):
            xd = x.to(dtype)
            codes, absmax = q.quantize(xd, block_size, code, signed)
            want_codes, want_absmax = old_quantize(xd, block_size, code, signed)
            assert_bit_equal(codes, want_codes)
            assert_scales_equal(absmax, want_absmax)
            assert_bit_equal(q.dequantize(codes, absmax, block_size, code, signed),
                             old_dequantize(codes, absmax, block_size, code, signed))
            # into existing state, in place
            out = q.zeros(x.shape, x.device, block_size, code, signed)
            ptrs = [t.data_ptr() for t in out]
            got = q.quantize(xd, block_size, code, signed, out=out)
            assert got is out and [t.data_ptr() for t in out] == ptrs
            assert_bit_equal(out[0], want_codes)
            assert_scales_equal(out[1], want_absmax)


def test_non_contiguous_and_other_dtype_outputs_get_the_same_values():
    x = moments_like(64 * 40, 3, True).view(40, 64)
    codes, absmax = q.quantize(x.t(), 64)  # a non-contiguous input
    assert_bit_equal(codes, old_quantize(x.t(), 64, "dynamic", True)[0])
    out_codes = torch.empty(40, 64, dtype=torch.uint8).t()
    out_absmax = torch.empty(80, dtype=torch.float32)[::2]
    q.quantize(x.t(), 64, out=(out_codes, out_absmax))
    assert torch.equal(out_codes, codes) and torch.equal(out_absmax, absmax)
    deq = q.dequantize(codes, absmax, 64)
    for out in (torch.empty(64, 40, dtype=torch.float64), torch.empty(40, 64).t()):
        assert q.dequantize(codes, absmax, 64, out=out) is out
        assert_bit_equal(out, deq.to(out.dtype))


# -- the fused Adam step -------------------------------------------------------------------------
@pytest.mark.parametrize("code", q.CODES)
@pytest.mark.parametrize("block_size", [7, 64, 256, 2048])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("formula", ["galore", "torch"])
def test_adam_8bit_equals_the_whole_tensor_composition(code, block_size, dtype, formula,
                                                       chunk_blocks):
    """Three steps from a non-zero state: direction, codes and scales bit for bit."""
    beyond = chunk_blocks(block_size)
    for seed, shape in enumerate(((1,), (3, block_size), (41, 129), *((n,) for n in beyond))):
        n = math.prod(shape)
        g = torch.Generator().manual_seed(seed)
        m0 = (torch.randn(n, generator=g) * torch.logspace(-9, -1, n)).view(shape)
        m0.view(-1)[: n // 3] = 0.0  # zero blocks: scales 0, and zero moments in live blocks
        v0 = m0.square() * torch.rand(shape, generator=g) * 4
        state = [*q.quantize(m0, block_size, code, True), *q.quantize(v0, block_size, code,
                                                                       False)]
        old_state = [t.clone() for t in state]
        for step in range(3):
            grad = (torch.randn(shape, generator=g) * 10.0 ** -(step + 2)).to(dtype)
            grad.view(-1)[torch.rand(n, generator=g) < 0.2] = 0.0
            got = reference.adam_update_8bit(grad, *state, 0.9, 0.999, 1e-8, formula,
                                             1 - 0.999 ** (step + 1), block_size, code)
            want = old_adam_update_8bit(grad, old_state, 0.9, 0.999, 1e-8, formula,
                                        1 - 0.999 ** (step + 1), block_size, code)
            assert_bit_equal(got, want)
            for i in (0, 2):
                assert_bit_equal(state[i], old_state[i])
                assert_scales_equal(state[i + 1], old_state[i + 1])


def test_adam_8bit_on_non_contiguous_state_writes_back():
    g = torch.Generator().manual_seed(5)
    grad = torch.randn(64, 48, generator=g)
    m = q.quantize(torch.randn(64, 48, generator=g) * 0.1, 64)
    v = q.quantize(torch.rand(64, 48, generator=g) * 0.01, 64, signed=False)
    want_state = [t.clone() for t in (*m, *v)]
    want = reference.adam_update_8bit(grad, *want_state, 0.9, 0.99, 1e-8, "torch", 0.5, 64)
    # the same state held in transposed codes and strided scales
    state = [m[0].t().contiguous().t(), torch.repeat_interleave(m[1], 2)[::2],
             v[0].t().contiguous().t(), torch.repeat_interleave(v[1], 2)[::2]]
    assert not any(t.is_contiguous() for t in state)
    got = reference.adam_update_8bit(grad, *state, 0.9, 0.99, 1e-8, "torch", 0.5, 64)
    assert_bit_equal(got, want)
    for a, b in zip(state, want_state, strict=True):
        assert torch.equal(a, b)


def test_adam_8bit_from_threads_at_once_equals_one_after_the_other(monkeypatch):
    """Scratch is per thread: concurrent steps do not share it."""
    monkeypatch.setattr(q, "CHUNK_ELEMENTS", 256)
    shapes = [(50, 30 + i) for i in range(8)]

    def run(i: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        grad = torch.randn(shapes[i], generator=g)
        state = [*q.quantize(torch.randn(shapes[i], generator=g) * 0.1, 64),
                 *q.quantize(torch.rand(shapes[i], generator=g) * 0.01, 64, signed=False)]
        return [kernels.adam_update_8bit(grad, *state, 0.9, 0.99, 1e-8, "galore", 1.0, 64),
                *state]

    sequential = [run(i) for i in range(len(shapes))]
    with ThreadPoolExecutor(4) as pool:
        concurrent = list(pool.map(run, range(len(shapes))))
    for a, b in zip(concurrent, sequential, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_adam_8bit_allocates_the_direction_and_chunk_scratch_only():
    """No full-size temporary: besides the returned direction, allocations during a step are
    at most a few chunks' worth (the point of the chunked path)."""
    shape, block = (1024, 1024), 256  # 4 MB of fp32 per full-size tensor: 4 chunks
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(shape, generator=g)
    state = [*q.quantize(torch.randn(shape, generator=g) * 0.1, block),
             *q.quantize(torch.rand(shape, generator=g) * 0.01, block, signed=False)]
    reference.adam_update_8bit(grad, *state, 0.9, 0.999, 1e-8, "torch", 0.5, block)  # warm pool
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        reference.adam_update_8bit(grad, *state, 0.9, 0.999, 1e-8, "torch", 0.5, block)
    allocated = sum(e.self_cpu_memory_usage for e in prof.events()
                    if e.self_cpu_memory_usage > 0)
    direction = grad.numel() * 4
    assert direction <= allocated <= direction + 4 * q.CHUNK_ELEMENTS * 4
