"""Non-finite gradients, in every place and every mode, and under FSDP2.

* ``nonfinite="raise"``: a NaN/Inf in any gradient (1-D or 2-D, projected or not, first or a
  later group) raises naming that parameter, and every parameter and *every parameter's*
  state is bit-identical afterwards (snapshots keyed by parameter, after real steps).
* ``"skip"``: a skipped step on existing state, then more training, equals a run that never
  saw the bad batch (parameters and state bit for bit).
* ``"ignore"``: no check at all: the step is taken, the NaN lands where AdamW puts it and
  nowhere else.
* FSDP2 (2 gloo processes): a NaN in one rank's gradient shard stops the step on every rank;
  ``rotate_moments`` with ``broadcast_refreshes`` is refused at the step even when the
  refresher is installed after construction.
"""

import os

import pytest
import torch
from torch import nn

import lowrank_optim as lo
from lowrank_optim import distributed
from tests.helpers import assert_same_training_state


def _model(seed=0):
    torch.manual_seed(seed)
    # with rank 6: 0.weight and 2.weight projected (group 0), 4.weight (4 x 16) too small for
    # the rank and in the plain group 1 with every bias and the LayerNorm
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 4), nn.LayerNorm(4))


def _sst(model, **kw):
    lo.sst.convert(model, rank=2, target_modules=["0", "2"])
    return lo.SSTAdamW(lo.sst.sst_param_groups(model), lr=1e-2, **kw)


OPTIMIZERS = {
    "GaLoreAdamW": lambda m, **kw: lo.GaLoreAdamW(lo.param_groups(m, rank=6, update_proj_gap=2),
                                                  lr=1e-2, **kw),
    "DCTAdamW8bit": lambda m, **kw: lo.DCTAdamW(lo.param_groups(m, rank=6), lr=1e-2, bits=8,
                                                min_8bit_size=0, block_size=16, **kw),
    "GaLoreAdafactor": lambda m, **kw: lo.GaLoreAdafactor(
        lo.param_groups(m, rank=6, update_proj_gap=2), beta1=0.9, **kw),
    "DCTAdafactor": lambda m, **kw: lo.DCTAdafactor(lo.param_groups(m, rank=6), **kw),
    "SSTAdamW": _sst,
}


def _loss(model, seed):
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(seed))
    return model(x).square().sum()


def _backward(model, opt, seed):
    opt.zero_grad()
    _loss(model, seed).backward()


def _snapshot(model, opt):
    """Every parameter and its own state, keyed by parameter name (not by state key)."""
    return {n: (p.detach().clone(), {k: v.clone() for k, v in opt.state.get(p, {}).items()})
            for n, p in model.named_parameters()}


def _assert_unchanged(model, opt, snap):
    for n, p in model.named_parameters():
        value, state = snap[n]
        assert torch.equal(p, value), n
        now = opt.state.get(p, {})
        assert now.keys() == state.keys(), n
        for k, v in state.items():
            assert now[k].dtype == v.dtype and torch.equal(now[k], v), (n, k)


# parameter: (its group, what it is): 2-D and 1-D, the projected group 0 and the plain group 1
PLACES = {
    "0.weight": (0, "2-D, projected, first"),
    "2.weight": (0, "2-D, projected, later"),
    "4.weight": (1, "2-D, in the plain group after the projected one"),
    "0.bias": (1, "1-D, first of the plain group"),
    "5.bias": (1, "1-D, last parameter of the last group"),
}


@pytest.mark.parametrize("bad", [float("nan"), float("-inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("where", list(PLACES))
@pytest.mark.parametrize("name", ["GaLoreAdamW", "DCTAdamW8bit"])
def test_raise_names_the_parameter_and_changes_nothing(name, where, bad):
    model = _model()
    opt = OPTIMIZERS[name](model)
    groups = {id(p): g for g, group in enumerate(opt.param_groups) for p in group["params"]}
    params = dict(model.named_parameters())
    assert groups[id(params[where])] == PLACES[where][0]  # the place is what it says
    for seed in range(2):  # state exists now, for every parameter
        _backward(model, opt, seed)
        opt.step()
    _backward(model, opt, 2)
    params[where].grad.view(-1)[-1] = bad
    snap = _snapshot(model, opt)
    with pytest.raises(RuntimeError, match="non-finite") as err:
        opt.step()
    assert f"shape {tuple(params[where].shape)}" in str(err.value)
    _assert_unchanged(model, opt, snap)
    assert opt.skipped_steps == 0


def test_one_d_tensor_inside_a_projected_group():
    weight, bias = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(6))
    opt = lo.GaLoreAdamW([{"params": [weight, bias], "rank": 2,
                           "param_names": ["w", "b"]}], lr=0.1)
    weight.grad, bias.grad = torch.randn(6, 4), torch.randn(6)
    opt.step()
    weight.grad, bias.grad = torch.randn(6, 4), torch.randn(6)
    bias.grad[3] = float("inf")
    before = [weight.detach().clone(), bias.detach().clone()]
    state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in (weight, bias)}
    with pytest.raises(RuntimeError, match=r"non-finite.*\bb\b"):
        opt.step()
    assert torch.equal(weight, before[0]) and torch.equal(bias, before[1])
    for p in (weight, bias):
        assert all(torch.equal(opt.state[p][k], v) for k, v in state[id(p)].items())


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_skip_then_training_equals_a_run_without_the_bad_batch(name):
    """The skipped step leaves no trace: step counters, refresh timing, moments, sampled
    vectors and parameters continue as if the batch had never been seen."""
    seeds = [0, 1, 2, 3, 4, 5]
    bad_at = 2
    runs = {}
    for skip in (True, False):
        model = _model()
        opt = OPTIMIZERS[name](model, nonfinite="skip")
        for i, seed in enumerate(seeds):
            if i == bad_at and not skip:
                continue
            _backward(model, opt, seed)
            if i == bad_at:
                next(p for n, p in model.named_parameters() if n == "5.bias").grad[0] = \
                    float("nan")
                snap = _snapshot(model, opt)
                with pytest.warns(RuntimeWarning, match="Skipping optimizer step"):
                    opt.step()
                _assert_unchanged(model, opt, snap)
                assert opt.state  # a step with existing state was skipped
            else:
                opt.step()
        runs[skip] = (model, opt)
    (skipped, opt_skipped), (clean, opt_clean) = runs[True], runs[False]
    assert opt_skipped.skipped_steps == 1 and opt_clean.skipped_steps == 0
    assert_same_training_state(clean, opt_clean, skipped, opt_skipped)
    if name == "SSTAdamW":
        assert opt_skipped.schedule_state() == opt_clean.schedule_state()


def test_ignore_mode_takes_the_step_without_checking(monkeypatch):
    """``nonfinite="ignore"`` does not look at the gradients (no pass over them): the step runs,
    the NaN reaches only the element whose gradient held it (AdamW is elementwise), and every
    other parameter steps exactly as in a run where that element's gradient is finite."""
    runs = {}
    for mode in ("ignore", "raise"):
        model = _model()
        opt = OPTIMIZERS["GaLoreAdamW"](model, nonfinite=mode)
        _backward(model, opt, 0)
        opt.step()
        _backward(model, opt, 1)
        bias = dict(model.named_parameters())["4.bias"]
        if mode == "ignore":
            bias.grad[1] = float("nan")
            calls = []

            def spy(self, grads, calls=calls):
                calls.append(1)
                return True

            monkeypatch.setattr(type(opt), "_grads_finite", spy)
            opt.step()
            monkeypatch.undo()
            assert not calls and opt.skipped_steps == 0
        else:
            opt.step()
        runs[mode] = dict(model.named_parameters())
    ignored, clean = runs["ignore"], runs["raise"]
    for n, p in ignored.items():
        if n == "4.bias":
            assert p[1].isnan() and torch.equal(p[[0, 2, 3]], clean[n][[0, 2, 3]])
        else:
            assert torch.equal(p, clean[n]), n


# -- FSDP2: two gloo processes ------------------------------------------------------------------
def _fsdp_small():
    from torch.distributed.fsdp import fully_shard

    model = _model()
    fully_shard(model)
    return model


def _local(t):
    return distributed.local_tensor(t).detach().clone()


def _fsdp_checks_worker(rank, world, port, out):
    from tests.helpers import init_gloo

    init_gloo(rank, world, port)
    results = {}
    for mode in ("raise", "skip"):
        model = _fsdp_small()
        # unprojected AdamW on the shards: the step itself needs no collective, so a rank that
        # wrongly went ahead could not hang the other one
        opt = lo.GaLoreAdamW(model.parameters(), lr=1e-2, nonfinite=mode)
        _backward(model, opt, rank)
        opt.step()
        _backward(model, opt, 10 + rank)
        bias = dict(model.named_parameters())["5.bias"]  # 4 elements: 2 per rank
        if rank == 1:
            distributed.local_tensor(bias.grad)[0] = float("nan")
        before = {n: _local(p) for n, p in model.named_parameters()}
        state = {n: {k: _local(v) for k, v in opt.state[p].items()}
                 for n, p in model.named_parameters()}
        message = None
        try:
            opt.step()
        except RuntimeError as e:
            message = str(e)
        unchanged = all(torch.equal(_local(p), before[n]) for n, p in model.named_parameters())
        unchanged &= all(torch.equal(_local(v), state[n][k])
                         for n, p in model.named_parameters()
                         for k, v in opt.state[p].items())
        results[mode] = {"message": message, "unchanged": unchanged,
                         "skipped": opt.skipped_steps}
    for rotate in (True, False):
        model = _fsdp_small()
        opt = lo.DCTAdamW(lo.param_groups(model, rank=6), lr=1e-2, rotate_moments=rotate)
        distributed.broadcast_refreshes(opt)  # after construction, as a recipe does
        _backward(model, opt, rank)
        before = {n: _local(p) for n, p in model.named_parameters()}
        try:
            opt.step()
            message = None
        except NotImplementedError as e:
            message = str(e)
        changed = any(not torch.equal(_local(p), before[n])
                      for n, p in model.named_parameters())
        results[f"rotate={rotate}"] = {"message": message, "changed": changed,
                                       "state": bool(opt.state)}
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    import torch.distributed as dist

    dist.destroy_process_group()


def test_fsdp2_ranks_agree_on_nonfinite_shards_and_refuse_rotation_with_broadcast(tmp_path):
    from tests.helpers import spawn_two

    spawn_two(_fsdp_checks_worker, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    # the NaN sits in rank 1's shard: rank 1 names the parameter, rank 0 the other rank's shard
    assert "non-finite" in r1["raise"]["message"] and "shape (4,)" in r1["raise"]["message"]
    assert "a gradient shard held by another rank" in r0["raise"]["message"]
    for r in (r0, r1):
        assert r["raise"]["unchanged"] and r["raise"]["skipped"] == 0
        assert r["skip"]["message"] is None and r["skip"]["unchanged"]
        assert r["skip"]["skipped"] == 1
        refused = r["rotate=True"]
        assert "rotate_moments with broadcast_refreshes under FSDP2" in refused["message"]
        assert not refused["changed"] and not refused["state"]
        allowed = r["rotate=False"]
        assert allowed["message"] is None and allowed["changed"] and allowed["state"]
