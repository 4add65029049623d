"""Exact resume: state_dict -> torch.save -> torch.load(weights_only=True) -> continue."""

import pytest
import torch

import lowrank_optim as lo
from tests.helpers import (
    assert_same_training_state,
    resume_midway,
    roundtrip,
    tiny_llama,
    token_batches,
    train,
)

OPTIMIZERS = {
    "galore_adamw": lambda m: lo.GaLoreAdamW(
        lo.param_groups(m, rank=8, update_proj_gap=5, scale=0.25), lr=3e-3, weight_decay=0.1),
    "galore_adamw_full": lambda m: lo.GaLoreAdamW(
        lo.param_groups(m, rank=4, update_proj_gap=3, proj_type="full"), lr=3e-3),
    "galore_adafactor": lambda m: lo.GaLoreAdafactor(
        lo.param_groups(m, rank=8, update_proj_gap=5), beta1=0.9),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_resume_is_bit_exact(name):
    make = OPTIMIZERS[name]
    batches = token_batches(14, seed=3)
    model = tiny_llama(seed=1)  # uninterrupted
    opt = make(model)
    train(model, opt, batches)
    # interrupted after 7 steps (mid refresh period), restored into fresh objects
    fresh_model, fresh, _ = resume_midway(make, tiny_llama, 1, batches, 7)
    assert_same_training_state(model, opt, fresh_model, fresh)


def test_state_dict_holds_tensors_only():
    model = tiny_llama()
    opt = OPTIMIZERS["galore_adamw"](model)
    train(model, opt, token_batches(2))
    for state in opt.state_dict()["state"].values():
        for key, value in state.items():
            assert isinstance(value, torch.Tensor), key


def test_bf16_state_keeps_dtypes_across_load():
    """torch casts floating state to the param dtype on load; we keep state dtypes as saved."""
    model = tiny_llama().to(torch.bfloat16)
    opt = lo.GaLoreAdamW(lo.param_groups(model, rank=4), lr=1e-3)
    train(model, opt, token_batches(2))
    before = {k: v.dtype for s in opt.state.values() for k, v in s.items()}
    opt2 = lo.GaLoreAdamW(lo.param_groups(model, rank=4), lr=1e-3)
    opt2.load_state_dict(roundtrip(opt.state_dict()))
    after = {k: v.dtype for s in opt2.state.values() for k, v in s.items()}
    assert before == after
    assert after["refresh_step"] == torch.int64
