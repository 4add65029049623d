"""Refresh schedules, subspace diagnostics and the memory callback, driven without a Trainer
(the callback events are called in the Trainer's order on a small model)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import TrainerControl, TrainerState

import lowrank_optim as lo
import trainer_callbacks as tc
from tests.helpers import random_grads, stable_grads
from tests.test_trainer_swap import one_thread  # noqa: F401  (autouse fixture)
from trainer_callbacks.refresh import schedule_to_dict
from trainer_callbacks.stats import aggregate


def mlp(seed: int = 0, layers: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(16, 16, bias=False) for _ in range(layers)])


def galore(model: nn.Module, rank: int = 2, **kwargs) -> lo.GaLoreAdamW:
    groups = lo.param_groups(model, rank=rank, update_proj_gap=kwargs.pop("gap", 200))
    return lo.GaLoreAdamW(groups, lr=1e-3, **kwargs)


def drive(opt, callback, grads, steps: int) -> list[list[int]]:
    """Call the callback's events around ``opt.step()`` as the Trainer does; ``grads(t)`` gives
    the gradient of each projected parameter at step ``t``.  Returns, per step, the indices of
    the parameters whose subspace was refreshed in it."""
    args = SimpleNamespace(logging_steps=1, report_to=[], max_grad_norm=0)
    state, control = TrainerState(), TrainerControl()
    params = [p for _, p, _ in opt.projected_params()]
    callback.on_train_begin(args, state, control, optimizer=opt)
    refreshed = []
    for t in range(steps):
        callback.on_step_begin(args, state, control, optimizer=opt)
        for p, g in zip(params, grads(t), strict=True):
            p.grad = g.clone()
        callback.on_pre_optimizer_step(args, state, control, optimizer=opt)
        opt.step()
        callback.on_optimizer_step(args, state, control, optimizer=opt)
        rows = opt.subspace_stats(energy=False)
        refreshed.append([i for i, r in enumerate(rows) if r["steps_since_refresh"] == 1])
        state.global_step += 1
        callback.on_step_end(args, state, control, optimizer=opt)
    return refreshed


# -- schedules ------------------------------------------------------------------------------
def test_schedule_rules():
    assert tc.FixedGap(5).next_gap(step=100, gap=5, overlap=1.0) == 5
    warm = tc.WarmupGap(warmup_steps=10, warmup_gap=2, gap=8)
    assert warm.initial_gap() == 2
    assert warm.next_gap(step=9, gap=2, overlap=None) == 2
    assert warm.next_gap(step=10, gap=2, overlap=None) == 8
    grow = tc.GrowingGap(gap=3, factor=2.0, max_gap=10)
    assert [grow.next_gap(step=0, gap=g, overlap=None) for g in (3, 6, 10)] == [6, 10, 10]
    adaptive = tc.AdaptiveGap(gap=4, overlap_threshold=0.4, max_gap=12, min_gap=2)
    assert adaptive.next_gap(step=0, gap=4, overlap=0.5) == 8
    assert adaptive.next_gap(step=0, gap=8, overlap=0.9) == 12
    assert adaptive.next_gap(step=0, gap=4, overlap=0.3) == 4
    assert adaptive.next_gap(step=0, gap=4, overlap=None) == 4
    assert adaptive.shrunk_gap(4) == 2 and adaptive.shrunk_gap(2) == 2


@pytest.mark.parametrize("schedule", [
    tc.FixedGap(7), tc.WarmupGap(5, 2, 9), tc.GrowingGap(3, 1.5, 40),
    tc.AdaptiveGap(gap=6, energy_threshold=0.5, check_every=3),
])
def test_schedule_dict_roundtrip(schedule):
    spec = json.loads(json.dumps(schedule_to_dict(schedule)))
    assert tc.make_schedule(spec) == schedule


def test_schedule_validation():
    with pytest.raises(ValueError, match="gap"):
        tc.FixedGap(0)
    with pytest.raises(ValueError, match="overlap_threshold"):
        tc.AdaptiveGap(overlap_threshold=1.5)
    with pytest.raises(ValueError, match="factor"):
        tc.GrowingGap(factor=0.5)
    with pytest.raises(ValueError, match="kind"):
        tc.make_schedule({"kind": "cosine"})
    assert tc.make_schedule(12) == tc.FixedGap(12) and tc.make_schedule("adaptive").gap == 200


# -- refresh callback -----------------------------------------------------------------------
def test_fixed_gap_staggered_refresh_steps():
    model = mlp(layers=4)
    opt = galore(model, gap=3)  # the callback must override this hidden gap
    cb = tc.SubspaceRefreshCallback(tc.FixedGap(4), stagger=True)
    refreshed = drive(opt, cb, random_grads(4), steps=13)
    assert all(g["update_proj_gap"] is None for g in opt.param_groups if g.get("rank"))
    # layer i: first subspace at step 0, then at 4 - i (phases 0, 1, 2, 3 of a gap of 4),
    # then every 4 steps
    for i in range(4):
        steps = [t for t, ids in enumerate(refreshed) if i in ids]
        first = 4 - i
        assert steps == [0, *range(first, 13, 4)], (i, steps)
    # after step 0 no two layers refresh together: no periodic spike
    assert all(len(ids) <= 1 for ids in refreshed[1:])


def test_unstaggered_fixed_gap_refreshes_all_layers_together():
    opt = galore(mlp(layers=3))
    refreshed = drive(opt, tc.SubspaceRefreshCallback(5, stagger=False), random_grads(3), 11)
    assert [t for t, ids in enumerate(refreshed) if ids] == [0, 5, 10]
    assert all(ids == [0, 1, 2] for ids in refreshed if ids)


def test_growing_and_warmup_gaps():
    opt = galore(mlp(layers=1))
    refreshed = drive(opt, tc.SubspaceRefreshCallback(tc.GrowingGap(2, 2.0)), random_grads(1), 16)
    assert [t for t, ids in enumerate(refreshed) if ids] == [0, 2, 6, 14]
    opt = galore(mlp(layers=1))
    cb = tc.SubspaceRefreshCallback(tc.WarmupGap(warmup_steps=5, warmup_gap=2, gap=5))
    refreshed = drive(opt, cb, random_grads(1), 16)
    assert [t for t, ids in enumerate(refreshed) if ids] == [0, 2, 4, 6, 11]


def test_adaptive_gap_doubles_when_subspaces_agree():
    opt = galore(mlp(layers=2))
    cb = tc.SubspaceRefreshCallback(tc.AdaptiveGap(gap=2, overlap_threshold=0.9, max_gap=8),
                                    stagger=False)
    refreshed = drive(opt, cb, stable_grads(2), steps=20)
    assert [t for t, ids in enumerate(refreshed) if ids] == [0, 2, 6, 14]
    assert set(cb.gaps().values()) == {8}
    assert all(r["overlap"] > 0.99 for r in opt.subspace_stats(energy=False))


def test_adaptive_gap_stays_when_subspaces_differ():
    opt = galore(mlp(layers=2))
    cb = tc.SubspaceRefreshCallback(tc.AdaptiveGap(gap=2, overlap_threshold=0.9), stagger=False)
    refreshed = drive(opt, cb, random_grads(2), steps=9)
    assert [t for t, ids in enumerate(refreshed) if ids] == [0, 2, 4, 6, 8]
    assert set(cb.gaps().values()) == {2}
    # random 16x16 gradients: two rank-2 subspaces overlap by about 2/16
    assert all(r["overlap"] < 0.6 for r in opt.subspace_stats(energy=False))


def test_energy_threshold_refreshes_early_and_shrinks_gap():
    stable = stable_grads(1, noise=0.0)
    rotated = stable_grads(1, seed=7, noise=0.0)  # a different rank-2 gradient from step 5
    opt = galore(mlp(layers=1))
    cb = tc.SubspaceRefreshCallback(tc.AdaptiveGap(
        gap=100, overlap_threshold=None, energy_threshold=0.5, check_every=1, min_gap=10))
    refreshed = drive(opt, cb, lambda t: stable(t) if t < 5 else rotated(t), steps=8)
    assert [t for t, ids in enumerate(refreshed) if ids] == [0, 5]
    assert cb.gaps() == {"0.weight": 50}


def test_refresh_callback_state_roundtrip():
    opt = galore(mlp(layers=3))
    cb = tc.SubspaceRefreshCallback(tc.AdaptiveGap(gap=2, overlap_threshold=0.0))
    drive(opt, cb, random_grads(3), steps=7)
    exported = json.loads(json.dumps(cb.state()))  # what trainer_state.json holds
    restored = tc.SubspaceRefreshCallback.from_state(exported)
    assert restored.schedule == cb.schedule and restored.layers == cb.layers
    assert any(layer["gap"] > 2 for layer in cb.layers)


def test_refresh_callback_rejects_what_it_cannot_drive():
    args, state, control = SimpleNamespace(), TrainerState(), TrainerControl()
    adamw = torch.optim.AdamW(mlp().parameters())
    with pytest.raises(TypeError, match="LowRankOptimizer"):
        tc.SubspaceRefreshCallback().on_train_begin(args, state, control, optimizer=adamw)
    if "sst_adamw" in lo.available():
        model = mlp()
        sst = lo.create_optimizer(model, "sst_adamw", rank=2)
        with pytest.raises(ValueError, match="iteration_length"):
            tc.SubspaceRefreshCallback().on_train_begin(args, state, control, optimizer=sst)


# -- subspace statistics ----------------------------------------------------------------------
def test_captured_energy_matches_the_projection():
    model = mlp(layers=1)
    opt = galore(model, rank=4)
    w = model[0].weight
    w.grad = torch.randn(16, 16)
    opt.step()
    w.grad = torch.randn(16, 16)
    (row,) = opt.subspace_stats()
    basis = opt.state[w]["proj_right"]  # 16 >= 16: right side, rows are the basis
    kept = w.grad @ basis.t() @ basis
    assert row["captured_energy"] == pytest.approx(
        float(kept.square().sum() / w.grad.square().sum()), rel=1e-5)
    assert row["step"] == 1 and row["refresh_step"] == 0 and row["steps_since_refresh"] == 1
    w.grad = torch.randn(16, 4) @ basis  # inside the subspace
    assert opt.subspace_stats()[0]["captured_energy"] == pytest.approx(1.0, abs=1e-5)
    w.grad = None
    assert opt.subspace_stats()[0]["captured_energy"] is None


def test_overlap_is_recorded_only_when_tracked():
    model = mlp(layers=1)
    opt = galore(model, rank=3, gap=1)
    w = model[0].weight
    fixed = torch.randn(16, 16)
    for _ in range(2):
        w.grad = fixed.clone()
        opt.step()
    assert opt.subspace_stats(energy=False)[0]["overlap"] is None
    opt.track_subspace_overlap(True)
    w.grad = -fixed  # same singular subspace, flipped signs
    opt.step()
    assert opt.subspace_stats(energy=False)[0]["overlap"] == pytest.approx(1.0, abs=1e-5)
    opt.track_subspace_overlap(False)
    assert opt.subspace_stats(energy=False)[0]["overlap"] is None


def test_svd_overlap_values():
    proj = lo.projectors.SVDProjector()
    q, _ = torch.linalg.qr(torch.randn(16, 16))
    a, b = {"proj_right": q[:4]}, {"proj_right": q[4:8]}
    assert float(proj.overlap(a, a, {})) == pytest.approx(1.0, abs=1e-5)
    assert float(proj.overlap(a, b, {})) == pytest.approx(0.0, abs=1e-5)
    half = {"proj_right": torch.cat([q[:2], q[8:10]])}
    assert float(proj.overlap(a, half, {})) == pytest.approx(0.5, abs=1e-5)
    left = {"proj_left": q[:, :4]}, {"proj_left": q[:, 2:6]}
    assert float(proj.overlap(*left, {})) == pytest.approx(0.5, abs=1e-5)


@pytest.mark.skipif("dct_adamw" not in lo.available(), reason="DCT optimizer not present")
def test_dct_energy_and_overlap_leave_state_untouched():
    model = mlp(layers=1)
    groups = lo.param_groups(model, rank=4, update_proj_gap=1, error_feedback=True)
    opt = lo.DCTAdamW(groups, lr=1e-3)
    opt.track_subspace_overlap(True)
    w = model[0].weight
    for _ in range(3):
        w.grad = torch.randn(16, 16)
        opt.step()
    w.grad = torch.randn(16, 16)
    before = {k: v.clone() for k, v in opt.state[w].items()}
    (row,) = opt.subspace_stats()
    after = opt.state[w]
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # error feedback untouched
    assert 0.0 < row["captured_energy"] < 1.0
    assert row["overlap"] in {i / 4 for i in range(5)}  # share of kept DCT indices


def test_aggregate_by_layer_type():
    rows = [
        {"name": "model.layers.0.self_attn.q_proj.weight", "captured_energy": 0.2,
         "overlap": None, "steps_since_refresh": 1},
        {"name": "model.layers.1.self_attn.q_proj.weight", "captured_energy": 0.4,
         "overlap": 0.5, "steps_since_refresh": 3},
        {"name": "model.layers.0.mlp.down_proj.weight", "captured_energy": None,
         "overlap": None, "steps_since_refresh": 2},
    ]
    out = aggregate(rows)
    assert out["subspace/captured_energy/q_proj"] == pytest.approx(0.3)
    assert out["subspace/captured_energy/all"] == pytest.approx(0.3)
    assert out["subspace/overlap/q_proj"] == 0.5 and "subspace/overlap/down_proj" not in out
    assert out["subspace/steps_since_refresh/all"] == pytest.approx(2.0)


# -- memory callback --------------------------------------------------------------------------
def test_memory_callback_metrics_and_table(capsys):
    model = mlp(layers=2)
    opt = galore(model, rank=4)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    cb = tc.OptimizerMemoryCallback(every=1)
    args = SimpleNamespace(logging_steps=1, report_to=[])
    state = TrainerState(global_step=1)
    cb.on_step_end(args, state, TrainerControl(), optimizer=opt)
    assert state.log_history == []  # no row of its own: the keys join the Trainer's rows
    # what Trainer.log does: append a copy of the row, then call on_log with the row itself
    logs = {"loss": 2.5, "learning_rate": 1e-3}
    state.log_history.append({**logs, "step": 1})
    cb.on_log(args, state, TrainerControl(), logs=logs, optimizer=opt)
    (entry,) = state.log_history
    assert entry == {**logs, "step": 1} and entry["loss"] == 2.5
    counts = lo.memory.state_bytes(opt)
    assert entry["optimizer_state/moments_bytes"] == counts.moments == 2 * (2 * 4 * 16 * 4)
    assert entry["optimizer_state/projectors_bytes"] == counts.projectors == 2 * 4 * 16 * 4
    assert entry["optimizer_state/total_bytes"] == counts.total
    adamw = lo.memory.adamw_state_bytes(model.parameters())
    assert entry["optimizer_state/adamw_ratio"] == pytest.approx(counts.total / adamw)
    assert entry["memory/peak_rss_bytes"] > 0 and entry["step"] == 1
    out = capsys.readouterr().out
    assert "GaLoreAdamW" in out and f"{adamw:,}" in out and f"{counts.total:,}" in out
    cb.on_step_end(args, state, TrainerControl(), optimizer=opt)
    assert "GaLoreAdamW" not in capsys.readouterr().out  # printed once
