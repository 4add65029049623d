"""Every optimizer in a real ``transformers.Trainer``: the swap routes, LR schedules, logged
metrics (log_history, wandb offline, tensorboard).

Helpers here (:func:`dataset`, :func:`training_args`, :data:`SETTINGS`) are shared with the
other ``test_trainer_*`` / ``test_layerwise`` modules.
"""

from __future__ import annotations

import glob
import json
import math
import struct
import time

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

import lowrank_optim as lo
import trainer_callbacks as tc
from tests.helpers import tiny_llama, token_batches

#: per-optimizer settings for the tiny LLaMA (rank 8 of 64; refresh every 4 steps)
SETTINGS: dict[str, dict] = {
    "galore_adamw": dict(rank=8, update_proj_gap=4, scale=0.25, lr=1e-2),
    "galore_adafactor": dict(rank=8, update_proj_gap=4, scale=0.25, lr=1e-2,
                             relative_step=False, scale_parameter=False),
    "dct_adamw": dict(rank=8, update_proj_gap=4, lr=1e-2),
    "dct_adafactor": dict(rank=8, update_proj_gap=4, lr=1e-2, relative_step=False,
                          scale_parameter=False),
    "sst_adamw": dict(rank=8, lr=1e-2, iteration_length=4),
    # rank 1 and one factor per tensor learn more slowly per step: a larger lr for 6 steps
    "apollo_mini": dict(rank=1, lr=3e-2),
}
#: every low-rank optimizer of the registry (a new one without settings gets rank 8, lr 1e-2)
LOWRANK = [n for n in lo.available() if n not in ("adamw",)]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one intra-op thread is as fast, and 10-20x faster than two on a busy
    machine (OpenMP threads wait on each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def settings(name: str) -> dict:
    return dict(SETTINGS.get(name, dict(rank=8, lr=1e-2)))


def dataset(n: int = 32, seq: int = 32, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """``n`` sequences of repeated random motifs (learnable in a few steps)."""
    ids = torch.cat(token_batches(math.ceil(n / 4), batch=4, seq=seq, seed=seed))[:n]
    return [{"input_ids": x, "labels": x.clone()} for x in ids]


def training_args(tmp_path, **overrides) -> TrainingArguments:
    """CPU, no reporting, no checkpoints, log every step, constant LR unless overridden."""
    kwargs = dict(
        output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], disable_tqdm=True,
        per_device_train_batch_size=4, max_steps=8, logging_steps=1, save_strategy="no",
        seed=0, learning_rate=1e-2, lr_scheduler_type="constant", max_grad_norm=1.0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def losses(trainer: Trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def logged(trainer: Trainer, key: str) -> list[float]:
    return [h[key] for h in trainer.state.log_history if key in h]


# -- the swap, for every optimizer -----------------------------------------------------------
@pytest.mark.parametrize("name", LOWRANK)
def test_trainer_trains_every_optimizer_with_callbacks(tmp_path, name):
    """optimizers=(opt, None) via lowrank_trainer_kwargs; loss drops; metrics are logged."""
    model = tiny_llama()
    args = training_args(tmp_path, max_steps=6, logging_steps=3)
    kwargs = tc.lowrank_trainer_kwargs(model, name, args=args, stats=True, **settings(name))
    trainer = Trainer(model=model, args=args, train_dataset=dataset(), **kwargs)
    trainer.train()

    curve = losses(trainer)
    assert len(curve) == 2 and curve[-1] < 0.8 * curve[0], curve
    memory = logged(trainer, "optimizer_state/total_bytes")
    assert len(memory) == 2 and memory[-1] > 0
    opt = kwargs["optimizers"][0]
    assert memory[-1] == lo.memory.state_bytes(opt).total
    assert 0 < logged(trainer, "optimizer_state/adamw_ratio")[-1] < 1
    energy = logged(trainer, "subspace/captured_energy/all")
    assert len(energy) == 2 and all(0.0 <= e <= 1.0 + 1e-6 for e in energy)
    # per layer type, e.g. q_proj (SST layers are named by their module too)
    assert any(k.startswith("subspace/captured_energy/q_proj")
               for h in trainer.state.log_history for k in h)


def test_optimizer_cls_and_kwargs_routes(tmp_path):
    """The Trainer builds our optimizer itself: through the factory, or a class + groups."""
    model = tiny_llama()
    args = training_args(tmp_path, max_steps=2)
    trainer = Trainer(model=model, args=args, train_dataset=dataset(8), optimizer_cls_and_kwargs=(
        tc.LowRankOptimizerFactory, {"name": "galore_adamw", "rank": 8, "lr": 3e-3}))
    trainer.train()
    opt = tc._common.lowrank_optimizer(trainer.optimizer)
    assert isinstance(opt, lo.GaLoreAdamW)
    assert opt.param_groups[0]["rank"] == 8 and opt.param_groups[0]["lr"] == 3e-3
    assert opt.state[opt.param_groups[0]["params"][0]]["step"] == 2

    model = tiny_llama()
    groups = lo.param_groups(model, ["mlp"], rank=4, update_proj_gap=2)
    trainer = Trainer(model=model, args=args, train_dataset=dataset(8),
                      optimizer_cls_and_kwargs=(lo.DCTAdamW, {"params": groups, "lr": 3e-3}))
    trainer.train()
    opt = tc._common.lowrank_optimizer(trainer.optimizer)
    assert isinstance(opt, lo.DCTAdamW) and opt.param_groups[0]["param_names"][0].endswith(
        "mlp.gate_proj.weight")
    assert "proj_idx" in opt.state[opt.param_groups[0]["params"][0]]


class _LrProbe(TrainerCallback):
    """Learning rates of every group, read in the step (after the scheduler set them)."""

    def __init__(self):
        self.lrs = []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.lrs.append([g["lr"] for g in optimizer.param_groups])


def test_get_scheduler_drives_projected_and_plain_groups(tmp_path):
    model = tiny_llama()
    groups = lo.param_groups(model, rank=8, update_proj_gap=3, lr=2e-2)  # projected group lr
    opt = lo.GaLoreAdamW(groups, lr=1e-2)  # plain group lr
    args = training_args(tmp_path, max_steps=8, lr_scheduler_type="cosine", warmup_steps=3)
    probe = _LrProbe()
    trainer = Trainer(model=model, args=args, train_dataset=dataset(), optimizers=(opt, None),
                      callbacks=[probe])
    trainer.train()

    def factor(step):  # transformers' cosine schedule with linear warm-up
        if step < 3:
            return step / 3
        progress = (step - 3) / (8 - 3)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    expected = [[2e-2 * factor(t), 1e-2 * factor(t)] for t in range(8)]
    assert len(probe.lrs) == 8
    for got, want in zip(probe.lrs, expected, strict=True):
        assert got == pytest.approx(want, rel=1e-9, abs=1e-15)
    # the Trainer logs the first group's rate (the projected one here)
    assert logged(trainer, "learning_rate") == pytest.approx([lr[0] for lr in probe.lrs])


# -- logging through wandb (offline) and tensorboard -------------------------------------------
def _wandb_history(path: str) -> list[dict]:
    """History rows of an offline wandb run file (LevelDB log format: a 7-byte file header,
    then 32 KiB blocks of records with a 7-byte header crc32 / length / type, where type 1 is
    a whole record and 2, 3, 4 the first, middle and last fragments of one)."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    pos, block, rows, buf = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if len(chunk) < length:  # still being written
            break
        if kind == 0:
            continue
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_metrics_reach_wandb_and_tensorboard(tmp_path, monkeypatch, capsys):
    wandb = pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    model = tiny_llama()
    args = training_args(tmp_path, max_steps=4, logging_steps=2,
                         report_to=["wandb", "tensorboard"], run_name="lowrank-test")
    trainer = Trainer(model=model, args=args, train_dataset=dataset(16))
    tc.attach(trainer, "galore_adamw", rank=8, update_proj_gap=2, stats=True,
              refresh=tc.AdaptiveGap(gap=2))
    trainer.train()
    wandb.finish()
    wandb.teardown()  # stops the service process, which writes the run file

    table = capsys.readouterr().out
    assert "Optimizer state of GaLoreAdamW" in table and "AdamW" in table and "moments" in table
    # the Trainer's own loss log is not displaced by ours
    assert len(losses(trainer)) == 2
    expected = logged(trainer, "optimizer_state/total_bytes")
    assert len(expected) == 2

    (run_file,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    rows = _wandb_history(run_file)
    for _ in range(40):  # on a busy machine the last records may land a moment later
        if sum("train/loss" in r for r in rows) == 2:
            break
        time.sleep(0.5)
        rows = _wandb_history(run_file)
    got = [r["train/optimizer_state/total_bytes"] for r in rows
           if "train/optimizer_state/total_bytes" in r]
    assert got == expected
    assert any("train/subspace/overlap/all" in r for r in rows)
    assert any("train/loss" in r for r in rows)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = glob.glob(str(tmp_path / "tb" / "**" / "events.out.tfevents.*"), recursive=True)
    acc = EventAccumulator(events)
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "train/optimizer_state/total_bytes" in tags and "train/loss" in tags
    assert [e.value for e in acc.Scalars("train/optimizer_state/total_bytes")] == expected
