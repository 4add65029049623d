"""A Trainer resumed with other optimizer settings than its checkpoint's must say so.

``attach(trainer, "galore_adamw", rank=4)`` resuming a checkpoint saved with ``rank=8`` used
to continue silently (``torch.optim.Optimizer.load_state_dict`` even put ``rank=8`` back into
the groups).  ``LowRankOptimizer.load_state_dict`` raises a ``ValueError`` listing the
differences; the Trainer reaches it through accelerate's ``AcceleratedOptimizer`` and, in
layer-wise mode, :class:`LayerwiseOptimizer`, and nothing in ``trainer_callbacks`` may
swallow it.  The same settings resume as before, also with a refresh schedule (whose callback
sets ``update_proj_gap=None`` in the saved groups at train begin, which must not count as a
difference).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import Trainer

import trainer_callbacks as tc
from tests.helpers import tiny_llama
from tests.test_trainer_swap import dataset, one_thread, training_args  # noqa: F401
from trainer_callbacks._common import lowrank_optimizer

#: id -> attach() settings besides the rank
MODES: dict[str, dict[str, Any]] = {
    "plain": {},
    "refresh": {"refresh": tc.FixedGap(2)},
    "layerwise": {"layerwise": True},
}


def _trainer(out: Path, rank: int, max_steps: int, mode: str) -> Trainer:
    args = training_args(out, max_steps=max_steps, save_strategy="steps", save_steps=1,
                         max_grad_norm=0, restore_callback_states_from_checkpoint=True)
    trainer = Trainer(model=tiny_llama(seed=0), args=args, train_dataset=dataset(8))
    tc.attach(trainer, "galore_adamw", rank=rank, scale=0.25, memory=False, **MODES[mode])
    return trainer


@pytest.fixture(params=list(MODES))
def checkpoint(request, tmp_path) -> tuple[str, Path, str]:
    """A one-step run with rank 8, checkpointed: ``(mode, its output folder, checkpoint)``."""
    mode = request.param
    _trainer(tmp_path, rank=8, max_steps=1, mode=mode).train()
    path = tmp_path / "out" / "checkpoint-1"
    assert (path / "optimizer.pt").is_file()
    return mode, tmp_path, str(path)


def test_resume_with_another_rank_raises(checkpoint) -> None:
    mode, out, path = checkpoint
    trainer = _trainer(out, rank=4, max_steps=2, mode=mode)
    with pytest.raises(ValueError, match="rank"):
        trainer.train(resume_from_checkpoint=path)


def test_resume_with_the_same_rank_continues(checkpoint) -> None:
    mode, out, path = checkpoint
    trainer = _trainer(out, rank=8, max_steps=2, mode=mode)
    trainer.train(resume_from_checkpoint=path)
    opt = lowrank_optimizer(trainer.optimizer)
    group = next(g for g in opt.param_groups if g.get("rank") is not None)
    assert group["rank"] == 8
    assert int(opt.state[group["params"][0]]["step"]) == 2
    assert trainer.state.global_step == 2


def test_opt_in_on_the_inner_optimizer_reaches_the_trainer_resume(checkpoint) -> None:
    """``reproject_on_load`` set on the optimizer attach() built (behind accelerate's and the
    layer-wise wrappers) applies to the Trainer's ``load_state_dict(sd)`` call."""
    mode, out, path = checkpoint
    trainer = _trainer(out, rank=4, max_steps=2, mode=mode)
    lowrank_optimizer(trainer.optimizer).reproject_on_load = True
    with pytest.warns(RuntimeWarning, match="rank"):
        trainer.train(resume_from_checkpoint=path)
    opt = lowrank_optimizer(trainer.optimizer)
    assert next(g for g in opt.param_groups if g.get("rank") is not None)["rank"] == 4
    assert trainer.state.global_step == 2
