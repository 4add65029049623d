"""The multi-tensor path for unprojected parameters (torch's fused AdamW kernel) against
torch.optim.AdamW and the op-by-op reference, and the optimizers' use of it."""

import copy

import pytest
import torch

import lowrank_optim as lo
from lowrank_optim.kernels import multi_tensor, reference
from tests.helpers import spy_calls

SHAPES = [(37, 5), (16,), (1000,), (3, 7, 11)]  # odd sizes: the kernel's vector tails


def _tensors(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype) for s in SHAPES]


def _op_by_op(p, g, m, v, step, lr, b1, b2, eps, wd, formula):
    """The reference chain the per-tensor path runs (kernels.reference)."""
    bias1, bias2 = 1 - b1**step, 1 - b2**step
    n = reference.adam_update(g, m, v, b1, b2, eps, formula, bias2)
    if formula == "torch":
        reference.update_param(p, n, -lr / bias1, lr * wd, 0.0)
    else:
        reference.update_param(p, n, -lr * bias2**0.5 / bias1, 0.0, lr * wd)


@pytest.mark.parametrize("formula", ["torch", "galore"])
def test_fused_step_equals_the_reference_formula(formula):
    # eps and decay large enough that a misplaced eps or decay order shows (> 1e-4 relative)
    hp = dict(lr=3e-2, beta1=0.9, beta2=0.95, eps=1e-3, weight_decay=0.5)
    ps, gs = _tensors(0), _tensors(1)
    ms, vs = [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps]
    ref = [copy.deepcopy(x) for x in (ps, ms, vs)]
    steps = [torch.tensor(0.0) for _ in ps]
    for t in range(1, 6):
        for s in steps:
            s += 1
        multi_tensor.adamw_(ps, gs, ms, vs, steps, formula=formula, **hp)
        for p, g, m, v in zip(*ref[:1], gs, *ref[1:], strict=True):
            _op_by_op(p, g, m, v, t, hp["lr"], hp["beta1"], hp["beta2"], hp["eps"],
                      hp["weight_decay"], formula)
    for a, b in zip(ps + ms + vs, ref[0] + ref[1] + ref[2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    assert max(float((p - q).abs().max()) for p, q in zip(ps, _tensors(0), strict=True)) > 1e-2


def test_torch_formula_is_torch_adamw_fused_bit_for_bit():
    hp = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    ours = [torch.nn.Parameter(t) for t in _tensors(2)]
    theirs = [torch.nn.Parameter(t.clone()) for t in ours]
    opt = lo.GaLoreAdamW(ours, formula="torch", **hp)
    ref = torch.optim.AdamW(theirs, fused=True, **hp)
    for seed in range(4):
        for p, q, g in zip(ours, theirs, _tensors(10 + seed), strict=True):
            p.grad, q.grad = g, g.clone()
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs, strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("formula", ["torch", "galore"])
def test_each_tensor_gets_the_same_bits_alone_or_batched(formula, dtype):
    """step() batches a group's unprojected tensors; step_param (layer-wise updates) steps
    them one by one: the bits agree."""
    params = [torch.nn.Parameter(t) for t in _tensors(3, dtype)]
    alone = [torch.nn.Parameter(t.detach().clone()) for t in params]
    kw = dict(lr=1e-2, weight_decay=0.1, formula=formula)
    batched_opt, alone_opt = lo.GaLoreAdamW(params, **kw), lo.GaLoreAdamW(alone, **kw)
    for seed in range(3):
        for p, q, g in zip(params, alone, _tensors(20 + seed, dtype), strict=True):
            p.grad, q.grad = g, g.clone()
        batched_opt.step()
        with torch.no_grad():
            for i, q in enumerate(alone):
                alone_opt.step_param(q, alone_opt.param_groups[0], i)
    for p, q in zip(params, alone, strict=True):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(batched_opt.state[p][key], alone_opt.state[q][key])


def test_one_fused_call_per_group_and_per_tensor_fallbacks(monkeypatch):
    """Unprojected fp32 tensors of a group go through one call; projected weights, 8-bit
    moments and correct_bias=False take the per-tensor path."""
    calls = spy_calls(monkeypatch, multi_tensor, "adamw_")
    w = torch.nn.Parameter(torch.randn(64, 32))
    plain = [torch.nn.Parameter(torch.randn(s)) for s in [(32,), (64,), (50, 8)]]
    opt = lo.GaLoreAdamW([{"params": [w], "rank": 4}, {"params": plain}], lr=1e-2)
    for p in [w, *plain]:
        p.grad = torch.randn(p.shape)
    opt.step()
    assert len(calls) == 1
    no_bias = lo.GaLoreAdamW(plain, correct_bias=False)
    eight = lo.GaLoreAdamW(plain, bits=8, min_8bit_size=0)
    no_bias.step()
    eight.step()
    assert len(calls) == 1
    assert "exp_avg_codes" in eight.state[plain[2]]


def test_a_group_with_mixed_steps_matches_its_reference():
    """galore formula: tensors at different step counts (one added later) go in separate
    calls (its eps rescaling depends on the step)."""
    a, b = torch.nn.Parameter(torch.randn(40)), torch.nn.Parameter(torch.randn(40))
    ra, rb = (torch.nn.Parameter(x.detach().clone()) for x in (a, b))
    opt = lo.GaLoreAdamW([a, b], lr=1e-2)
    ref = [lo.GaLoreAdamW([ra], lr=1e-2), lo.GaLoreAdamW([rb], lr=1e-2)]
    a.grad, ra.grad = torch.ones(40), torch.ones(40)
    opt.step()  # b has no gradient: it stays at step 0
    ref[0].step()
    for x, y in ((a, ra), (b, rb)):
        x.grad = torch.randn(40, generator=torch.Generator().manual_seed(5))
        y.grad = x.grad.clone()
    opt.step()
    for r in ref:
        r.step()
    assert int(opt.state[a]["step"]) == 2 and int(opt.state[b]["step"]) == 1
    assert torch.equal(a, ra) and torch.equal(b, rb)
