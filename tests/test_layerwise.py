"""Layer-wise updates: equal to regular steps (with gradient accumulation), lower peak memory,
learning-rate schedules, clipping and the settings this mode must refuse."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Trainer

import lowrank_optim as lo
import trainer_callbacks as tc
from lowrank_optim.layerwise import ACCUMULATOR_KEY, LayerwiseOptimizer
from tests.helpers import lm_loss, tiny_llama, token_batches
from tests.test_trainer_swap import (  # noqa: F401  (one_thread: autouse fixture)
    dataset,
    logged,
    losses,
    one_thread,
    settings,
    training_args,
)


def _loop(model, opt, batches, accumulation):
    """Plain training loop: ``accumulation`` micro-batches per ``opt.step()``."""
    for k in range(0, len(batches), accumulation):
        for ids in batches[k:k + accumulation]:
            (lm_loss(model, ids) / accumulation).backward()
        opt.step()
        opt.zero_grad()


# -- equality with regular steps ------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n in ("galore_adamw", "dct_adamw") if n in lo.available()])
def test_trainer_layerwise_equals_regular_with_accumulation(tmp_path, name):
    """Gradient accumulation 2 over 9 micro-batches (the last window is partial), subspaces
    refreshed every 2 steps by the callback: windows that accumulate the low-rank gradient
    and windows that accumulate the full one (refresh) both occur."""
    runs = {}
    for layerwise in (False, True):
        model = tiny_llama(seed=0)
        args = training_args(tmp_path / str(layerwise), max_steps=5, gradient_accumulation_steps=2,
                             max_grad_norm=0, lr_scheduler_type="linear", warmup_steps=1)
        kwargs = tc.lowrank_trainer_kwargs(model, name, args=args, layerwise=layerwise,
                                           refresh=tc.FixedGap(2), memory=False, stats=True,
                                           **settings(name))
        trainer = Trainer(model=model, args=args, train_dataset=dataset(36), **kwargs)
        trainer.train()
        runs[layerwise] = trainer
    regular, layerwise = runs[False], runs[True]
    assert isinstance(tc._common.innermost_optimizer(layerwise.optimizer), lo.LowRankOptimizer)
    assert tc._common.layerwise_optimizer(layerwise.optimizer) is not None
    assert len(losses(layerwise)) == 5
    # projecting each micro-batch and summing equals projecting the sum, to fp32 rounding
    assert losses(layerwise) == pytest.approx(losses(regular), rel=1e-5)
    # Adam divides by sqrt(v) + eps, which magnifies the rounding of tiny gradient entries (up
    # to ~4e-6 measured, with DCT's eps=1e-8); one step moves entries by ~lr = 1e-2
    for (n, a), b in zip(regular.model.named_parameters(), layerwise.model.parameters(),
                         strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=2e-5, msg=n)
    # the scheduler drives the real learning rate, and the Trainer logs it
    assert logged(layerwise, "learning_rate") == logged(regular, "learning_rate")
    assert logged(layerwise, "learning_rate") == pytest.approx([0, 1e-2, 7.5e-3, 5e-3, 2.5e-3])
    assert all(p.grad is None for p in layerwise.model.parameters())
    # diagnostics: energy needs the gradients (gone in layer-wise mode), overlap does not;
    # measuring energy in the regular run did not change its training (equal results above)
    assert len(logged(regular, "subspace/captured_energy/all")) == 4  # none before step 1
    assert logged(layerwise, "subspace/captured_energy/all") == []
    assert logged(layerwise, "subspace/overlap/all") == pytest.approx(
        logged(regular, "subspace/overlap/all"), abs=1e-4)
    assert len(logged(layerwise, "subspace/overlap/all")) >= 3


def test_lowrank_accumulator_replaces_full_gradient():
    model = tiny_llama()
    opt = lo.create_optimizer(model, "galore_adamw", rank=8, update_proj_gap=100, lr=1e-2)
    lw = LayerwiseOptimizer(opt, gradient_accumulation_steps=2)
    batches = token_batches(3, seed=2)
    _loop(model, lw, batches[:2], 2)  # first step: subspaces computed from full gradients
    lm_loss(model, batches[2]).backward()  # first micro-batch of the second window
    projected = {id(p) for _, p, _ in opt.projected_params()}
    for p in model.parameters():
        if id(p) in projected:
            assert p.grad is None  # the full gradient was projected and freed
            acc = opt.state[p][ACCUMULATOR_KEY]
            assert acc.numel() == 8 * max(p.shape)
        else:
            assert p.grad is not None  # unprojected: accumulates in .grad as usual
    held = lo.memory.state_bytes(opt).other
    assert held >= sum(opt.state[p][ACCUMULATOR_KEY].numel() * 4 for _, p, _ in
                       opt.projected_params())
    lw.zero_grad()  # dropping the window drops its accumulators
    assert all(ACCUMULATOR_KEY not in opt.state[p] for _, p, _ in opt.projected_params())


# -- memory -------------------------------------------------------------------------------------
def peak_allocated_bytes(fn) -> int:
    """Peak of the bytes PyTorch's CPU allocator holds while ``fn`` runs, above the start.

    Read from the allocation and free events of ``torch.profiler`` (``profile_memory=True``):
    each event carries the bytes allocated (> 0) or freed (< 0), so their running sum in time
    order is the live-tensor memory; blocks allocated before profiling do not count.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    assert events, "the profiler recorded no memory events"
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def test_layerwise_lowers_peak_memory():
    """Short sequences, so that gradients (not activations) dominate the peak."""
    batches = token_batches(8, batch=1, seq=8, seed=4)
    grad_bytes = sum(p.numel() * 4 for p in tiny_llama().parameters())
    peaks = {}
    for layerwise in (False, True):
        model = tiny_llama()
        opt = lo.create_optimizer(model, "galore_adamw", rank=8, update_proj_gap=100, lr=1e-2)
        step = LayerwiseOptimizer(opt, gradient_accumulation_steps=2) if layerwise else opt
        _loop(model, step, batches[:4], 2)  # state allocated, subspaces computed
        peaks[layerwise] = peak_allocated_bytes(lambda m=model, s=step: _loop(m, s, batches[4:], 2))
    # regular mode holds every full gradient at the end of backward; layer-wise mode holds
    # the low-rank accumulators and the gradients of the unprojected tensors
    saved = peaks[False] - peaks[True]
    print(f"peak allocated: regular {peaks[False]:,} B, layer-wise {peaks[True]:,} B, "
          f"all gradients {grad_bytes:,} B")
    assert saved > 0.3 * grad_bytes


# -- clipping -----------------------------------------------------------------------------------
def test_per_parameter_clipping_applies():
    batches = token_batches(2, seed=5)
    ref_model = tiny_llama()
    model = copy.deepcopy(ref_model)
    ref = lo.create_optimizer(ref_model, "galore_adamw", rank=8, lr=1e-2)
    lw = LayerwiseOptimizer(lo.create_optimizer(model, "galore_adamw", rank=8, lr=1e-2),
                            max_grad_norm=1e-3)
    for ids in batches:
        lm_loss(ref_model, ids).backward()
        for p in ref_model.parameters():  # what per-parameter clipping means
            torch.nn.utils.clip_grad_norm_([p], 1e-3)
        ref.step()
        ref.zero_grad()
        lm_loss(model, ids).backward()
        lw.step()
    for a, b in zip(ref_model.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    unclipped = tiny_llama()
    plain = LayerwiseOptimizer(lo.create_optimizer(unclipped, "galore_adamw", rank=8, lr=1e-2))
    for ids in batches:
        lm_loss(unclipped, ids).backward()
        plain.step()
    assert not all(torch.allclose(a, b) for a, b in zip(unclipped.parameters(),
                                                        model.parameters(), strict=True))


def test_trainer_global_clipping_is_refused(tmp_path):
    model = tiny_llama()
    args = training_args(tmp_path, max_steps=1, max_grad_norm=1.0)
    kwargs = tc.lowrank_trainer_kwargs(model, "galore_adamw", args=args, layerwise=True, rank=8)
    trainer = Trainer(model=model, args=args, train_dataset=dataset(4), **kwargs)
    with pytest.raises(ValueError, match="max_grad_norm=0"):
        trainer.train()


def test_trainer_logs_the_real_gradient_norm(tmp_path):
    """The Trainer's grad_norm reads freed gradients in layer-wise mode (0); the callback logs
    the norm of the gradients the step used: equal to the regular run's, step by step."""
    norms = {}
    for layerwise in (False, True):
        model = tiny_llama(seed=0)
        args = training_args(tmp_path / str(layerwise), max_steps=3, max_grad_norm=0)
        trainer = Trainer(model=model, args=args, train_dataset=dataset(12))
        callbacks = tc.attach(trainer, "galore_adamw", layerwise=layerwise, memory=False,
                              **settings("galore_adamw"))
        if layerwise:  # ahead of the report_to integrations, which read the same logs dict
            assert trainer.callback_handler.callbacks[0] is callbacks[-1]
        trainer.train()
        norms[layerwise] = logged(trainer, "grad_norm")
    assert len(norms[True]) == 3 and min(norms[True]) > 0
    assert norms[True] == pytest.approx(norms[False], rel=1e-5)


# -- what layer-wise mode refuses -----------------------------------------------------------------
def test_accumulation_mismatch_is_detected():
    model = tiny_llama()
    lw = LayerwiseOptimizer(lo.create_optimizer(model, "galore_adamw", rank=8))
    for ids in token_batches(2, seed=6):
        lm_loss(model, ids).backward()  # 2 micro-batches, but the wrapper was told 1
    with pytest.raises(RuntimeError, match="gradient_accumulation_steps=1"):
        lw.step()


def test_refuses_optimizers_it_cannot_step_per_parameter():
    with pytest.raises(TypeError, match="LowRankOptimizer"):
        LayerwiseOptimizer(torch.optim.AdamW(tiny_llama().parameters()))
    if "sst_adamw" in lo.available():
        with pytest.raises(ValueError, match="not layer-wise capable"):
            LayerwiseOptimizer(lo.create_optimizer(tiny_llama(), "sst_adamw", rank=8))
    if "dct_adamw" in lo.available():
        model = tiny_llama()
        groups = lo.param_groups(model, rank=8, update_proj_gap=1, error_feedback=True)
        with pytest.raises(ValueError, match="error_feedback"):
            LayerwiseOptimizer(lo.DCTAdamW(groups), gradient_accumulation_steps=2)


def test_nonfinite_gradient_in_layerwise_mode():
    model = tiny_llama()
    opt = lo.create_optimizer(model, "galore_adamw", rank=8, nonfinite="skip")
    LayerwiseOptimizer(opt)  # steps happen in the hooks, during backward
    head = model.lm_head.weight
    before = head.detach().clone()
    head.register_hook(lambda g: torch.full_like(g, float("nan")))
    with pytest.warns(RuntimeWarning, match="lm_head"):
        lm_loss(model, token_batches(1)[0]).backward()
    assert torch.equal(head, before) and opt.skipped_steps == 1
    assert opt.state[model.model.layers[0].self_attn.q_proj.weight]["step"] == 1
