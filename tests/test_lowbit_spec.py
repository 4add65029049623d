"""8-bit state against an independent specification: the documented tables built in the test
(:mod:`tests.lowbit_spec`, numpy, nothing from the library), bitsandbytes' dynamic map and its
block-wise quantiser where installed, and 8-bit Adam steps and DCT moment rotations from a
*non-zero* quantised state decoded with the specification (a first step from zero moments
cannot tell the signed table from the unsigned one: both decode zero codes to zero)."""

import numpy as np
import pytest
import torch

import lowrank_optim as lo
from lowrank_optim import kernels
from lowrank_optim.kernels import blockwise as q
from tests import lowbit_spec as spec

CASES = [(code, signed) for code in ("dynamic", "linear") for signed in (True, False)]


def _bnb():
    try:
        import bitsandbytes.functional as functional
    except Exception:  # noqa: BLE001 - any import failure means "not installed here"
        return None
    return functional


needs_bnb = pytest.mark.skipif(_bnb() is None, reason="bitsandbytes is not installed")


def _data(shape, seed, signed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * torch.logspace(-5, 0, shape[-1])  # many decades
    return x if signed else x.square()


# -- the tables -------------------------------------------------------------------------------
@pytest.mark.parametrize(("code", "signed"), CASES)
def test_tables_are_the_documented_construction(code, signed):
    got = q.table(code, signed).double().numpy()
    want = spec.table(code, signed)
    assert got.shape == (256,)
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=0)
    assert np.all(np.diff(got) >= 0) and got[-1] == 1.0
    assert (got == 0).sum() == 1  # exactly one zero: zero moments are stored exactly


def test_dynamic_tables_span_seven_and_eight_decades():
    signed, unsigned = (q.table("dynamic", s).double().numpy() for s in (True, False))
    assert spec.decade_histogram(signed) == {-6: 1, -5: 2, -4: 4, -3: 8, -2: 16, -1: 32, 0: 65}
    assert spec.decade_histogram(unsigned) == {-7: 1, -6: 2, -5: 4, -4: 8, -3: 16, -2: 32,
                                               -1: 64, 0: 128}
    assert signed[signed > 0].min() == pytest.approx(1e-6)  # 10^-6 .. 1
    assert unsigned[unsigned > 0].min() == pytest.approx(1e-7)  # 10^-7 .. 1
    np.testing.assert_array_equal(signed[:127], -signed[128:255][::-1])  # mirrored


@needs_bnb
def test_signed_dynamic_table_has_bitsandbytes_decades():
    """The signed table has the decades of bitsandbytes' dynamic map (Dettmers et al.): the same
    number of levels in every decade, 127 negatives, one zero.  (The levels themselves differ:
    bitsandbytes takes the middle of each step, this library its upper end.)  The unsigned
    table has bitsandbytes' unsigned decades plus one more below: second moments span the
    square of the first moment's range."""
    bnb = _bnb()
    ours = q.table("dynamic", True).double().numpy()
    theirs = bnb.create_dynamic_map(signed=True).double().numpy()
    assert spec.decade_histogram(ours) == spec.decade_histogram(theirs)
    assert (ours < 0).sum() == (theirs < 0).sum() == 127
    ours_u = spec.decade_histogram(q.table("dynamic", False).double().numpy())
    theirs_u = spec.decade_histogram(bnb.create_dynamic_map(signed=False).double().numpy())
    assert min(ours_u) == min(theirs_u) - 1
    assert all(ours_u[k] * 2 >= theirs_u[k] for k in theirs_u)


# -- codes and values -------------------------------------------------------------------------
@pytest.mark.parametrize("block", [64, 100])
@pytest.mark.parametrize(("code", "signed"), CASES)
def test_codes_are_the_nearest_entry_of_the_documented_table(code, signed, block):
    x = _data((37, 53), seed=1, signed=signed)
    x.view(-1)[5] = 0.0  # an exact zero
    x.view(-1)[7] = 1e-12 * (x.view(-1)[7].sign() if signed else 1)  # far below every level
    codes, absmax = q.quantize(x, block, code, signed)
    want, want_absmax, tie = spec.quantize(x.numpy(), block, code, signed)
    np.testing.assert_array_equal(absmax.double().numpy(), want_absmax)
    got = codes.reshape(-1).long().numpy()
    assert np.all((got == want) | tie), np.flatnonzero((got != want) & ~tie)[:10]
    assert got[5] == spec.table(code, signed).tolist().index(0.0)
    values = q.dequantize(codes, absmax, block, code, signed).double().numpy().reshape(-1)
    np.testing.assert_allclose(values, spec.dequantize(got, want_absmax, block, code, signed),
                               rtol=1e-6, atol=0)
    if not signed:
        assert values[7] > 0  # a positive second moment never becomes zero


@needs_bnb
@pytest.mark.parametrize("signed", [True, False])
def test_codes_agree_with_bitsandbytes_blockwise_quantizer(signed):
    """bitsandbytes' quantize_blockwise, given our table, finds the same scales and the same
    codes, except where its search stops a level off: there our entry is the nearer one."""
    bnb = _bnb()
    x = torch.randn(37, 53, generator=torch.Generator().manual_seed(2))
    x = x if signed else x.abs()
    table = q.table("dynamic", signed)
    theirs, st = bnb.quantize_blockwise(x, code=table, blocksize=64)
    ours, absmax = q.quantize(x, 64, "dynamic", signed)
    assert torch.equal(absmax, st.absmax)
    normed = (x.reshape(-1) / absmax.repeat_interleave(64)[: x.numel()]).double()
    ours_err = (normed - table.double()[ours.reshape(-1).long()]).abs()
    theirs_err = (normed - table.double()[theirs.reshape(-1).long()]).abs()
    steps = (ours.reshape(-1).long() - theirs.reshape(-1).long()).abs()
    assert (steps == 0).float().mean() > 0.98
    assert torch.all(ours_err <= theirs_err + 1e-7)
    assert torch.equal(bnb.dequantize_blockwise(ours, st), q.dequantize(ours, absmax, 64,
                                                                        "dynamic", signed))


# -- 8-bit Adam from a non-zero state ---------------------------------------------------------
def _spec_moments(codes, absmax, block, code, signed, shape):
    return torch.from_numpy(spec.dequantize(codes.numpy(), absmax.numpy(), block, code,
                                            signed)).view(shape)


def _assert_stored(codes, absmax, want, block, code, signed):
    """``codes`` / ``absmax`` decode (by the specification) to ``want`` within its bound."""
    got = spec.dequantize(codes.numpy(), absmax.numpy(), block, code, signed)
    ref = want.double().numpy().reshape(-1)
    err = np.abs(got - ref)
    limit = spec.bound(ref, absmax.double().numpy(), block, code, signed)
    assert np.all(err <= limit), float((err - limit).max())
    np.testing.assert_allclose(absmax.double().numpy(), spec.absmax(ref, block), rtol=1e-6)


@pytest.mark.parametrize("code", ["dynamic", "linear"])
@pytest.mark.parametrize("formula", ["galore", "torch"])
def test_adam_8bit_step_from_a_nonzero_state(formula, code):
    block, b1, b2, eps, bias2 = 64, 0.9, 0.95, 1e-6, 0.3
    grad = _data((40, 24), seed=3, signed=True)
    m_codes, m_absmax = q.quantize(_data((40, 24), seed=4, signed=True), block, code, True)
    v_codes, v_absmax = q.quantize(_data((40, 24), seed=5, signed=False), block, code, False)
    m = _spec_moments(m_codes, m_absmax, block, code, True, grad.shape)
    v = _spec_moments(v_codes, v_absmax, block, code, False, grad.shape)
    g = grad.double()
    m1, v1 = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    denom = v1.sqrt() / (bias2**0.5 if formula == "torch" else 1.0) + eps
    want = m1 / denom
    direction = kernels.adam_update_8bit(grad, m_codes, m_absmax, v_codes, v_absmax, b1, b2,
                                         eps, formula, bias2, block, code)
    torch.testing.assert_close(direction.double(), want, rtol=2e-5, atol=1e-7)
    _assert_stored(m_codes, m_absmax, m1, block, code, True)
    _assert_stored(v_codes, v_absmax, v1, block, code, False)


def test_8bit_optimizer_second_step_follows_the_specification():
    """An 8-bit optimizer's parameter after a step from a non-zero state: AdamW (galore-torch's
    formula) on the moments that state decodes to under the documented tables."""
    lr, b1, b2, eps, wd, block = 1e-2, 0.9, 0.999, 1e-6, 0.1, 64
    w = torch.nn.Parameter(_data((48, 32), seed=6, signed=True))
    opt = lo.GaLoreAdamW([w], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, bits=8,
                         block_size=block, min_8bit_size=0)
    w.grad = _data((48, 32), seed=7, signed=True)
    opt.step()
    state = opt.state[w]
    m = _spec_moments(state["exp_avg_codes"], state["exp_avg_absmax"], block, "dynamic", True,
                      w.shape)
    v = _spec_moments(state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"], block, "dynamic",
                      False, w.shape)
    before = w.detach().double().clone()
    g = _data((48, 32), seed=8, signed=True)
    w.grad = g.clone()
    opt.step()
    g = g.double()
    m1, v1 = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    step_size = lr * (1 - b2**2) ** 0.5 / (1 - b1**2)
    want = before - step_size * m1 / (v1.sqrt() + eps)
    want = want - lr * wd * want  # galore-torch: decay after the update
    torch.testing.assert_close(w.detach().double(), want, rtol=1e-5, atol=1e-6)


# -- DCT rotation of 8-bit moments, at unit level ----------------------------------------------
def _aligned(shape, freqs, seed):
    """A gradient of ``shape`` whose DCT coefficients on its projected side (the smaller one,
    basis from scipy) are non-zero only at ``freqs``: a refresh selects exactly those."""
    from scipy.fft import dct

    right = shape[0] >= shape[1]
    n = shape[1] if right else shape[0]
    basis = torch.from_numpy(dct(np.eye(n), type=2, norm="ortho", axis=0)).float()  # rows
    coeff = torch.randn(max(shape), len(freqs), generator=torch.Generator().manual_seed(seed))
    return coeff @ basis[freqs] if right else basis[freqs].t() @ coeff.t()


def _moved(old, old_idx, new_idx, axis):
    """``old`` with its slots along ``axis`` following the frequencies from ``old_idx`` to
    ``new_idx``; slots of new frequencies are zero."""
    want = torch.zeros_like(old)
    for new_slot, freq in enumerate(new_idx):
        if freq in old_idx:
            want.select(axis, new_slot).copy_(old.select(axis, old_idx.index(freq)))
    return want


@pytest.mark.parametrize("shape", [(64, 16), (16, 64)], ids=["right", "left"])
def test_dct_refresh_rotates_8bit_moments_by_the_specification(shape):
    """A refresh that changes the selected frequencies re-expresses the 8-bit moments: the
    slots of frequencies that stay move with them, new ones start at zero (the paper's
    ``R_rot = Q_old Q_new^T``, a 0/1 matrix for an orthonormal basis), both moments requantised
    with their own table."""
    right = shape[0] >= shape[1]
    w = torch.nn.Parameter(torch.zeros(shape))
    opt = lo.DCTAdamW([{"params": [w], "rank": 4}], bits=8, min_8bit_size=0, block_size=32)
    w.grad = _aligned(shape, [0, 1, 2, 3], seed=0)
    opt.step()
    state, group = opt.state[w], opt.param_groups[0]
    assert state["proj_idx"].tolist() == [0, 1, 2, 3]
    low_shape = (shape[0], 4) if right else (4, shape[1])
    before = {name: _spec_moments(state[name + "_codes"], state[name + "_absmax"], 32,
                                  "dynamic", signed, low_shape)
              for name, signed in (("exp_avg", True), ("exp_avg_sq", False))}
    opt.projector.refresh(_aligned(shape, [2, 3, 4, 5], seed=1), state, group, opt.rule)
    assert state["proj_idx"].tolist() == [2, 3, 4, 5]
    for name, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        want = _moved(before[name], [0, 1, 2, 3], [2, 3, 4, 5], 1 if right else 0)
        assert want.abs().sum() > 0
        _assert_stored(state[name + "_codes"], state[name + "_absmax"], want, 32, "dynamic",
                       signed)


@pytest.mark.parametrize("shape", [(24, 8), (8, 24)], ids=["right", "left"])
def test_dct_refresh_rotates_adafactor_statistics_along_the_rank_axis(shape):
    """DCTAdafactor: the first moment and the factored statistic that keeps the rank axis (the
    column statistic on the right, the row statistic on the left) follow the frequencies; the
    statistic that averages the rank axis away is left as it was."""
    right = shape[0] >= shape[1]
    w = torch.nn.Parameter(torch.randn(shape))
    opt = lo.DCTAdafactor([{"params": [w], "rank": 3}], lr=1e-2, relative_step=False,
                          beta1=0.9)
    w.grad = _aligned(shape, [0, 2, 5], seed=2)
    opt.step()
    state, group = opt.state[w], opt.param_groups[0]
    assert state["proj_idx"].tolist() == [0, 2, 5]
    before = {k: state[k].clone() for k in ("exp_avg", "exp_avg_sq_row", "exp_avg_sq_col")}
    opt.projector.refresh(_aligned(shape, [1, 2, 5], seed=3), state, group, opt.rule)
    assert state["proj_idx"].tolist() == [1, 2, 5]
    rank_axis = 1 if right else 0
    assert torch.equal(state["exp_avg"], _moved(before["exp_avg"], [0, 2, 5], [1, 2, 5],
                                                rank_axis))
    kept, rotated = (("exp_avg_sq_row", "exp_avg_sq_col") if right
                     else ("exp_avg_sq_col", "exp_avg_sq_row"))
    assert torch.equal(state[rotated], _moved(before[rotated], [0, 2, 5], [1, 2, 5], 0))
    assert torch.equal(state[kept], before[kept])
