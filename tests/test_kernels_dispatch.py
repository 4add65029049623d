"""Kernel dispatch: backend choice, lazy triton import, and the torch reference's semantics.

Nothing here runs a Triton kernel (``test_kernels_triton.py`` does, under the interpreter).
"""

import math
import subprocess
import sys
import textwrap

import pytest
import torch

from lowrank_optim import kernels
from lowrank_optim.kernels import reference
from lowrank_optim.projectors.base import Projector
from lowrank_optim.projectors.svd import SVDProjector


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **env})


# -- backend selection -------------------------------------------------------------------------
@pytest.mark.parametrize("value,expected", [("", "auto"), ("auto", "auto"), (" Torch ", "torch"),
                                            ("TRITON", "triton")])
def test_backend_from_env(monkeypatch, value, expected):
    """The environment variable is read once (at import, or by ``set_backend()``), not by
    every dispatched call."""
    monkeypatch.setenv(kernels.ENV_VAR, value)
    previous = kernels.set_backend()
    try:
        assert kernels.requested_backend() == kernels.current_backend() == expected
        assert kernels.requested_backend("torch") == "torch"  # the argument wins
        monkeypatch.setenv(kernels.ENV_VAR, "torch" if expected != "torch" else "auto")
        assert kernels.requested_backend() == expected  # not re-read per call
    finally:
        kernels.set_backend(previous)


def test_invalid_backend_is_rejected(monkeypatch):
    monkeypatch.setenv(kernels.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="LOWRANK_OPTIM_KERNELS"):
        kernels.set_backend()
    with pytest.raises(ValueError, match="set_backend"):
        kernels.set_backend("gpu")
    with pytest.raises(ValueError, match="backend argument"):
        kernels.project(_rand(4, 3), _rand(2, 3), "right", backend="fast")


def test_auto_and_torch_pick_the_reference_on_cpu(monkeypatch):
    t = _rand(4, 3)
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    assert not kernels.use_triton(t)
    assert not kernels.use_triton(t, backend="torch")
    grad, basis = _rand(5, 4), _rand(2, 4, seed=1)
    assert torch.equal(kernels.project(grad, basis, "right"),
                       reference.project(grad, basis, "right"))


def test_forcing_triton_on_cpu_needs_the_interpreter(monkeypatch):
    pytest.importorskip("triton", reason="triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.project(_rand(4, 3), _rand(2, 3), "right", backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.use_triton(_rand(4, 3), backend="triton")
    with pytest.raises(TypeError, match="float64"):
        kernels.use_triton(_rand(4, 3).double(), backend="triton")


def test_package_import_and_cpu_steps_do_not_import_triton():
    """``import lowrank_optim`` leaves triton alone, and CPU steps never load our Triton
    modules.  (torch itself imports triton, when installed, as soon as an optimizer is built:
    ``Optimizer.add_param_group`` imports ``torch._dynamo``.)"""
    result = _run_python("""
        import sys, torch
        import lowrank_optim as lo
        assert "triton" not in sys.modules, "import lowrank_optim imported triton"
        w = torch.nn.Parameter(torch.randn(6, 4))
        b = torch.nn.Parameter(torch.randn(4))
        opt = lo.GaLoreAdamW([{"params": [w], "rank": 2}, {"params": [b]}], weight_decay=0.1)
        w.grad, b.grad = torch.randn(6, 4), torch.randn(4)
        opt.step()
        loaded = [m for m in sys.modules if m.startswith("lowrank_optim.kernels.triton")]
        assert not loaded, loaded
        print("ok")
    """)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_everything_works_without_triton():
    """``triton`` made unimportable: auto runs on torch, forcing triton explains the problem."""
    result = _run_python("""
        import sys
        sys.modules["triton"] = None  # import triton -> ImportError
        import torch
        import lowrank_optim as lo
        from lowrank_optim import kernels
        w = torch.nn.Parameter(torch.randn(6, 4))
        opt = lo.GaLoreAdamW([{"params": [w], "rank": 2}], weight_decay=0.1)
        w.grad = torch.randn(6, 4)
        before = w.detach().clone()
        opt.step()
        assert not torch.equal(w, before)
        try:
            kernels.project(torch.randn(4, 3), torch.randn(2, 3), "right", backend="triton")
        except RuntimeError as e:
            assert "not installed" in str(e), e
            print("ok")
    """, TRITON_INTERPRET="1")
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


# -- the reference is the specification: its semantics pinned -----------------------------------
@pytest.mark.parametrize("formula", ["galore", "torch"])
def test_reference_adam_is_bit_identical_to_the_eager_formula(formula):
    """The formula the Adam rule used before dispatch, written out: must match bit for bit
    (the galore-torch conformance tests rely on it)."""
    grad, m, v = _rand(7, 5), _rand(7, 5, seed=1), _rand(7, 5, seed=2).square()
    beta1, beta2, eps, bias2 = 0.9, 0.999, 1e-6, 1.0 - 0.999**3
    m_ref, v_ref = m.clone(), v.clone()
    m_ref.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    v_ref.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    if formula == "torch":
        denom = (v_ref.sqrt() / math.sqrt(bias2)).add_(eps)
    else:
        denom = v_ref.sqrt().add_(eps)
    n_ref = m_ref / denom
    n = kernels.adam_update(grad, m, v, beta1, beta2, eps, formula, bias2)
    assert torch.equal(m, m_ref) and torch.equal(v, v_ref) and torch.equal(n, n_ref)


@pytest.mark.parametrize("formula", ["galore", "torch"])
def test_reference_adam_direction_is_the_step_of_independent_optimizers(formula):
    """The same direction from optimizers written elsewhere: one step of torch.optim.AdamW
    (``formula="torch"``) or galore-torch's AdamW (``"galore"``) from the same moments at step
    t, read back from the parameter change (no decay: ``change = -step_size * N``)."""
    import galore_torch

    grad, m, v = _rand(7, 5), _rand(7, 5, seed=1), _rand(7, 5, seed=2).square()
    lr, beta1, beta2, eps, t = 1e-2, 0.9, 0.999, 1e-6, 3
    bias1, bias2 = 1.0 - beta1**t, 1.0 - beta2**t
    n = kernels.adam_update(grad, m.clone(), v.clone(), beta1, beta2, eps, formula, bias2)
    p = torch.nn.Parameter(_rand(7, 5, seed=3).double())
    if formula == "torch":
        opt = torch.optim.AdamW([p], lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=0.0,
                                foreach=False)
        opt.state[p] = {"step": torch.tensor(float(t - 1)), "exp_avg": m.double(),
                        "exp_avg_sq": v.double()}
        step_size = lr / bias1
    else:
        opt = galore_torch.GaLoreAdamW([p], lr=lr, betas=(beta1, beta2), eps=eps,
                                       weight_decay=0.0)
        opt.state[p] = {"step": t - 1, "exp_avg": m.double(), "exp_avg_sq": v.double()}
        step_size = lr * math.sqrt(bias2) / bias1
    before = p.detach().clone()
    p.grad = grad.double()
    opt.step()
    torch.testing.assert_close(n.double(), (before - p.detach()) / step_size, rtol=1e-5,
                               atol=1e-8)


@pytest.mark.parametrize("side", ["right", "left"])
def test_reference_update_decay_order(side):
    """decay_before is ``mul_`` before the accumulate-GEMM, decay_after galore-torch's
    ``add_(param, alpha=-decay)`` after it; both bit for bit."""
    param = _rand(6, 4)
    low, basis = (_rand(6, 2, seed=1), _rand(2, 4, seed=2)) if side == "right" else \
        (_rand(2, 4, seed=1), _rand(6, 2, seed=2))

    got = param.clone()
    kernels.project_back_update(got, low, basis, side, -0.5, decay_before=0.1)
    want = param.mul(0.9)
    want.addmm_(*((low, basis) if side == "right" else (basis, low)), alpha=-0.5)
    assert torch.equal(got, want)

    got = param.clone()
    kernels.project_back_update(got, low, basis, side, -0.5, decay_after=0.1)
    want = param.clone()
    want.addmm_(*((low, basis) if side == "right" else (basis, low)), alpha=-0.5)
    want.add_(want, alpha=-0.1)
    assert torch.equal(got, want)

    got, direction = param.clone(), _rand(6, 4, seed=3)
    kernels.update_param(got, direction, 0.5, decay_before=0.1)
    assert torch.equal(got, param.mul(0.9).add_(direction, alpha=0.5))


def test_projector_without_apply_update_is_refused_at_construction():
    """``apply_update`` is the one abstract update method: a projector that implements only
    the rest cannot be built (it used to recurse between ``apply`` and ``apply_update``), and
    ``apply`` is ``apply_update`` without decay."""

    class NoUpdate(Projector):
        def has_subspace(self, state):
            return True

        def refresh(self, grad, state, group, rule=None):
            return None

        def project(self, grad, state, group):
            return grad

        def project_back(self, low, state, group):
            return low

    with pytest.raises(TypeError, match="apply_update"):
        NoUpdate()
    state = {"proj_right": _rand(3, 5, seed=1)}
    low, param = _rand(8, 3, seed=2), _rand(8, 5, seed=3)
    applied, updated = param.clone(), param.clone()
    SVDProjector().apply(applied, low, -0.3, state, {})
    SVDProjector().apply_update(updated, low, -0.3, state, {}, 0.0, 0.0)
    assert torch.equal(applied, updated) and not torch.equal(applied, param)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_reference_dct_scores_matmul_orientation(side, norm):
    """Scores of ``G Q^T``'s columns (right) or ``Q G``'s rows (left), ``Q`` rows = vectors."""
    grad = _rand(6, 9)
    n = 9 if side == "right" else 6
    q = torch.linalg.qr(_rand(n, n, seed=1))[0]
    coeffs = grad @ q.t() if side == "right" else q @ grad
    ord_ = 2 if norm == "l2" else 1
    want = torch.linalg.vector_norm(coeffs, ord=ord_, dim=0 if side == "right" else 1)
    torch.testing.assert_close(kernels.dct_scores_matmul(grad, q, side, norm), want)
