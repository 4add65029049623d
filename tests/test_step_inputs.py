"""A step never half-applies: every gradient and state is checked before anything changes.

Table-driven over every optimizer class and every kind of bad gradient (dtype, shape, device,
layout, complex, NaN/Inf in 1-D and 2-D tensors of any group): the error names the parameter,
and every parameter and every state tensor (all of them, not only the last) is bit-identical
afterwards, after a first real step so that there is state to corrupt.
"""

import copy

import pytest
import torch

import lowrank_optim as lo


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8),
                               torch.nn.LayerNorm(8))


def _sst(model, **kw):
    lo.sst.convert(model, rank=2, target_modules=["0", "2"])
    return lo.SSTAdamW(lo.sst.sst_param_groups(model), lr=1e-2, **kw)


OPTIMIZERS = {
    "GaLoreAdamW": lambda m, **kw: lo.GaLoreAdamW(lo.param_groups(m, rank=2), lr=1e-2, **kw),
    "GaLoreAdamW8bit": lambda m, **kw: lo.GaLoreAdamW8bit(lo.param_groups(m, rank=2), lr=1e-2,
                                                         min_8bit_size=0, **kw),
    "GaLoreAdafactor": lambda m, **kw: lo.GaLoreAdafactor(lo.param_groups(m, rank=2), lr=1e-2,
                                                         relative_step=False, **kw),
    "DCTAdamW": lambda m, **kw: lo.DCTAdamW(lo.param_groups(m, rank=2), lr=1e-2, **kw),
    "DCTAdafactor": lambda m, **kw: lo.DCTAdafactor(lo.param_groups(m, rank=2), lr=1e-2,
                                                   relative_step=False, **kw),
    "SSTAdamW": _sst,
}


def _snapshot(model, opt):
    return ([p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict()))


def _assert_unchanged(model, opt, snap):
    params, sd = snap
    for a, b in zip(params, model.parameters(), strict=True):
        assert torch.equal(a, b)
    now = opt.state_dict()
    assert now["state"].keys() == sd["state"].keys()
    for pid, saved in sd["state"].items():
        assert now["state"][pid].keys() == saved.keys()
        for key, value in saved.items():
            assert torch.equal(now["state"][pid][key], value), (pid, key)


def _second_param(model, one_d: bool):
    """A parameter that is not stepped first: a later one, in a later group for 1-D."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [p for p in params if (p.dim() == 1) == one_d][-1]


def _corrupt(kind: str, p: torch.Tensor) -> None:
    g = p.grad
    if kind == "nan":
        g.view(-1)[0] = float("nan")
    elif kind == "inf":
        g.view(-1)[-1] = float("inf")
    elif kind == "dtype":  # .data bypasses the grad setter's own dtype check
        g.data = g.data.to(torch.float64)
    elif kind == "shape":
        g.data = g.data.reshape(-1)[: g.numel() // 2].clone()
    elif kind == "complex":
        g.data = torch.complex(g.data, g.data)
    elif kind == "sparse":
        p.grad = g.to_sparse()


MESSAGES = {"nan": "non-finite", "inf": "non-finite", "dtype": "dtype float64 does not match",
            "shape": "shape .* does not match",
            "complex": "complex", "sparse": "sparse gradients"}


@pytest.mark.parametrize("one_d", [False, True], ids=["2d", "1d"])
@pytest.mark.parametrize("kind", list(MESSAGES))
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_bad_gradient_raises_before_any_change(name, kind, one_d):
    model = _model()
    opt = OPTIMIZERS[name](model)
    x = torch.randn(4, 8)
    model(x).square().sum().backward()
    opt.step()  # state exists now
    opt.zero_grad()
    model(x).square().sum().backward()
    bad = _second_param(model, one_d)
    _corrupt(kind, bad)
    snap = _snapshot(model, opt)
    with pytest.raises(RuntimeError, match=MESSAGES[kind]) as err:
        opt.step()
    assert f"shape {tuple(bad.shape)}" in str(err.value)  # names the parameter
    _assert_unchanged(model, opt, snap)


@pytest.mark.parametrize("kind", ["dtype", "shape"])
def test_structural_checks_run_with_nonfinite_ignore(kind):
    model = _model()
    opt = OPTIMIZERS["GaLoreAdamW"](model, nonfinite="ignore")
    model(torch.randn(4, 8)).square().sum().backward()
    _corrupt(kind, _second_param(model, one_d=False))
    snap = _snapshot(model, opt)
    with pytest.raises(RuntimeError, match=MESSAGES[kind]):
        opt.step()
    _assert_unchanged(model, opt, snap)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_skip_mode_leaves_existing_state_untouched(name):
    model = _model()
    opt = OPTIMIZERS[name](model, nonfinite="skip")
    for step in range(3):
        opt.zero_grad()
        model(torch.randn(4, 8)).square().sum().backward()
        if step == 2:
            _corrupt("nan", _second_param(model, one_d=True))
            snap = _snapshot(model, opt)
            with pytest.warns(RuntimeWarning, match="Skipping optimizer step"):
                opt.step()
            _assert_unchanged(model, opt, snap)
        else:
            opt.step()
    assert opt.skipped_steps == 1 and opt.state


def test_gradient_on_another_device_is_refused():
    """(torch's grad setter refuses this too; a hand-made gradient, e.g. layer-wise, may not)"""
    from lowrank_optim.validation import check_grad

    with pytest.raises(RuntimeError, match="on meta but the parameter on cpu"):
        check_grad(torch.empty(2, 2, device="meta"), "w", torch.zeros(2, 2))


def test_bf16_weight_with_fp32_gradient_names_the_weight():
    w = torch.nn.Parameter(torch.randn(16, 8, dtype=torch.bfloat16))
    first = torch.nn.Parameter(torch.randn(16, 8, dtype=torch.bfloat16))
    opt = lo.GaLoreAdamW([{"params": [first, w], "rank": 4,
                           "param_names": ["first", "late.weight"]}])
    first.grad = torch.randn_like(first)
    w.grad = torch.zeros_like(w)
    w.grad.data = torch.randn(16, 8)
    before = first.detach().clone()
    with pytest.raises(RuntimeError, match=r"late\.weight .*dtype float32 does not match"):
        opt.step()
    assert torch.equal(first, before) and not opt.state


def test_8bit_block_size_mismatch_is_caught_before_the_step():
    w = torch.nn.Parameter(torch.randn(64, 64))
    v = torch.nn.Parameter(torch.randn(64, 64))
    opt = lo.GaLoreAdamW([w, v], bits=8, min_8bit_size=0)
    w.grad, v.grad = torch.randn(64, 64), torch.randn(64, 64)
    opt.step()
    opt.param_groups[0]["block_size"] = 100
    snap = ([w.detach().clone(), v.detach().clone()], copy.deepcopy(opt.state_dict()))
    with pytest.raises(ValueError, match="block_size=100"):
        opt.step()
    assert torch.equal(w, snap[0][0]) and torch.equal(v, snap[0][1])
    assert int(opt.state[w]["step"]) == 1


def test_meta_parameters_step_with_default_settings():
    """Meta tensors hold no values: the NaN check has nothing to read (it used to call
    .item() on them), the step runs as in the analytic profiler."""
    with torch.device("meta"):
        model = _model()
    opt = OPTIMIZERS["GaLoreAdamW"](model)
    for p in model.parameters():
        p.grad = torch.empty_like(p)
    opt.step()
    assert all(s["step"].is_meta or int(s["step"]) == 1 for s in opt.state.values())


