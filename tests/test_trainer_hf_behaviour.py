"""``trainer_callbacks`` behaves as the Trainer's own optimizers and logging do: Adafactor
settings of ``optim="galore_adafactor"``, one ``log_history`` row per logging step (read back
by index, as HF's own Trainer tests do), and ``target_modules`` against HF's
``optim_target_modules="all-linear"``."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, get_scheduler

import lowrank_optim as lo
import trainer_callbacks as tc
from tests.helpers import tiny_llama
from tests.test_trainer_swap import dataset, losses, one_thread, training_args  # noqa: F401

galore_torch = pytest.importorskip("galore_torch")

RANK, GAP, SCALE, LR = 8, 4, 0.25, 1e-2


def _hf(tmp_path, optim: str, targets, steps: int = 6) -> Trainer:
    args = training_args(tmp_path / "hf", optim=optim, optim_target_modules=targets,
                         optim_args=f"rank={RANK}, update_proj_gap={GAP}, scale={SCALE}",
                         max_steps=steps, learning_rate=LR)
    trainer = Trainer(model=tiny_llama(seed=0), args=args, train_dataset=dataset())
    trainer.train()
    return trainer


@pytest.mark.parametrize("name", ["galore_adafactor", "dct_adafactor"])
def test_attach_adafactor_with_default_settings_trains(tmp_path, name, caplog):
    """attach(trainer, "galore_adafactor") with nothing but the rank: the Trainer's
    learning rate, relative_step=False and scale_parameter=False, as HF's own
    optim="galore_adafactor" (which would otherwise be refused: a manual lr with Adafactor's
    default relative_step=True)."""
    trainer = Trainer(model=tiny_llama(seed=0), train_dataset=dataset(),
                      args=training_args(tmp_path, max_steps=6, learning_rate=LR))
    with caplog.at_level("INFO", logger="lowrank_optim"):
        tc.attach(trainer, name, rank=RANK, memory=False)
    group = trainer.optimizer.param_groups[0]
    assert (group["lr"], group["relative_step"], group["scale_parameter"]) == (LR, False, False)
    (summary,) = [r.message for r in caplog.records if "projection for" in r.message]
    assert f"lr={LR}" in summary and "lr from TrainingArguments.learning_rate" in summary
    assert "relative_step=False, scale_parameter=False" in summary
    trainer.train()
    curve = losses(trainer)
    assert len(curve) == 6 and curve[-1] < 0.8 * curve[0]


def test_attach_galore_adafactor_tracks_the_trainers_builtin(tmp_path):
    """Same model, seed, data and settings as HF's optim="galore_adafactor" (galore-torch's
    GaLoreAdafactor): the loss curves agree, so attach() completes the settings as HF does."""
    targets = ["self_attn", "mlp"]
    hf = _hf(tmp_path, "galore_adafactor", targets)
    hf_group = next(g for g in hf.optimizer.param_groups if "rank" in g)
    assert (hf_group["relative_step"], hf_group["scale_parameter"]) == (False, False)

    ours = Trainer(model=tiny_llama(seed=0), train_dataset=dataset(),
                   args=training_args(tmp_path / "ours", max_steps=6, learning_rate=LR))
    tc.attach(ours, "galore_adafactor", target_modules=targets, rank=RANK,
              update_proj_gap=GAP, scale=SCALE, memory=False)
    ours.train()
    a, b = losses(hf), losses(ours)
    assert len(a) == len(b) == 6 and a[0] == b[0]
    assert b == pytest.approx(a, rel=1e-4)
    assert abs(a[-1] - a[0]) > 100 * 1e-4 * a[0]  # the tolerance is far below the change


def test_log_history_has_one_row_per_logging_step_read_by_index(tmp_path, capsys):
    """HF's Trainer tests read log_history[i]["learning_rate"]: our metrics join the
    Trainer's rows instead of adding rows, so index i is still logging step i."""
    steps, warmup = 6, 2
    args = training_args(tmp_path, max_steps=steps, logging_steps=1, learning_rate=LR,
                         lr_scheduler_type="linear", warmup_steps=warmup)
    trainer = Trainer(model=tiny_llama(seed=0), args=args, train_dataset=dataset())
    tc.attach(trainer, "galore_adamw", rank=RANK, update_proj_gap=GAP, stats=True,
              refresh=tc.FixedGap(gap=GAP))
    trainer.train()
    history = trainer.state.log_history
    assert len(history) == steps + 1  # one row per step, then the train summary
    assert "train_runtime" in history[-1]
    # what the Trainer's own scheduler gives at each logged step
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR)
    sched = get_scheduler("linear", probe, num_warmup_steps=warmup, num_training_steps=steps)
    expected = []
    for _ in range(steps):  # the Trainer logs the rate the step used, then steps it
        expected.append(sched.get_last_lr()[0])
        probe.step()
        sched.step()
    for i in range(steps):
        row = history[i]
        assert row["step"] == i + 1
        assert row["learning_rate"] == pytest.approx(expected[i], rel=1e-12)
        assert "loss" in row and "optimizer_state/total_bytes" in row
        assert "subspace/captured_energy/all" in row and "subspace/overlap/all" in row \
            or i == 0  # overlap exists once a layer has refreshed twice
    assert all("optimizer_state/total_bytes" not in h for h in history[steps:])
    # the console printer sees the same rows (it runs after our callbacks)
    printed = [line for line in capsys.readouterr().out.splitlines() if "'loss'" in line]
    assert len(printed) == steps and all("optimizer_state/total_bytes" in x for x in printed)


def test_every_keeps_the_rows_and_thins_our_keys(tmp_path):
    args = training_args(tmp_path, max_steps=6, logging_steps=1)
    trainer = Trainer(model=tiny_llama(seed=0), args=args, train_dataset=dataset())
    tc.attach(trainer, "galore_adamw", rank=RANK, memory=False)
    trainer.add_callback(tc.OptimizerMemoryCallback(every=3, print_table=False).bind(trainer))
    trainer.train()
    rows = trainer.state.log_history[:-1]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if "optimizer_state/total_bytes" in r] == [3, 6]


def _projected(opt) -> set[int]:
    return {id(p) for g in opt.param_groups if g.get("rank") for p in g["params"]}


@pytest.mark.parametrize("tie", [False, True])
def test_all_linear_against_hf_optim_target_modules(tmp_path, tie):
    """HF's optim_target_modules="all-linear" projects lm_head too (unless it is tied to the
    embedding); ours "all-linear" leaves it out (peft's convention and the GaLore paper's),
    "all-linear+head" selects exactly what HF selects."""
    args = training_args(tmp_path, optim="galore_adamw", optim_target_modules="all-linear",
                         optim_args=f"rank={RANK}")
    model = tiny_llama(seed=0, tie_word_embeddings=tie)
    hf = Trainer(model=model, args=args, train_dataset=dataset(8))
    hf.create_optimizer()
    theirs = _projected(hf.optimizer)
    head = {id(model.lm_head.weight)}
    plus = _projected(lo.create_optimizer(model, "galore_adamw", rank=RANK,
                                          target_modules="all-linear+head"))
    plain = _projected(lo.create_optimizer(model, "galore_adamw", rank=RANK))
    assert plus == theirs
    assert plain == theirs - head
    assert len(theirs) == (14 if tie else 15)
