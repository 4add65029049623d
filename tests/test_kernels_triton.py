"""Every Triton kernel against the torch reference, run by Triton's CPU interpreter.

Triton decides when it is imported, and when each ``@triton.jit`` function is decorated,
whether kernels are compiled or interpreted, so ``TRITON_INTERPRET=1`` must be set before
``import triton``, that is in the environment of the pytest command.  Every test here is marked
``interpret``: a plain pytest run deselects them (``tests/conftest.py``), and a run of their own
runs them (``TRITON_INTERPRET=1 python -m pytest -m interpret``, the second run of
``scripts/test.sh``).

Shapes are odd (37 x 53, r = 5) so that every block is partial, with fp32 and bf16 inputs.
"""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the torch backend is used alone")

from lowrank_optim import kernels  # noqa: E402
from lowrank_optim.kernels.dispatch import interpreter_enabled  # noqa: E402
from tests.helpers import both

pytestmark = pytest.mark.interpret


M, N, R = 37, 53, 5
DTYPES = [torch.float32, torch.bfloat16]
SIDES = ["right", "left"]


def _tol(dtype: torch.dtype) -> float:
    """Relative tolerance: fp32 rounding, or two bf16 ulps (bf16 rounds each op differently)."""
    return 1e-5 if dtype == torch.float32 else 2e-2


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    tol = _tol(dtype)
    scale = float(want.float().abs().max().clamp_min(1e-30))
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * scale)


def rand(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def basis_for(side: str, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    """A GaLore-convention basis: (r, n) on the right, (m, r) on the left."""
    return rand(*((R, N) if side == "right" else (M, R)), dtype=dtype, seed=seed)


def low_for(side: str, dtype: torch.dtype, seed: int = 2) -> torch.Tensor:
    return rand(*((M, R) if side == "right" else (R, N)), dtype=dtype, seed=seed)


def test_interpreter_is_on():
    """The imported triton, and so our kernels, runs under the interpreter."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    from lowrank_optim.kernels import triton_common

    assert interpreter_enabled() and isinstance(tl.standard.cdiv, InterpretedFunction)
    assert triton_common.INTERPRET
    assert kernels.use_triton(torch.zeros(1), backend="triton")


# -- projection and back-projection -----------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("side", SIDES)
def test_project(side, dtype):
    grad, basis = rand(M, N, dtype=dtype, seed=0), basis_for(side, dtype)
    (tri, _), (ref, _) = both(kernels.project, grad, basis, side)
    assert_close(tri, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("side", SIDES)
def test_project_back(side, dtype):
    (tri, _), (ref, _) = both(kernels.project_back, low_for(side, dtype), basis_for(side, dtype),
                              side)
    assert tri.shape == (M, N)
    assert_close(tri, ref, dtype)


def test_project_strided_inputs():
    """Transposed (non-contiguous) gradient and basis: strides, not copies."""
    grad = rand(N, M, dtype=torch.float32, seed=0).t()
    basis = rand(N, R, dtype=torch.float32, seed=1).t()
    assert not grad.is_contiguous() and not basis.is_contiguous()
    (tri, _), (ref, _) = both(kernels.project, grad, basis, "right")
    assert_close(tri, ref, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("decays", [(0.0, 0.0), (0.03, 0.0), (0.0, 0.05)],
                         ids=["no_decay", "decay_before", "decay_after"])
def test_project_back_update(side, dtype, decays):
    param = rand(M, N, dtype=dtype, seed=3)
    (_, (tri_param, *_)), (_, (ref_param, *_)) = both(
        kernels.project_back_update, param, low_for(side, dtype), basis_for(side, dtype), side,
        -0.2, *decays)
    assert not torch.equal(ref_param, param)
    assert_close(tri_param, ref_param, dtype)


def test_project_back_update_strided_param():
    param = rand(N, M, dtype=torch.float32, seed=3).t()  # a transposed weight view
    (_, (tri_param, *_)), (_, (ref_param, *_)) = both(
        kernels.project_back_update, param, low_for("right", torch.float32),
        basis_for("right", torch.float32), "right", 0.5, 0.0, 0.1)
    assert_close(tri_param, ref_param, torch.float32)


# -- DCT: indexed projection, gathers, scores --------------------------------------------------
def dct_case(side: str, dtype: torch.dtype):
    n = N if side == "right" else M
    basis = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(4)))[0]
    idx = torch.tensor([n - 1, 0, 7, 3, 20], dtype=torch.int32)  # unsorted, both edges
    return rand(M, N, dtype=dtype, seed=0), basis.to(dtype), idx


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("side", SIDES)
def test_project_indexed(side, dtype):
    grad, basis, idx = dct_case(side, dtype)
    (tri, _), (ref, _) = both(kernels.project_indexed, grad, basis, idx, side)
    assert_close(tri, ref, dtype)
    low = low_for(side, dtype)
    (tri, _), (ref, _) = both(kernels.project_back_indexed, low, basis, idx, side)
    assert_close(tri, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("side", SIDES)
def test_project_back_indexed_update(side, dtype):
    param, basis, idx = dct_case(side, dtype)
    (_, (tri_param, *_)), (_, (ref_param, *_)) = both(
        kernels.project_back_indexed_update, param, low_for(side, dtype), basis, idx, side,
        -0.3, 0.02, 0.0)
    assert not torch.equal(ref_param, param)
    assert_close(tri_param, ref_param, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("side", SIDES)
def test_gathers_are_exact(side, dtype):
    coeffs, basis, idx = dct_case(side, dtype)
    (tri, _), (ref, _) = both(kernels.gather_lowrank, coeffs, idx, side)
    assert torch.equal(tri, ref) and tri.is_contiguous()
    (tri, _), (ref, _) = both(kernels.indexed_basis, basis, idx, side)
    assert torch.equal(tri, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_dct_scores_matmul(side, dtype, norm):
    grad, basis, _ = dct_case(side, dtype)
    (tri, _), (ref, _) = both(kernels.dct_scores_matmul, grad, basis, side, norm)
    assert tri.dtype == torch.float32 and tri.shape == ref.shape == (basis.shape[0],)
    # the reference rounds the coefficients to the input dtype before the norm; Triton does not
    torch.testing.assert_close(tri, ref.float(), rtol=_tol(dtype), atol=0.0)


# -- Adam moments and the unprojected update ---------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("formula", ["galore", "torch"])
def test_adam_update(formula, dtype):
    grad = rand(M, N, dtype=dtype, seed=0)
    exp_avg = rand(M, N, dtype=dtype, seed=1) * 0.1
    exp_avg_sq = rand(M, N, dtype=dtype, seed=2).square() * 0.01
    (tri, (_, tri_m, tri_v, *_)), (ref, (_, ref_m, ref_v, *_)) = both(
        kernels.adam_update, grad, exp_avg, exp_avg_sq, 0.9, 0.95, 1e-6, formula, 0.4)
    assert_close(tri_m, ref_m, dtype)
    assert_close(tri_v, ref_v, dtype)
    assert_close(tri, ref, dtype)


def test_adam_update_formulas_differ():
    """Guards the formula switch: the torch formula divides sqrt(V) by sqrt(bias2)."""
    args = [rand(3, 4, dtype=torch.float32, seed=i).abs() for i in range(3)]
    galore = kernels.adam_update(*[a.clone() for a in args], 0.9, 0.9, 1e-3, "galore", 0.25,
                                 backend="triton")
    torch_ = kernels.adam_update(*[a.clone() for a in args], 0.9, 0.9, 1e-3, "torch", 0.25,
                                 backend="triton")
    assert (galore - torch_).abs().max() > 1e-2


def test_adam_update_non_contiguous_state():
    grad = rand(M, N, dtype=torch.float32, seed=0)
    exp_avg = rand(N, M, dtype=torch.float32, seed=1).t()  # transposed moment
    exp_avg_sq = rand(M, N, dtype=torch.float32, seed=2).square()
    (tri, (_, tri_m, tri_v, *_)), (ref, (_, ref_m, ref_v, *_)) = both(
        kernels.adam_update, grad, exp_avg, exp_avg_sq, 0.9, 0.999, 1e-8)
    assert_close(tri_m, ref_m, torch.float32)  # written back into the strided moment
    assert_close(tri, ref, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decays", [(0.0, 0.0), (0.03, 0.0), (0.0, 0.05)],
                         ids=["no_decay", "decay_before", "decay_after"])
def test_update_param(dtype, decays):
    param, direction = rand(M, N, dtype=dtype, seed=0), rand(M, N, dtype=dtype, seed=1)
    (_, (tri_param, *_)), (_, (ref_param, *_)) = both(
        kernels.update_param, param, direction, -0.1, *decays)
    assert_close(tri_param, ref_param, dtype)
    bias = rand(N, dtype=dtype, seed=2)  # 1-D parameters take this path too
    (_, (tri_bias, *_)), (_, (ref_bias, *_)) = both(kernels.update_param, bias, bias * 2, 0.1)
    assert_close(tri_bias, ref_bias, dtype)


# -- whole optimizer steps ---------------------------------------------------------------------
def _params(dtype: torch.dtype) -> list[torch.Tensor]:
    shapes = [(M, N), (N, M), (24, 24), (N,)]  # wide, tall, square, 1-D (unprojected)
    return [rand(*s, dtype=dtype, seed=10 + i).requires_grad_() for i, s in enumerate(shapes)]


def _train(make_opt, dtype: torch.dtype, backend: str, monkeypatch, steps: int = 3):
    previous = kernels.set_backend(backend)
    try:
        params = _params(dtype)
        opt = make_opt(params)
        for step in range(steps):
            for i, p in enumerate(params):
                p.grad = rand(*p.shape, dtype=dtype, seed=100 * step + i)
            opt.step()
    finally:
        kernels.set_backend(previous)
    return [p.detach() for p in params]


@pytest.mark.parametrize(
    "name,make_opt,dtype",
    [
        ("galore_std", lambda ps: __import__("lowrank_optim").GaLoreAdamW(
            [{"params": ps[:3], "rank": R, "update_proj_gap": 2, "scale": 0.25},
             {"params": ps[3:]}], lr=1e-2, weight_decay=0.1), torch.float32),
        # "full" projects the refresh gradient to diag(S) plus ~1e-7 rounding noise off the
        # diagonal; Adam would normalise that noise to +-1 under a tiny eps, so any two
        # implementations differ there: a larger eps keeps the comparison meaningful
        ("galore_full_torch_formula", lambda ps: __import__("lowrank_optim").GaLoreAdamW(
            [{"params": ps, "rank": R, "proj_type": "full"}], lr=1e-2, weight_decay=0.1,
            formula="torch", eps=1e-2), torch.float32),
        ("galore_bf16", lambda ps: __import__("lowrank_optim").GaLoreAdamW(
            [{"params": ps, "rank": R, "scale": 0.25}], lr=1e-2, weight_decay=0.1),
         torch.bfloat16),
        ("dct_matmul_route", lambda ps: __import__("lowrank_optim").DCTAdamW(
            [{"params": ps, "rank": R, "score_route": "matmul", "update_proj_gap": 2}],
            lr=1e-2, weight_decay=0.1), torch.float32),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_optimizer_steps_match_reference(name, make_opt, dtype, monkeypatch):
    if name.startswith("dct") and not hasattr(__import__("lowrank_optim"), "DCTAdamW"):
        pytest.skip("DCTAdamW is not exported by lowrank_optim")
    start = [p.detach().clone() for p in _params(dtype)]
    tri = _train(make_opt, dtype, "triton", monkeypatch)
    ref = _train(make_opt, dtype, "torch", monkeypatch)
    for t, r, s in zip(tri, ref, start, strict=True):
        assert not torch.equal(r, s), "the step did not change a parameter: vacuous"
        assert_close(t, r, dtype)


def test_optimizer_step_runs_the_triton_kernels(monkeypatch):
    """The optimizer really goes through the dispatch functions (and so through Triton)."""
    from lowrank_optim.kernels import triton_elementwise, triton_gemm

    calls = []
    for module, name in [(triton_gemm, "project"), (triton_gemm, "project_back_update"),
                         (triton_elementwise, "adam_update"),
                         (triton_elementwise, "update_param")]:
        original = getattr(module, name)

        def spy(*args, _original=original, _name=name, **kw):
            calls.append(_name)
            return _original(*args, **kw)

        monkeypatch.setattr(module, name, spy)
    import lowrank_optim as lo

    _train(lambda ps: lo.GaLoreAdamW([{"params": ps[:3], "rank": R}, {"params": ps[3:]}],
                                     weight_decay=0.1), torch.float32, "triton", monkeypatch,
           steps=2)
    assert sorted(set(calls)) == ["adam_update", "project", "project_back_update",
                                  "update_param"]

