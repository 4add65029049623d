"""GPU tests: the Triton kernels compiled on the device against the torch reference, and real
optimizer steps on CUDA.  Marked ``gpu``; skipped without a CUDA GPU (``bash
scripts/gpu_check.sh`` runs them first when one is available).

* every dispatched operation of :mod:`lowrank_optim.kernels` with ``backend="triton"`` against
  ``backend="torch"``, in fp32 / bf16 / fp16, at odd shapes (every block partial), on both
  projection sides, strided inputs included;
* one full optimizer step of every registry optimizer (``lowrank_optim.available()``) on a
  CUDA model with the Triton backend against the torch backend (``kernels.set_backend``);
* 8-bit moments (the fused Triton kernel runs), layer-wise steps (:class:`LayerwiseOptimizer`)
  and the DCT FFT / matmul score routes on CUDA;
* the profiler's ``mode="measured"`` on CUDA against the analytic figure.

``LOWRANK_OPTIM_GPU_TESTS_ON_CPU=1`` together with ``TRITON_INTERPRET=1`` runs the same tests
on the CPU under Triton's interpreter at the smallest shapes and a smaller model: how
``scripts/gpu_check.sh --cpu-dry-run`` checks these tests themselves between GPU runs.
Tolerances are relative to the largest reference value: fp32 rounding (GPU reductions run in
another order than cuBLAS'), about two ulps in bf16 / fp16.
"""

from __future__ import annotations

import os

import pytest
import torch

import lowrank_optim as lo
from lowrank_optim import kernels
from lowrank_optim.kernels import blockwise as q
from lowrank_optim.kernels.dispatch import interpreter_enabled, triton_available
from tests.helpers import both, spy_calls

#: the CPU stand-in of a GPU run (interpreter, small shapes): see the module docstring
ON_CPU = (os.environ.get("LOWRANK_OPTIM_GPU_TESTS_ON_CPU", "") == "1" and interpreter_enabled()
          and not torch.cuda.is_available())
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() or ON_CPU), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not triton_available(), reason="triton is not installed"),
]

#: (m, n, r): one partial block everywhere, block-aligned (the LLaMA shapes' divisibility,
#: which Triton compiles separately), several blocks with partial tails (used last)
SHAPES = [(37, 53, 5)] + ([] if ON_CPU else [(256, 512, 128), (300, 517, 67)])
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIDES = ["right", "left"]
TOL = {torch.float32: 1e-5 if ON_CPU else 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def ids(value):
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return None


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype,
                 tol: float | None = None) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype and got.device == want.device
    tol = TOL[dtype] if tol is None else tol
    scale = float(want.float().abs().max().clamp_min(1e-30))
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * scale)


def rand(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0,
         scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)


def basis_for(shape, side, dtype, seed=1):
    m, n, r = shape
    return rand(*((r, n) if side == "right" else (m, r)), dtype=dtype, seed=seed)


def low_for(shape, side, dtype, seed=2):
    m, n, r = shape
    return rand(*((m, r) if side == "right" else (r, n)), dtype=dtype, seed=seed)


def test_the_device_runs_triton():
    """The dispatch really picks Triton here, compiled (GPU) or interpreted (CPU stand-in)."""
    x = torch.zeros(4, device=DEVICE)
    assert kernels.use_triton(x, backend="triton")
    if DEVICE == "cuda":
        assert kernels.use_triton(x, backend="auto") and not interpreter_enabled()


# -- projection and back-projection -----------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("side", SIDES)
def test_project_and_back(side, dtype, shape):
    grad = rand(*shape[:2], dtype=dtype)
    (tri, _), (ref, _) = both(kernels.project, grad, basis_for(shape, side, dtype), side)
    assert_close(tri, ref, dtype)
    (tri, _), (ref, _) = both(kernels.project_back, low_for(shape, side, dtype),
                              basis_for(shape, side, dtype), side)
    assert tri.shape == shape[:2]
    assert_close(tri, ref, dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("decays", [(0.0, 0.0), (0.03, 0.0), (0.0, 0.05)],
                         ids=["no_decay", "decay_before", "decay_after"])
def test_project_back_update(decays, side, dtype, shape):
    param = rand(*shape[:2], dtype=dtype, seed=3)
    (_, (tri_param, *_)), (_, (ref_param, *_)) = both(
        kernels.project_back_update, param, low_for(shape, side, dtype),
        basis_for(shape, side, dtype), side, -0.2, *decays)
    assert not torch.equal(ref_param, param)
    assert_close(tri_param, ref_param, dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=ids)
def test_strided_inputs(shape):
    """Transposed (non-contiguous) gradient, basis and weight: strides, not copies."""
    m, n, r = shape
    grad = rand(n, m, seed=0).t()
    basis = rand(n, r, seed=1).t()
    assert not grad.is_contiguous() and not basis.is_contiguous()
    (tri, _), (ref, _) = both(kernels.project, grad, basis, "right")
    assert_close(tri, ref, torch.float32)
    param = rand(n, m, seed=3).t()
    (_, (tri_param, *_)), (_, (ref_param, *_)) = both(
        kernels.project_back_update, param, low_for(shape, "right", torch.float32), basis,
        "right", 0.5, 0.0, 0.1)
    assert_close(tri_param, ref_param, torch.float32)


# -- DCT: indexed projection, gathers, scores --------------------------------------------------
def dct_case(shape, side, dtype):
    m, n, r = shape
    k = n if side == "right" else m
    basis = torch.linalg.qr(torch.randn(k, k, generator=torch.Generator().manual_seed(4)))[0]
    picks = torch.randperm(k, generator=torch.Generator().manual_seed(5))[:r - 2]
    idx = torch.cat([torch.tensor([k - 1, 0]), picks[(picks != 0) & (picks != k - 1)]])[:r]
    return (rand(m, n, dtype=dtype), basis.to(DEVICE, dtype),
            idx.to(DEVICE, torch.int32))  # unsorted, both edges


@pytest.mark.parametrize("shape", SHAPES, ids=ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("side", SIDES)
def test_indexed_projections(side, dtype, shape):
    grad, basis, idx = dct_case(shape, side, dtype)
    low = low_for((*shape[:2], idx.numel()), side, dtype)
    (tri, _), (ref, _) = both(kernels.project_indexed, grad, basis, idx, side)
    assert_close(tri, ref, dtype)
    (tri, _), (ref, _) = both(kernels.project_back_indexed, low, basis, idx, side)
    assert_close(tri, ref, dtype)
    (_, (tri_param, *_)), (_, (ref_param, *_)) = both(
        kernels.project_back_indexed_update, grad, low, basis, idx, side, -0.3, 0.02, 0.0)
    assert not torch.equal(ref_param, grad)
    assert_close(tri_param, ref_param, dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("side", SIDES)
def test_gathers_are_exact(side, dtype, shape):
    coeffs, basis, idx = dct_case(shape, side, dtype)
    (tri, _), (ref, _) = both(kernels.gather_lowrank, coeffs, idx, side)
    assert torch.equal(tri, ref) and tri.is_contiguous()
    (tri, _), (ref, _) = both(kernels.indexed_basis, basis, idx, side)
    assert torch.equal(tri, ref)


@pytest.mark.parametrize("shape", SHAPES, ids=ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_dct_scores_matmul(norm, side, dtype, shape):
    grad, basis, _ = dct_case(shape, side, dtype)
    (tri, _), (ref, _) = both(kernels.dct_scores_matmul, grad, basis, side, norm)
    assert tri.dtype == torch.float32 and tri.shape == ref.shape == (basis.shape[0],)
    # the reference rounds the coefficients to the input dtype before the norm; Triton does not
    torch.testing.assert_close(tri, ref.float(), rtol=TOL[dtype], atol=0.0)


# -- Adam moments and the unprojected update ---------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("formula", ["galore", "torch"])
def test_adam_update(formula, dtype, shape):
    m, n, _ = shape
    grad = rand(m, n, dtype=dtype, seed=0)
    exp_avg = rand(m, n, dtype=dtype, seed=1, scale=0.1)
    exp_avg_sq = rand(m, n, seed=2).square().mul(0.01).to(dtype)
    (tri, (_, tri_m, tri_v, *_)), (ref, (_, ref_m, ref_v, *_)) = both(
        kernels.adam_update, grad, exp_avg, exp_avg_sq, 0.9, 0.95, 1e-6, formula, 0.4)
    assert_close(tri_m, ref_m, dtype)
    assert_close(tri_v, ref_v, dtype)
    assert_close(tri, ref, dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("decays", [(0.0, 0.0), (0.03, 0.0), (0.0, 0.05)],
                         ids=["no_decay", "decay_before", "decay_after"])
def test_update_param(decays, dtype, shape):
    m, n, _ = shape
    param, direction = rand(m, n, dtype=dtype, seed=0), rand(m, n, dtype=dtype, seed=1)
    (_, (tri_param, *_)), (_, (ref_param, *_)) = both(
        kernels.update_param, param, direction, -0.1, *decays)
    assert_close(tri_param, ref_param, dtype)
    bias = rand(n, dtype=dtype, seed=2)  # 1-D parameters take this path too
    (_, (tri_bias, *_)), (_, (ref_bias, *_)) = both(kernels.update_param, bias, bias * 2, 0.1)
    assert_close(tri_bias, ref_bias, dtype)


# -- 8-bit state kernels ------------------------------------------------------------------------
def per_element(absmax: torch.Tensor, block: int, shape: torch.Size) -> torch.Tensor:
    return absmax.repeat_interleave(block)[:shape.numel()].view(shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("block", [64, 100])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("code", q.CODES)
def test_quantize_dequantize(code, signed, block, dtype):
    m, n, _ = SHAPES[-1]
    x = rand(m, n, seed=6).float()
    x = x if signed else x.square()
    x[0, :5] = 0.0  # exact zeros, and an outlier that squeezes its block into small codes
    x[1, 0] = -10 * x.abs().max() if signed else 10 * x.abs().max()
    x = x.to(dtype)
    tri_codes, tri_absmax = kernels.quantize_blockwise(x, block, code, signed, backend="triton")
    ref_codes, ref_absmax = kernels.quantize_blockwise(x, block, code, signed, backend="torch")
    assert tri_codes.dtype == torch.uint8 and tri_codes.shape == x.shape
    assert tri_codes.device == x.device
    assert torch.equal(tri_absmax, ref_absmax)
    assert (tri_codes.int() - ref_codes.int()).abs().max() <= 1  # midpoints: one level
    y = kernels.dequantize_blockwise(tri_codes, tri_absmax, block, code, signed, backend="triton")
    xf = x.float()
    bound = q.error_bound(xf, per_element(ref_absmax, block, x.shape), code, signed)
    assert torch.all((xf - y).abs() <= bound)
    assert torch.equal(y, kernels.dequantize_blockwise(tri_codes, tri_absmax, block, code, signed,
                                                       backend="torch"))


@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
@pytest.mark.parametrize("block", [64, 100])
@pytest.mark.parametrize("formula", ["galore", "torch"])
def test_adam_update_8bit(formula, block, dtype):
    m, n, _ = SHAPES[-1]
    grad = rand(m, n, dtype=dtype, seed=8)
    m0 = q.quantize(rand(m, n, seed=9, scale=0.1), block, signed=True)
    v0 = q.quantize(rand(m, n, seed=10).square().mul(0.01), block, signed=False)
    m_true = q.dequantize(*m0, block, signed=True)
    v_true = q.dequantize(*v0, block, signed=False)
    kernels.adam_update(grad.float(), m_true, v_true, 0.9, 0.95, 1e-6, formula, 0.4,
                        backend="torch")
    results = {}
    for backend in ("triton", "torch"):
        mm = tuple(t.clone() for t in m0)
        vv = tuple(t.clone() for t in v0)
        direction = kernels.adam_update_8bit(grad, *mm, *vv, 0.9, 0.95, 1e-6, formula, 0.4,
                                             block, backend=backend)
        results[backend] = direction, mm, vv
    (tri, tri_m, tri_v), (ref, ref_m, ref_v) = results["triton"], results["torch"]
    assert tri.dtype == dtype and tri.device == grad.device
    assert_close(tri, ref, dtype, tol=max(TOL[dtype], 1e-4))
    for state, true, signed in ((tri_m, m_true, True), (tri_v, v_true, False)):
        got = q.dequantize(*state, block, signed=signed)
        bound = q.error_bound(true, per_element(state[1], block, true.shape), "dynamic", signed)
        assert torch.all((got - true).abs() <= bound * (1 + TOL[dtype]) + 1e-12)
    assert (tri_m[0].int() - ref_m[0].int()).abs().max() <= 1
    assert (tri_v[0].int() - ref_v[0].int()).abs().max() <= 1
    assert not torch.equal(tri_m[0], m0[0]), "the moments did not change: vacuous"


# -- whole optimizer steps on the device --------------------------------------------------------
def small_model(dtype: torch.dtype = torch.float32, seed: int = 0):
    """The tiny LLaMA (hidden 64, 2 layers; smaller under the interpreter) on the device."""
    from lowrank_optim.model_configs import build_llama

    small = dict(hidden_size=32, intermediate_size=48, num_attention_heads=2,
                 num_key_value_heads=2, num_hidden_layers=1, vocab_size=64) if ON_CPU else {}
    return build_llama("tiny", seed=seed, **small).to(DEVICE, dtype)


RANK = 4 if ON_CPU else 8


def optimizer_kwargs(name: str) -> dict:
    if name.endswith("adafactor"):
        return {"lr": 1e-2, "relative_step": False, "scale_parameter": False}
    if name.startswith("sst"):
        return {"lr": 1e-2}
    return {"lr": 1e-2, "weight_decay": 0.1}


def fixed_grads(params: list[torch.Tensor], seed: int = 100) -> None:
    for i, p in enumerate(params):
        p.grad = rand(*p.shape, seed=seed + i, scale=0.1).to(p.dtype)


def one_step(name: str, backend: str, dtype: torch.dtype):
    """``(before, after)`` parameter values of one step of ``name`` on a fresh model."""
    model = small_model(dtype)
    if name == "adamw":
        opt = lo.create_optimizer(model, name, lr=1e-2, weight_decay=0.1)
    else:
        opt = lo.create_optimizer(model, name, rank=RANK, **optimizer_kwargs(name))
    params = [p for g in opt.param_groups for p in g["params"]]
    before = [p.detach().clone() for p in params]
    fixed_grads(params)
    previous = kernels.set_backend(backend)
    try:
        opt.step()
    finally:
        kernels.set_backend(previous)
    for p in params:  # moments, projectors and 8-bit codes live on the device
        for key, value in opt.state[p].items():
            if isinstance(value, torch.Tensor) and (value.is_floating_point()
                                                    or value.dtype == torch.uint8):
                assert value.device == p.device, f"optimizer state {key} left the device"
    return before, [p.detach().clone() for p in params]


CASES = [(name, torch.float32) for name in lo.available()] + [("galore_adamw", torch.bfloat16)]


@pytest.mark.parametrize("name,dtype", CASES, ids=lambda v: ids(v) or v)
def test_registry_optimizer_step_triton_matches_torch(name, dtype):
    before, tri = one_step(name, "triton", dtype)
    before_ref, ref = one_step(name, "torch", dtype)
    moved = 0
    for b, br, t, r in zip(before, before_ref, tri, ref, strict=True):
        assert torch.equal(b, br)
        if dtype == torch.float32:  # the updates themselves, to fp32 rounding
            assert_close(t - b, r - b, dtype, tol=1e-3 if not ON_CPU else 1e-4)
        else:  # bf16 weights: the update rounds into the weight, compare the weights
            torch.testing.assert_close(t.float(), r.float(), rtol=2e-2,
                                       atol=2e-2 * float((r - b).float().abs().max()))
        moved += int(not torch.equal(r, b))
    assert moved > 0, "the step changed no parameter: vacuous"


def test_8bit_optimizer_runs_the_fused_kernel_and_matches_torch(monkeypatch):
    """GaLoreAdamW with bits=8 (projected, unprojected, 1-D kept 32-bit) on both backends, and
    the step really runs the fused Triton kernel, its codes and absmax on the device."""
    from lowrank_optim.kernels import triton_quant

    calls = spy_calls(monkeypatch, triton_quant, "adam_update_8bit")
    m, n, r = SHAPES[-1]

    def train(backend: str, steps: int) -> list[torch.Tensor]:
        previous = kernels.set_backend(backend)
        params = [rand(m, n, seed=11).requires_grad_(), rand(48, 40, seed=12).requires_grad_(),
                  rand(n, seed=13).requires_grad_()]
        opt = lo.GaLoreAdamW([{"params": params[:1], "rank": r, "update_proj_gap": 2},
                              {"params": params[1:]}], lr=1e-2, weight_decay=0.1, bits=8,
                             block_size=64, min_8bit_size=100)
        try:
            for step in range(steps):
                for i, p in enumerate(params):
                    p.grad = rand(*p.shape, seed=100 * step + i)
                opt.step()
        finally:
            kernels.set_backend(previous)
        state = opt.state[params[0]]
        assert state["exp_avg_codes"].dtype == torch.uint8
        assert state["exp_avg_codes"].device == params[0].device
        assert "exp_avg" in opt.state[params[2]]
        return [p.detach() for p in params]

    start = [rand(m, n, seed=11), rand(48, 40, seed=12), rand(n, seed=13)]
    tri = train("triton", 1)
    assert len(calls) == 2  # two 8-bit tensors, one step
    ref = train("torch", 1)
    for t, rr, s in zip(tri, ref, start, strict=True):  # first step: fp32 moments, exact
        assert not torch.equal(rr, s)
        assert_close(t - s, rr - s, torch.float32, tol=1e-3)
    # later steps read requantised moments, whose codes may differ by one level at midpoints
    tri, ref = train("triton", 3), train("torch", 3)
    for t, rr in zip(tri, ref, strict=True):
        torch.testing.assert_close(t, rr, rtol=1e-3, atol=1e-3 * float(rr.abs().max()))


@pytest.mark.parametrize("name", ["galore_adamw", "dct_adamw"])
def test_layerwise_equals_regular_steps(name):
    """Per-parameter steps in the backward hooks give the regular step's parameters, and free
    the projected gradients during backward."""
    from lowrank_optim.layerwise import LayerwiseOptimizer

    vocab = 64 if ON_CPU else 256
    batches = [torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(s))
               .to(DEVICE) for s in range(3)]
    results = []
    for layerwise in (False, True):
        model = small_model()
        opt = lo.create_optimizer(model, name, rank=RANK, lr=1e-2, update_proj_gap=2)
        stepper = LayerwiseOptimizer(opt) if layerwise else opt
        for ids_ in batches:
            model(input_ids=ids_, labels=ids_).loss.backward()
            if layerwise:
                projected = [p for _, p, _ in opt.projected_params()]
                assert projected and all(p.grad is None for p in projected)
            stepper.step()
            stepper.zero_grad()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        # backward on a GPU sums in a nondeterministic order: close, not bit-equal
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * float(b.abs().max()))


def structured_grad(opt, shape: tuple[int, int], r: int, seed: int) -> torch.Tensor:
    """A gradient whose DCT coefficients hold ``r`` strong frequencies over weak noise, so
    that the top-``r`` selection does not hang on rounding (routes and backends round
    differently)."""
    side, k = lo.projectors.dct_side(shape)
    basis = opt.projector.basis(k, torch.device(DEVICE), torch.float32)
    g = torch.Generator().manual_seed(seed)
    coeffs = torch.randn(shape, generator=g) * 0.01
    chosen = torch.randperm(k, generator=g)[:r]
    if side == "right":  # coefficients G Q^T: G = C Q
        coeffs[:, chosen] += torch.randn(shape[0], r, generator=g)
        return coeffs.to(DEVICE) @ basis
    coeffs[chosen, :] += torch.randn(r, shape[1], generator=g)  # Q G: G = Q^T C
    return basis.t() @ coeffs.to(DEVICE)


def test_dct_score_routes_select_the_same_subspace():
    """``score_route="fft"`` and ``"matmul"`` on the device: the same frequencies and the same
    step, each route on the Triton and the torch backend."""
    m, n, r = SHAPES[-1]
    shapes = [(m, n), (n, m)]  # both sides
    out = {}
    for route in ("fft", "matmul"):
        for backend in ("triton", "torch"):
            params = [rand(*s, seed=20 + i).requires_grad_() for i, s in enumerate(shapes)]
            opt = lo.DCTAdamW([{"params": params, "rank": r, "score_route": route}], lr=1e-2)
            previous = kernels.set_backend(backend)
            try:
                for step in range(2):
                    for i, p in enumerate(params):
                        p.grad = structured_grad(opt, p.shape, r, seed=200 * step + i)
                    opt.step()
            finally:
                kernels.set_backend(previous)
            idx = [opt.state[p]["proj_idx"].sort().values for p in params]
            assert all(i.device == params[0].device for i in idx)
            out[route, backend] = idx, [p.detach() for p in params]
    ref_idx, ref_params = out["matmul", "torch"]
    for key, (idx, values) in out.items():
        for a, b in zip(idx, ref_idx, strict=True):
            assert torch.equal(a, b), f"{key} selected other frequencies"
        for a, b in zip(values, ref_params, strict=True):
            assert_close(a, b, torch.float32, tol=1e-4)


# -- the profiler: measured on the device equals analytic ---------------------------------------
PROFILE_SMALL = dict(seq_len=16, batch_size=1, steps=1)


@pytest.mark.parametrize("name,precision",
                         [(n, "fp32") for n in lo.available()]
                         + [("adamw", "bf16"), ("galore_adamw", "bf16")])
def test_profile_measured_equals_analytic(name, precision):
    from lowrank_optim.profile import profile

    a = profile("tiny", name, rank=8, mode="analytic", precision=precision, **PROFILE_SMALL)
    measured = profile("tiny", name, rank=8, mode="measured", device=DEVICE,
                       precision=precision, **PROFILE_SMALL)
    for field in ("moments", "projectors", "indices", "other_state", "weights", "gradients",
                  "num_params", "activations"):
        assert getattr(a, field) == getattr(measured, field), field
    assert a.optimizer_state == measured.optimizer_state > 0
    if DEVICE == "cuda":
        # the peak was live at the step: weights, gradients and the state all held
        assert measured.cuda_peak is not None
        assert measured.cuda_peak >= (measured.weights + measured.gradients
                                      + measured.optimizer_state)
