"""``lowrank_optim.schedules`` in a plain training loop: refreshes requested at the steps the
schedule says (the same steps as ``SubspaceRefreshCallback`` under the Trainer's events), its
state through JSON, the optimizers it refuses, and no transformers / accelerate needed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import lowrank_optim as lo
from lowrank_optim.schedules import (
    AdaptiveGap,
    FixedGap,
    GrowingGap,
    RefreshScheduler,
    WarmupGap,
)
from tests.helpers import random_grads, stable_grads

ROOT = Path(__file__).resolve().parents[1]


def mlp(layers: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(16, 16, bias=False) for _ in range(layers)])


def galore(model: nn.Module, gap: int = 200) -> lo.GaLoreAdamW:
    return lo.GaLoreAdamW(lo.param_groups(model, rank=2, update_proj_gap=gap), lr=1e-3)


def refreshed_now(opt) -> list[int]:
    rows = opt.subspace_stats(energy=False)
    return [i for i, r in enumerate(rows) if r["steps_since_refresh"] == 1]


def plain_loop(opt, scheduler: RefreshScheduler, grads, steps: range) -> list[list[int]]:
    """A training loop without any framework; per step, the refreshed parameters' indices."""
    params = [p for _, p, _ in opt.projected_params()]
    refreshed = []
    for step in steps:
        scheduler.before_step(step)
        for p, g in zip(params, grads(step), strict=True):
            p.grad = g.clone()
        scheduler.before_optimizer_step(step)
        opt.step()
        scheduler.after_step(step)
        refreshed.append(refreshed_now(opt))
    return refreshed


def trainer_events(opt, callback, grads, steps: int) -> list[list[int]]:
    """The callback's events around ``opt.step()``, as the Trainer calls them."""
    from transformers import TrainerControl, TrainerState

    args, state, control = SimpleNamespace(), TrainerState(), TrainerControl()
    params = [p for _, p, _ in opt.projected_params()]
    callback.on_train_begin(args, state, control, optimizer=opt)
    refreshed = []
    for t in range(steps):
        callback.on_step_begin(args, state, control)
        for p, g in zip(params, grads(t), strict=True):
            p.grad = g.clone()
        callback.on_pre_optimizer_step(args, state, control)
        opt.step()
        callback.on_optimizer_step(args, state, control)
        refreshed.append(refreshed_now(opt))
        state.global_step += 1
    return refreshed


def steps_with_refreshes(refreshed: list[list[int]]) -> list[int]:
    return [t for t, ids in enumerate(refreshed) if ids]


def test_fixed_gap_requests_staggered_refreshes_at_the_scheduled_steps():
    opt = galore(mlp(4), gap=3)  # the scheduler must override this gap
    scheduler = RefreshScheduler(opt, FixedGap(4))
    assert all(g["update_proj_gap"] is None for g in opt.param_groups if g.get("rank"))
    params = [p for _, p, _ in opt.projected_params()]
    grads, requested, refreshed = random_grads(4), [], []
    for step in range(13):
        requested.append(scheduler.before_step(step))
        for p, g in zip(params, grads(step), strict=True):
            p.grad = g
        opt.step()
        assert scheduler.after_step(step) == requested[-1]  # every request was honoured
        refreshed.append(refreshed_now(opt))
    for i in range(4):  # layer i: phase i of the gap, then every 4 steps
        first = 4 - i
        assert [t for t, ids in enumerate(refreshed) if i in ids] == [0, *range(first, 13, 4)]
        assert [t for t, names in enumerate(requested) if f"{i}.weight" in names] == list(
            range(first, 13, 4))
    assert all(len(ids) <= 1 for ids in refreshed[1:])  # no periodic spike
    assert scheduler.gaps() == {f"{i}.weight": 4 for i in range(4)}


@pytest.mark.parametrize("schedule, stagger, grads, expected", [
    (FixedGap(5), False, random_grads(3), [0, 5, 10, 15]),
    (GrowingGap(2, 2.0), True, random_grads(1), [0, 2, 6, 14]),
    (WarmupGap(warmup_steps=5, warmup_gap=2, gap=5), True, random_grads(1), [0, 2, 4, 6, 11]),
    (AdaptiveGap(gap=2, overlap_threshold=0.9, max_gap=8), False, stable_grads(2),
     [0, 2, 6, 14]),
])
def test_schedules_in_a_plain_loop(schedule, stagger, grads, expected):
    n = len(grads(0))
    opt = galore(mlp(n))
    scheduler = RefreshScheduler(opt, schedule, stagger=stagger)
    assert steps_with_refreshes(plain_loop(opt, scheduler, grads, range(16))) == expected


def test_energy_check_refreshes_early_and_shrinks_the_gap():
    stable, rotated = stable_grads(1, noise=0.0), stable_grads(1, seed=7, noise=0.0)
    opt = galore(mlp(1))
    scheduler = RefreshScheduler(opt, AdaptiveGap(gap=100, overlap_threshold=None,
                                                  energy_threshold=0.5, check_every=1,
                                                  min_gap=10))
    refreshed = plain_loop(opt, scheduler, lambda t: stable(t) if t < 5 else rotated(t),
                           range(8))
    assert steps_with_refreshes(refreshed) == [0, 5] and scheduler.gaps() == {"0.weight": 50}


SAME_AS_CALLBACK = [
    (FixedGap(4), True, "random"), (FixedGap(3), False, "random"),
    (WarmupGap(warmup_steps=6, warmup_gap=2, gap=5), True, "random"),
    (GrowingGap(gap=2, factor=1.5, max_gap=9), True, "random"),
    (AdaptiveGap(gap=2, overlap_threshold=0.9, max_gap=8), True, "stable"),
    (AdaptiveGap(gap=4, overlap_threshold=None, energy_threshold=0.9, check_every=2,
                 min_gap=2), True, "random"),
]


@pytest.mark.parametrize("schedule, stagger, kind", SAME_AS_CALLBACK,
                         ids=lambda x: type(x).__name__ if not isinstance(x, (bool, str)) else
                         str(x))
def test_the_plain_loop_matches_the_trainer_callback(schedule, stagger, kind):
    pytest.importorskip("transformers")
    import trainer_callbacks as tc

    grads = {"random": random_grads, "stable": stable_grads}[kind]
    opt_a, opt_b = galore(mlp(3)), galore(mlp(3))
    scheduler = RefreshScheduler(opt_a, schedule, stagger=stagger)
    callback = tc.SubspaceRefreshCallback(schedule, stagger=stagger)
    plain = plain_loop(opt_a, scheduler, grads(3), range(20))
    assert plain == trainer_events(opt_b, callback, grads(3), 20)
    assert scheduler.layers == callback.layers and scheduler.gaps() == callback.gaps()
    assert callback.state()["attributes"]["layers"] == scheduler.state_dict()["layers"]


def test_state_dict_through_json_resumes_the_schedule_exactly():
    schedule = AdaptiveGap(gap=2, overlap_threshold=0.0, max_gap=16)
    opt = galore(mlp(3))
    full = plain_loop(opt, RefreshScheduler(opt, schedule), random_grads(3), range(14))

    grads = random_grads(3)  # the same gradients, in two runs
    opt = galore(mlp(3))
    scheduler = RefreshScheduler(opt, schedule)
    first = plain_loop(opt, scheduler, grads, range(7))
    saved = json.loads(json.dumps(scheduler.state_dict()))  # checkpointed as JSON
    assert any(layer["gap"] > 2 for layer in saved["layers"])

    resumed_opt = galore(mlp(3))
    resumed_opt.load_state_dict(opt.state_dict())
    resumed = RefreshScheduler(resumed_opt, schedule)
    resumed.load_state_dict(saved)
    assert resumed.start(7) == "restored"
    assert first + plain_loop(resumed_opt, resumed, grads, range(7, 14)) == full


def test_starting_late_without_state_rebuilds_from_the_last_refreshes(caplog):
    opt = galore(mlp(2))
    plain_loop(opt, RefreshScheduler(opt, FixedGap(3), stagger=False), random_grads(2),
               range(5))  # refreshes at 0 and 3
    scheduler = RefreshScheduler(opt, FixedGap(3), stagger=False)
    with caplog.at_level("WARNING", logger="lowrank_optim"):
        assert scheduler.before_step(5) == []
    assert "without saved schedule state" in caplog.text and "load_state_dict" in caplog.text
    assert [layer["next"] for layer in scheduler.layers] == [6, 6]


def test_load_state_dict_refuses_another_schedule_or_layer_count():
    opt = galore(mlp(2))
    scheduler = RefreshScheduler(opt, FixedGap(4))
    scheduler.start()
    state = scheduler.state_dict()
    with pytest.raises(ValueError, match="saved with schedule=FixedGap\\(gap=4\\)"):
        RefreshScheduler(galore(mlp(2)), FixedGap(5)).load_state_dict(state)
    with pytest.raises(ValueError, match="holds 2 layers, the optimizer projects 3"):
        RefreshScheduler(galore(mlp(3)), FixedGap(4)).load_state_dict(state)
    with pytest.raises(ValueError, match="expects the dict of state_dict"):
        scheduler.load_state_dict({"layers": []})


def test_optimizers_a_schedule_cannot_drive_are_refused():
    with pytest.raises(TypeError, match="RefreshScheduler needs a lowrank_optim.LowRankOptimizer"):
        RefreshScheduler(torch.optim.AdamW(mlp(1).parameters()))
    sst = lo.create_optimizer(mlp(1), "sst_adamw", rank=2)
    with pytest.raises(ValueError, match="iteration_length"):
        RefreshScheduler(sst)


def test_the_module_needs_neither_transformers_nor_accelerate():
    code = """
import sys
for name in ("transformers", "accelerate", "trainer_callbacks"):
    sys.modules[name] = None  # any import of them raises ImportError
import torch
import lowrank_optim as lo
from lowrank_optim.schedules import GrowingGap, RefreshScheduler

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False))
opt = lo.GaLoreAdamW(lo.param_groups(model, rank=2), lr=1e-3)
scheduler = RefreshScheduler(opt, GrowingGap(gap=2))
steps = []
for step in range(9):
    if scheduler.before_step(step):
        steps.append(step)
    model[0].weight.grad = torch.randn(8, 8)
    opt.step()
    scheduler.after_step(step)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("transformers", "accelerate")
                and sys.modules[m] is not None)
print(steps, loaded)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[-2] == "[2, 6] []"


def test_trainer_callbacks_reexports_every_schedule_name():
    import trainer_callbacks.refresh as refresh

    assert set(lo.schedules.__all__) <= set(refresh.__all__)
    assert [n for n in refresh.__all__ if not hasattr(refresh, n)] == []
