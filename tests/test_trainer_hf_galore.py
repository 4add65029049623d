"""Our GaLore through the Trainer gives the loss curve of the Trainer's built-in
``optim="galore_adamw"`` (galore-torch) on the same seed and settings."""

from __future__ import annotations

import pytest
from transformers import Trainer

import lowrank_optim as lo
from tests.helpers import tiny_llama
from tests.test_trainer_swap import dataset, losses, one_thread, training_args  # noqa: F401

galore_torch = pytest.importorskip("galore_torch")

TARGETS = ["self_attn", "mlp"]
RANK, GAP, SCALE, LR, STEPS = 8, 5, 0.25, 1e-2, 12


def test_matches_trainer_builtin_galore(tmp_path):
    # 12 steps, refresh every 5: subspaces computed at steps 0, 5 and 10 (two refreshes)
    common = dict(max_steps=STEPS, learning_rate=LR, lr_scheduler_type="linear", warmup_steps=2)

    hf_args = training_args(tmp_path / "hf", optim="galore_adamw", optim_target_modules=TARGETS,
                            optim_args=f"rank={RANK}, update_proj_gap={GAP}, scale={SCALE}",
                            **common)
    hf = Trainer(model=tiny_llama(seed=0), args=hf_args, train_dataset=dataset())
    hf.train()
    assert isinstance(hf.optimizer.optimizer, galore_torch.GaLoreAdamW)

    model = tiny_llama(seed=0)
    ours_opt = lo.create_optimizer(model, "galore_adamw", target_modules=TARGETS, rank=RANK,
                                   update_proj_gap=GAP, scale=SCALE, lr=LR)
    ours = Trainer(model=model, args=training_args(tmp_path / "ours", **common),
                   train_dataset=dataset(), optimizers=(ours_opt, None))
    ours.train()

    # same parameters projected, same settings
    hf_low = next(g for g in hf.optimizer.param_groups if "rank" in g)
    assert len(hf_low["params"]) == len(ours_opt.param_groups[0]["params"]) == 14

    a, b = losses(hf), losses(ours)
    assert len(a) == len(b) == STEPS
    assert a[0] == b[0]  # same model, same batch, no update yet
    # Per step the two optimizers agree to ~1e-7 relative on identical gradients (see
    # test_galore_conformance: same SVD call and formula, but our back-projection is fused
    # with the update, so roundings differ).  Over the run that rounding is carried forward
    # by the dynamics and, at each refresh, by the SVD of a gradient whose small singular
    # values are nearly degenerate.  Measured: bit-identical losses up to the refresh at
    # step 5; after it, relative differences up to ~3e-6 on one machine (Intel Xeon) and up to
    # 4.5e-4 on another (AMD EPYC, 2026-12-02, the commit before this test changed too: the
    # SVD's rounding differs by CPU).  So the first 6 losses (before the refresh at step 5)
    # must agree to 1e-6, where a real difference in the update shows at once (a scale 10%
    # off: 3e-4 at the third loss; rank, eps and lr act from the first step, the gap by the
    # sixth), and the whole run to 2e-3.
    assert b[:6] == pytest.approx(a[:6], rel=1e-6)
    assert b == pytest.approx(a, rel=2e-3)
    changes = [abs(x - y) / x for x, y in zip(a[2:-1], a[3:], strict=True)]
    assert min(changes) > 2e-2
