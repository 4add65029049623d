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


def _sst(model, **kw):
    lo.sst.convert(model, rank=4, target_modules=["q_proj", "up_proj"])
    return lo.SSTAdamW(lo.sst.sst_param_groups(model), lr=1e-3, **kw)


#: name -> (make, {state key: the dtype it must have}) for the keys whose dtype torch's own
#: load would change (it casts every tensor but "step" to a floating parameter's dtype)
DTYPES = {
    "galore_adamw": (lambda m: lo.GaLoreAdamW(lo.param_groups(m, rank=4), lr=1e-3),
                     {"refresh_step": torch.int64}),
    "dct_adamw": (lambda m: lo.DCTAdamW(lo.param_groups(m, rank=4), lr=1e-3),
                  {"proj_idx": torch.int32, "proj_shape": torch.int64}),
    "dct_adamw8bit": (lambda m: lo.DCTAdamW(lo.param_groups(m, rank=4), lr=1e-3, bits=8,
                                            min_8bit_size=0),
                      {"exp_avg_codes": torch.uint8, "exp_avg_sq_absmax": torch.float32}),
    "galore_adafactor": (lambda m: lo.GaLoreAdafactor(lo.param_groups(m, rank=4), beta1=0.9),
                         {"exp_avg": torch.float32, "exp_avg_sq_row": torch.float32}),
    "sst_adamw": (_sst, {"proj_idx": torch.int64, "proj_width": torch.int64}),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(DTYPES))
def test_load_restores_every_saved_dtype_immediately(name, dtype):
    """Right after ``load_state_dict`` (before any step could rebuild an entry), every state
    tensor of every parameter has the dtype it was saved with, and the same values."""
    make, must = DTYPES[name]
    model = tiny_llama().to(dtype)
    opt = make(model)
    train(model, opt, token_batches(2))
    saved = roundtrip(opt.state_dict())
    fresh_model = tiny_llama(seed=5).to(dtype)
    fresh = make(fresh_model)
    fresh_model.load_state_dict(model.state_dict())
    fresh.load_state_dict(saved)
    seen = set()
    for (n, p), q in zip(model.named_parameters(), fresh_model.parameters(), strict=True):
        mine, loaded = opt.state[p], fresh.state[q]
        assert mine.keys() == loaded.keys(), n
        for key, value in mine.items():
            assert loaded[key].dtype == value.dtype, (n, key, loaded[key].dtype, value.dtype)
            assert torch.equal(loaded[key], value), (n, key)
            if key in must:
                assert value.dtype == must[key], (n, key)
                seen.add(key)
    assert seen == set(must)  # each dtype torch would change was really checked
