"""8-bit state kernels: dispatch and the Triton kernels against the torch path (interpreter).

The torch path of ``kernels.quantize_blockwise`` / ``dequantize_blockwise`` *is*
:mod:`lowrank_optim.kernels.blockwise` (its error bounds are tested in ``test_quantization.py``).
The Triton kernels run under ``TRITON_INTERPRET=1``: marked ``interpret``, like
``test_kernels_triton.py``, they are deselected by a plain pytest run and run by one of their own
(``TRITON_INTERPRET=1 python -m pytest -m interpret``: Triton picks interpreter or compiler when
it is imported).  Codes may differ from the torch path by one level where a value lies on a midpoint
(fp32 rounding), so dequantised values are compared with the documented bound.
"""

import numpy as np
import pytest
import torch

from lowrank_optim import kernels
from lowrank_optim.kernels import blockwise as q
from lowrank_optim.kernels import reference
from lowrank_optim.kernels.dispatch import triton_available
from tests import lowbit_spec as spec
from tests.helpers import spy_calls

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


M, N = 37, 53  # every block partial for the block sizes below
BLOCKS = [64, 100]  # a power of two and not


def rand(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def per_element(absmax: torch.Tensor, block: int, shape: torch.Size) -> torch.Tensor:
    n = shape.numel()
    return absmax.repeat_interleave(block)[:n].view(shape)


# -- dispatch (no Triton kernel runs here) -----------------------------------------------------
def test_torch_path_is_the_quantization_module():
    """The dispatch's torch path is the specification module, and that module computes what
    the documentation specifies (an independent statement: :mod:`tests.lowbit_spec`; more in
    ``test_lowbit_spec.py``)."""
    assert reference.quantize_blockwise is q.quantize
    assert reference.dequantize_blockwise is q.dequantize
    x = rand(M, N, seed=0)
    codes, absmax = kernels.quantize_blockwise(x, 64, backend="torch")
    want = q.quantize(x, 64)
    assert torch.equal(codes, want[0]) and torch.equal(absmax, want[1])
    assert torch.equal(kernels.dequantize_blockwise(codes, absmax, 64), q.dequantize(codes, absmax,
                                                                                      64))
    spec_codes, spec_absmax, tie = spec.quantize(x.numpy(), 64, "dynamic", True)
    np.testing.assert_array_equal(absmax.double().numpy(), spec_absmax)
    got = codes.reshape(-1).long().numpy()
    assert np.all((got == spec_codes) | tie)
    np.testing.assert_allclose(
        kernels.dequantize_blockwise(codes, absmax, 64).double().numpy().reshape(-1),
        spec.dequantize(got, spec_absmax, 64, "dynamic", True), rtol=1e-6)


def test_quantize_out_writes_in_place_and_results_are_compact():
    x = rand(M, N, seed=1)
    codes, absmax = q.zeros(x.shape, x.device, 64, "dynamic", True)
    ptrs = codes.data_ptr(), absmax.data_ptr()
    got = kernels.quantize_blockwise(x, 64, out=(codes, absmax))
    assert got[0] is codes and got[1] is absmax and (codes.data_ptr(), absmax.data_ptr()) == ptrs
    assert torch.equal(codes, q.quantize(x, 64)[0])
    fresh, _ = q.quantize(x, 64)  # padded blocks: not a view of a larger buffer
    assert fresh.untyped_storage().nbytes() == x.numel()


def test_zero_state_dequantizes_to_zero():
    for code in q.CODES:
        for signed in (True, False):
            codes, absmax = q.zeros((5, 7), torch.device("cpu"), 4, code, signed)
            assert absmax.numel() == 9 and codes.dtype == torch.uint8
            assert torch.equal(q.dequantize(codes, absmax, 4, code, signed), torch.zeros(5, 7))
            # and quantising zeros gives the same codes
            assert torch.equal(q.quantize(torch.zeros(5, 7), 4, code, signed)[0], codes)


@pytest.mark.parametrize("formula", ["galore", "torch"])
def test_reference_adam_8bit_is_adam_on_the_dequantized_moments(formula):
    """Direction bit-identical to 32-bit Adam on the dequantised moments; moments requantised.
    (The composition as implemented; ``test_lowbit_spec.py::test_adam_8bit_step_from_a_nonzero
    _state`` checks the same step against the documented tables and a float64 Adam.)"""
    grad, block = rand(M, N, seed=2), 64
    m_codes, m_absmax = q.quantize(rand(M, N, seed=3) * 0.1, block, signed=True)
    v_codes, v_absmax = q.quantize(rand(M, N, seed=4).square() * 0.01, block, signed=False)
    m = q.dequantize(m_codes, m_absmax, block, signed=True)
    v = q.dequantize(v_codes, v_absmax, block, signed=False)
    want = kernels.adam_update(grad, m, v, 0.9, 0.95, 1e-6, formula, 0.4)
    got = kernels.adam_update_8bit(grad, m_codes, m_absmax, v_codes, v_absmax, 0.9, 0.95, 1e-6,
                                   formula, 0.4, block)
    assert torch.equal(got, want)
    for codes, absmax, value, signed in ((m_codes, m_absmax, m, True),
                                         (v_codes, v_absmax, v, False)):
        want_codes, want_absmax = q.quantize(value, block, signed=signed)
        assert torch.equal(codes, want_codes) and torch.equal(absmax, want_absmax)


def test_adam_8bit_direction_in_grad_dtype():
    grad = rand(8, 16, seed=5, dtype=torch.bfloat16)
    m = q.zeros(grad.shape, grad.device, 32, "dynamic", True)
    v = q.zeros(grad.shape, grad.device, 32, "dynamic", False)
    direction = kernels.adam_update_8bit(grad, *m, *v, 0.9, 0.999, 1e-8, "torch", 0.001, 32)
    assert direction.dtype == torch.bfloat16


# -- Triton kernels under the interpreter ------------------------------------------------------
@pytest.mark.interpret
@needs_triton
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("code", q.CODES)
def test_triton_quantize_matches_torch(code, signed, block):
    x = rand(M, N, seed=6)
    x = x if signed else x.square()
    x[0, :5] = 0.0  # exact zeros, and an outlier that squeezes its block into small codes
    x[1, 0] = -10 * x.abs().max() if signed else 10 * x.abs().max()
    tri_codes, tri_absmax = kernels.quantize_blockwise(x, block, code, signed, backend="triton")
    ref_codes, ref_absmax = kernels.quantize_blockwise(x, block, code, signed, backend="torch")
    assert tri_codes.dtype == torch.uint8 and tri_codes.shape == x.shape
    assert torch.equal(tri_absmax, ref_absmax)
    assert (tri_codes.int() - ref_codes.int()).abs().max() <= 1
    y = kernels.dequantize_blockwise(tri_codes, tri_absmax, block, code, signed, backend="triton")
    bound = q.error_bound(x, per_element(ref_absmax, block, x.shape), code, signed)
    assert torch.all((x - y).abs() <= bound)
    # dequantisation is exact arithmetic: identical on both backends
    assert torch.equal(y, kernels.dequantize_blockwise(tri_codes, tri_absmax, block, code, signed,
                                                       backend="torch"))


@pytest.mark.interpret
@needs_triton
def test_triton_quantize_bf16_input_and_out():
    x = rand(M, N, seed=7, dtype=torch.bfloat16)
    out = q.zeros(x.shape, x.device, 64, "dynamic", True)
    got = kernels.quantize_blockwise(x, 64, out=out, backend="triton")
    assert got[0] is out[0]
    ref = kernels.quantize_blockwise(x, 64, backend="torch")
    assert torch.equal(got[1], ref[1]) and (got[0].int() - ref[0].int()).abs().max() <= 1
    dq = torch.empty(x.shape)
    assert kernels.dequantize_blockwise(*got, 64, out=dq, backend="triton") is dq


@pytest.mark.interpret
@needs_triton
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("formula", ["galore", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_adam_8bit_matches_torch(dtype, formula, block):
    grad = rand(M, N, seed=8, dtype=dtype)
    m0 = q.quantize(rand(M, N, seed=9) * 0.1, block, signed=True)
    v0 = q.quantize(rand(M, N, seed=10).square() * 0.01, block, signed=False)
    # the fp32 moments after the step, which both backends quantise
    m_true = q.dequantize(*m0, block, signed=True)
    v_true = q.dequantize(*v0, block, signed=False)
    kernels.adam_update(grad, m_true, v_true, 0.9, 0.95, 1e-6, formula, 0.4, backend="torch")
    results = {}
    for backend in ("triton", "torch"):
        m = tuple(t.clone() for t in m0)
        v = tuple(t.clone() for t in v0)
        direction = kernels.adam_update_8bit(grad, *m, *v, 0.9, 0.95, 1e-6, formula, 0.4, block,
                                             backend=backend)
        results[backend] = direction, m, v
    (tri, tri_m, tri_v), (ref, ref_m, ref_v) = results["triton"], results["torch"]
    assert tri.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(tri.float(), ref.float(), rtol=tol, atol=tol * ref.abs().max())
    for state, true, signed in ((tri_m, m_true, True), (ref_m, m_true, True),
                                (tri_v, v_true, False), (ref_v, v_true, False)):
        want_absmax = q.quantize(true, block, signed=signed)[1]
        torch.testing.assert_close(state[1], want_absmax, rtol=1e-6, atol=0.0)
        got = q.dequantize(*state, block, signed=signed)
        bound = q.error_bound(true, per_element(state[1], block, true.shape), "dynamic", signed)
        assert torch.all((got - true).abs() <= bound)
    assert (tri_m[0].int() - ref_m[0].int()).abs().max() <= 1
    assert (tri_v[0].int() - ref_v[0].int()).abs().max() <= 1
    assert not torch.equal(tri_m[0], m0[0]), "the moments did not change: vacuous"


@pytest.mark.interpret
@needs_triton
def test_triton_optimizer_8bit_steps_match_torch(monkeypatch):
    """GaLoreAdamW with bits=8 (projected, unprojected, 1-D kept 32-bit) on both backends, and
    the step really runs the fused Triton kernel."""
    import lowrank_optim as lo
    from lowrank_optim.kernels import triton_quant

    calls = spy_calls(monkeypatch, triton_quant, "adam_update_8bit")

    def train(backend: str) -> list[torch.Tensor]:
        previous = kernels.set_backend(backend)
        params = [rand(M, N, seed=11).requires_grad_(), rand(48, 40, seed=12).requires_grad_(),
                  rand(N, seed=13).requires_grad_()]
        opt = lo.GaLoreAdamW([{"params": params[:1], "rank": 5, "update_proj_gap": 2},
                              {"params": params[1:]}], lr=1e-2, weight_decay=0.1, bits=8,
                             block_size=64, min_8bit_size=100)
        try:
            for step in range(3):
                for i, p in enumerate(params):
                    p.grad = rand(*p.shape, seed=100 * step + i)
                opt.step()
        finally:
            kernels.set_backend(previous)
        assert "exp_avg_codes" in opt.state[params[0]] and "exp_avg" in opt.state[params[2]]
        return [p.detach() for p in params]

    start = [rand(M, N, seed=11), rand(48, 40, seed=12), rand(N, seed=13)]
    tri = train("triton")
    assert len(calls) == 6  # two 8-bit tensors, three steps
    ref = train("torch")
    for t, r, s in zip(tri, ref, start, strict=True):
        assert not torch.equal(r, s)
        torch.testing.assert_close(t, r, rtol=1e-4, atol=1e-4 * float(r.abs().max()))
