"""Bad input gets a clear error naming the parameter (table-driven)."""

import pytest
import torch
from torch import nn

import lowrank_optim as lo


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _groups(**kw):
    return lo.param_groups(_model(), **{"rank": 2, **kw})


BAD_HYPERPARAMS = [
    (lo.GaLoreAdamW, dict(lr=-1.0), "lr"),
    (lo.GaLoreAdamW, dict(lr=float("nan")), "lr"),
    (lo.GaLoreAdamW, dict(betas=(1.0, 0.999)), "betas[0]"),
    (lo.GaLoreAdamW, dict(betas=(0.9, -0.1)), "betas[1]"),
    (lo.GaLoreAdamW, dict(betas=(0.9,)), "betas"),
    (lo.GaLoreAdamW, dict(eps=-1e-8), "eps"),
    (lo.GaLoreAdamW, dict(weight_decay=-0.1), "weight_decay"),
    (lo.GaLoreAdamW, dict(formula="adam"), "formula"),
    (lo.GaLoreAdamW, dict(nonfinite="zero"), "nonfinite"),
    (lo.GaLoreAdafactor, dict(lr=1e-3), "relative_step"),
    (lo.GaLoreAdafactor, dict(relative_step=False), "lr=None"),
    (lo.GaLoreAdafactor, dict(warmup_init=True, relative_step=False, lr=1.0), "warmup_init"),
    (lo.GaLoreAdafactor, dict(beta1=1.5), "beta1"),
    (lo.GaLoreAdafactor, dict(decay_rate=0.8), "decay_rate"),
    (lo.GaLoreAdafactor, dict(clip_threshold=0.0), "clip_threshold"),
]


@pytest.mark.parametrize(("cls", "kwargs", "needle"), BAD_HYPERPARAMS)
def test_bad_hyperparameters_raise_naming_them(cls, kwargs, needle):
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        cls(_groups(), **kwargs)


BAD_GROUPS = [
    (dict(rank=0), "rank=0"),
    (dict(rank=-3), "rank=-3"),
    (dict(rank=2.5), "rank=2.5"),
    (dict(rank=5), r"2\.weight.*rank=5 exceeds min\(m, n\)=4"),
    (dict(update_proj_gap=0), "update_proj_gap"),
    (dict(proj_type="diagonal"), "proj_type"),
    (dict(scale=0.0), "scale"),
]


@pytest.mark.parametrize(("group_kw", "needle"), BAD_GROUPS)
def test_bad_group_settings_raise_naming_the_parameter(group_kw, needle):
    model = _model()
    group = {"params": [model[0].weight, model[2].weight], "param_names": ["0.weight", "2.weight"],
             "rank": 2, **group_kw}
    with pytest.raises(ValueError, match=needle):
        lo.GaLoreAdamW([group])


def test_param_groups_leaves_layers_smaller_than_rank_unprojected(caplog):
    with caplog.at_level("INFO", logger="lowrank_optim"):
        groups = lo.param_groups(_model(), rank=6)
    assert groups[0]["param_names"] == ["0.weight"]
    assert "2.weight" in groups[1]["param_names"]
    assert "1 of them Linear weights with min(m, n) < rank=6" in caplog.text


def test_non_2d_tensor_in_projected_group_is_rejected():
    conv = nn.Conv2d(3, 8, 3)
    with pytest.raises(ValueError, match="needs a 2-D weight but got 4-D"):
        lo.GaLoreAdamW([{"params": [conv.weight], "param_names": ["conv.weight"], "rank": 2}])


def test_one_d_tensors_in_projected_group_are_updated_unprojected():
    weight, bias = nn.Parameter(torch.zeros(5, 4)), nn.Parameter(torch.zeros(5))
    opt = lo.GaLoreAdamW([{"params": [weight, bias], "rank": 2}], lr=0.1)
    weight.grad, bias.grad = torch.randn(5, 4), torch.ones(5)
    opt.step()
    assert torch.all(bias < 0)
    assert "exp_avg" in opt.state[bias] and opt.state[bias]["exp_avg"].shape == (5,)


def test_complex_parameter_is_rejected():
    p = nn.Parameter(torch.zeros(4, 4, dtype=torch.complex64))
    with pytest.raises(ValueError, match="complex parameters"):
        lo.GaLoreAdamW([p])


def test_sparse_gradient_raises_naming_parameter():
    emb = nn.Embedding(10, 4, sparse=True)
    opt = lo.GaLoreAdamW([{"params": [emb.weight], "param_names": ["emb.weight"]}])
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="emb.weight.*sparse gradients"):
        opt.step()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_raises_before_any_change(bad):
    model = _model()
    opt = lo.GaLoreAdamW(lo.param_groups(model, rank=2), lr=0.1)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    params = [p.detach().clone() for p in model.parameters()]
    # keyed by parameter: every parameter's state, not only the last one's (more places and
    # modes in tests/test_nonfinite.py)
    state = {p: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    model(torch.randn(3, 8)).sum().backward()
    model[2].weight.grad[0, 0] = bad
    with pytest.raises(RuntimeError, match=r"non-finite.*2\.weight"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    assert len(state) == len(list(model.parameters()))
    for p, saved in state.items():
        assert opt.state[p].keys() == saved.keys()
        assert all(torch.equal(opt.state[p][k], v) for k, v in saved.items())


def test_nonfinite_skip_mode_warns_and_leaves_everything_untouched():
    model = _model()
    opt = lo.GaLoreAdamW(lo.param_groups(model, rank=2), lr=0.1, nonfinite="skip")
    params = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(3, 8)).sum().backward()
    model[0].weight.grad[1, 1] = float("nan")
    with pytest.warns(RuntimeWarning, match="Skipping optimizer step"):
        opt.step()
    assert opt.skipped_steps == 1 and not opt.state
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))


def test_unknown_target_modules_error_lists_linear_names():
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        lo.param_groups(_model(), ["attn"])


def test_unknown_optimizer_name():
    with pytest.raises(ValueError, match="Unknown optimizer name='galore_sgd'"):
        lo.create_optimizer(_model(), "galore_sgd")
