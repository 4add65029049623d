"""Behaviours of ``step()`` and of Adam's options that no other test pinned down: the
``closure`` argument and ``correct_bias=False`` (both formulas), each against an independent
reference (torch.optim.AdamW, galore-torch's AdamW, a loop written here)."""

import copy

import galore_torch
import pytest
import torch

import lowrank_optim as lo
from tests.helpers import lm_loss, tiny_llama, token_batches


# -- closure -----------------------------------------------------------------------------------
def _closure(model, opt, ids, calls):
    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = lm_loss(model, ids)
        loss.backward()
        return loss
    return closure


def test_closure_computes_the_gradients_and_its_loss_is_returned():
    """``step(closure)`` runs the closure once with gradients enabled (``step`` itself runs
    under ``no_grad``), steps on the gradients it computed and returns its loss: the same
    parameters as torch.optim.AdamW given the same closure (``formula="torch"``, no rank)."""
    ours_model, ref_model = tiny_llama(), tiny_llama()
    hp = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ours = lo.GaLoreAdamW(ours_model.parameters(), formula="torch", **hp)
    ref = torch.optim.AdamW(ref_model.parameters(), foreach=False, **hp)
    for ids in token_batches(4, seed=2):
        calls, ref_calls = [], []
        loss = ours.step(_closure(ours_model, ours, ids, calls))
        ref_loss = ref.step(_closure(ref_model, ref, ids, ref_calls))
        assert calls == [True] and ref_calls == [True]
        assert isinstance(loss, torch.Tensor) and torch.equal(loss, ref_loss)
    for (n, a), b in zip(ours_model.named_parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", ["galore_adamw", "dct_adamw8bit", "galore_adafactor"])
def test_closure_step_equals_backward_then_step(name):
    model = tiny_llama()
    other = copy.deepcopy(model)
    make = lambda m: lo.create_optimizer(m, name, rank=8, update_proj_gap=2)  # noqa: E731
    opt, opt2 = make(model), make(other)
    for ids in token_batches(3, seed=4):
        loss = opt.step(_closure(model, opt, ids, []))
        opt2.zero_grad()
        loss2 = lm_loss(other, ids)
        loss2.backward()
        assert opt2.step() is None
        assert torch.equal(loss, loss2)
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)


def test_closure_loss_is_returned_when_the_step_is_skipped():
    model = tiny_llama()
    opt = lo.create_optimizer(model, "galore_adamw", rank=8, nonfinite="skip")
    before = [p.detach().clone() for p in model.parameters()]
    ids = token_batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = lm_loss(model, ids)
        loss.backward()
        model.lm_head.weight.grad[0, 0] = float("nan")
        return loss

    with pytest.warns(RuntimeWarning, match="Skipping optimizer step"):
        loss = opt.step(closure)
    assert loss is not None and loss.isfinite() and opt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


# -- correct_bias=False --------------------------------------------------------------------------
def _run(opt, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        opt.step()


def _params_and_grads(seed=0, steps=6):
    g = torch.Generator().manual_seed(seed)
    shapes = [(24, 16), (16,)]
    params = [torch.randn(s, generator=g) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(steps)]
    return params, grads


@pytest.mark.parametrize("projected", [False, True], ids=["plain", "galore"])
def test_correct_bias_false_matches_galore_torch(projected):
    init, grads = _params_and_grads()
    hp = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1, correct_bias=False)
    results = {}
    for which in ("ours", "galore_torch", "ours_corrected"):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        groups = ([{"params": params[:1], "rank": 4, "update_proj_gap": 3, "scale": 0.5,
                    "proj_type": "std"}, {"params": params[1:]}] if projected else params)
        if which == "galore_torch":
            opt = galore_torch.GaLoreAdamW(groups, **hp)  # a group without rank: its AdamW
        else:
            opt = lo.GaLoreAdamW(groups, **{**hp, "correct_bias": which == "ours_corrected"})
        _run(opt, params, grads)
        results[which] = params
    for a, b in zip(results["ours"], results["galore_torch"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # not vacuous: the corrected run differs (the first step is 1 / (1 - b1) = 10x larger)
    assert any((a - b).abs().max() > 1e-3
               for a, b in zip(results["ours"], results["ours_corrected"], strict=True))


def test_correct_bias_false_with_the_torch_formula_is_uncorrected_adamw():
    """``formula="torch"`` (SSTAdamW's and GaLoreAdamW8bit's) with ``correct_bias=False``:
    AdamW without bias correction, written out here (decay first, ``lr * M / (sqrt(V) + eps)``);
    the option used to be ignored under this formula."""
    init, grads = _params_and_grads(seed=1)
    lr, (b1, b2), eps, wd = 1e-2, (0.9, 0.99), 1e-8, 0.1
    params = [torch.nn.Parameter(t.clone()) for t in init]
    opt = lo.GaLoreAdamW(params, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd,
                         formula="torch", correct_bias=False)
    _run(opt, params, grads)
    ref = [t.clone().double() for t in init]
    m = [torch.zeros_like(t) for t in ref]
    v = [torch.zeros_like(t) for t in ref]
    for step_grads in grads:
        for k, g in enumerate(step_grads):
            g = g.double()
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            ref[k] = ref[k] * (1 - lr * wd) - lr * m[k] / (v[k].sqrt() + eps)
    for a, b in zip(params, ref, strict=True):
        torch.testing.assert_close(a.detach().double(), b, rtol=1e-5, atol=1e-6)
    corrected = [t.clone().requires_grad_() for t in init]
    _run(torch.optim.AdamW(corrected, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd),
         corrected, grads)
    with torch.no_grad():  # not vacuous: torch's (corrected) AdamW ends elsewhere
        gap = max(float((a - b).abs().max()) for a, b in zip(params, corrected, strict=True))
    assert gap > 1e-3
