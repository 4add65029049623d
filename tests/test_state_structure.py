"""load_state_dict refuses a state of another structure; deepcopy and pickle keep an optimizer.

Every row of the table saves a trained state with one optimizer and loads it into another
that differs in one structural setting: the load raises naming the difference and leaves the
target untouched; with ``reproject=True`` it loads and trains on, recomputing the subspaces.
"""

import copy
import pickle

import pytest
import torch

import lowrank_optim as lo
from tests.helpers import roundtrip, tiny_llama, token_batches, train


def _galore(rank=8, proj_type="std", **kw):
    return lambda m: lo.GaLoreAdamW(lo.param_groups(m, rank=rank, proj_type=proj_type),
                                    lr=1e-3, **kw)


MISMATCHES = [
    ("rank", _galore(), _galore(rank=4), "group 0 rank: saved 8, this optimizer 4"),
    ("proj_type", _galore(), _galore(proj_type="left"), "proj_type: saved 'std'"),
    ("bits", _galore(), _galore(bits=8), "bits: saved 32, this optimizer 8"),
    ("block_size", _galore(bits=8, block_size=64), _galore(bits=8),
     "block_size: saved 64, this optimizer 256"),
    ("projector", _galore(), lambda m: lo.DCTAdamW(lo.param_groups(m, rank=8)),
     "projector: saved 'svd', this optimizer 'dct'"),
    ("rule", _galore(), lambda m: lo.GaLoreAdafactor(lo.param_groups(m, rank=8), lr=1e-3,
                                                     relative_step=False),
     "rule: saved 'adam', this optimizer 'adafactor'"),
    ("class", lambda m: lo.DCTAdamW(lo.param_groups(m, rank=8)),
     lambda m: lo.DCTAdafactor(lo.param_groups(m, rank=8), lr=1e-3, relative_step=False),
     "optimizer: saved 'DCTAdamW', this optimizer 'DCTAdafactor'"),
    ("torch AdamW", lambda m: torch.optim.AdamW(m.parameters()), _galore(),
     "not saved by a lowrank_optim optimizer"),
]


@pytest.mark.parametrize(("what", "save", "load", "needle"), MISMATCHES,
                         ids=[m[0] for m in MISMATCHES])
def test_structure_mismatch_is_refused_then_reprojects_on_request(what, save, load, needle):
    batches = token_batches(4)
    source = tiny_llama()
    opt = save(source)
    train(source, opt, batches[:2])
    sd = roundtrip(opt.state_dict())
    target = tiny_llama()
    other = load(target)
    train(target, other, batches[:1])
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match=needle):
        other.load_state_dict(sd)
    after = other.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for pid, entry in before["state"].items():
        assert all(torch.equal(v, after["state"][pid][k]) for k, v in entry.items())
    with pytest.warns(RuntimeWarning, match="restart at the next step"):
        other.load_state_dict(sd, reproject=True)
    assert other.structure() == load(tiny_llama()).structure()  # its own settings kept
    losses = train(target, other, batches[2:])
    assert all(torch.isfinite(torch.tensor(losses)))


def test_same_structure_loads_and_old_states_without_the_record_too():
    model = tiny_llama()
    opt = _galore()(model)
    train(model, opt, token_batches(2))
    sd = roundtrip(opt.state_dict())
    assert sd["lowrank_optim"]["groups"][0]["rank"] == 8
    _galore()(tiny_llama()).load_state_dict(sd)
    legacy = {k: v for k, v in sd.items() if k != "lowrank_optim"}  # saved before the record
    _galore()(tiny_llama()).load_state_dict(legacy)
    with pytest.raises(ValueError, match="rank: saved 8"):
        _galore(rank=4)(tiny_llama()).load_state_dict(legacy)


def test_reproject_on_load_attribute_for_callers_without_the_keyword():
    model = tiny_llama()
    opt = _galore()(model)
    train(model, opt, token_batches(2))
    other = _galore(rank=4)(tiny_llama())
    other.reproject_on_load = True
    with pytest.warns(RuntimeWarning):
        other.load_state_dict(roundtrip(opt.state_dict()))
    assert other.param_groups[0]["rank"] == 4


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name", ["galore_adamw", "dct_adamw8bit", "galore_adafactor",
                                  "sst_adamw"])
def test_copied_optimizer_steps_like_the_original(name, how):
    batches = token_batches(4)
    model = tiny_llama()
    kw = {"lr": 1e-3, "relative_step": False} if "adafactor" in name else {}
    opt = lo.create_optimizer(model, name, rank=8, **kw)
    opt.nonfinite = "skip"  # a non-default setting must survive too
    train(model, opt, batches[:2])
    if how == "deepcopy":
        twin_model, twin = copy.deepcopy((model, opt))
    else:
        twin_model, twin = pickle.loads(pickle.dumps((model, opt)))
    assert twin.nonfinite == "skip" and type(twin.rule) is type(opt.rule)
    train(model, opt, batches[2:])
    train(twin_model, twin, batches[2:])
    for a, b in zip(model.parameters(), twin_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_layerwise_wrapper_forwards_the_check_and_the_opt_in():
    model = tiny_llama()
    opt = _galore()(model)
    train(model, opt, token_batches(2))
    sd = roundtrip(opt.state_dict())
    wrapped = lo.LayerwiseOptimizer(_galore(rank=4)(tiny_llama()))
    with pytest.raises(ValueError, match="rank: saved 8"):
        wrapped.load_state_dict(sd)
    with pytest.warns(RuntimeWarning):
        wrapped.load_state_dict(sd, reproject=True)
    other = lo.LayerwiseOptimizer(_galore(rank=4)(tiny_llama()))
    other.reproject_on_load = True  # reaches the wrapped optimizer
    assert other.optimizer.reproject_on_load
    with pytest.warns(RuntimeWarning):
        other.load_state_dict(sd)
