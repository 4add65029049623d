"""``Trainer.train(resume_from_checkpoint=...)`` continues exactly as the uninterrupted run:
model, optimizer state (projectors included) and the refresh callback's schedule."""

from __future__ import annotations

import logging

import pytest
from transformers import Trainer

import lowrank_optim as lo
import trainer_callbacks as tc
from tests.helpers import tiny_llama
from tests.test_trainer_swap import dataset, losses, one_thread, settings, training_args  # noqa: F401

CASES = {
    # adaptive gaps change during the run: a resume that lost them would refresh elsewhere
    "galore_adamw": tc.AdaptiveGap(gap=2, overlap_threshold=0.0, max_gap=8),
    "dct_adamw": tc.GrowingGap(gap=1, factor=2.0),
    "sst_adamw": None,  # SST keeps its own draw schedule in optimizer state
}


def _trainer(tmp_path, name, **args):
    model = tiny_llama(seed=0)
    refresh = CASES[name]
    opt = lo.create_optimizer(model, name, **settings(name))
    callbacks = [] if refresh is None else [tc.SubspaceRefreshCallback(refresh)]
    args = training_args(tmp_path, max_steps=10, save_strategy="steps", save_steps=5,
                         restore_callback_states_from_checkpoint=True, **args)
    trainer = Trainer(model=model, args=args, train_dataset=dataset(48),
                      optimizers=(opt, None), callbacks=callbacks)
    return trainer, opt


def _schedule(trainer):
    cbs = [c for c in trainer.callback_handler.callbacks
           if isinstance(c, tc.SubspaceRefreshCallback)]
    return cbs[0].layers if cbs else None


@pytest.mark.parametrize("name", [n for n in CASES if n in lo.available()])
def test_resume_matches_uninterrupted_run(tmp_path, name):
    full, full_opt = _trainer(tmp_path, name)
    full.train()
    reference = losses(full)
    assert len(reference) == 10

    resumed, opt = _trainer(tmp_path, name)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-5"))
    assert losses(resumed) == reference  # the resumed history starts with the saved one
    for (n, a), b in zip(full.model.named_parameters(), resumed.model.parameters(), strict=True):
        assert a.equal(b), n
    for p_full, p_resumed in zip(full_opt.state, opt.state, strict=True):
        a, b = full_opt.state[p_full], opt.state[p_resumed]
        assert a.keys() == b.keys()
        assert all(a[k].equal(b[k]) for k in a), [k for k in a if not a[k].equal(b[k])]
    assert _schedule(resumed) == _schedule(full)
    if CASES[name] is not None:
        assert any(layer["gap"] > CASES[name].initial_gap() for layer in _schedule(full))


def test_resume_without_callback_state_warns_and_rebuilds(tmp_path, caplog):
    full, _ = _trainer(tmp_path, "galore_adamw")
    full.train()
    resumed, _ = _trainer(tmp_path, "galore_adamw")
    resumed.args.restore_callback_states_from_checkpoint = False
    with caplog.at_level(logging.WARNING, logger="lowrank_optim"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-5"))
    assert "restore_callback_states_from_checkpoint=True" in caplog.text
    # the adaptive gaps were lost, so the run differs after the checkpoint
    assert losses(resumed)[:5] == losses(full)[:5]
    assert losses(resumed)[5:] != losses(full)[5:]
