"""Every public entry point refuses wrong types, values and combinations with a message that
names the parameter (table-driven: each row would fail if its check were removed)."""

import pytest
import torch

import lowrank_optim as lo
from tests.helpers import tiny_llama

ADAM_NAMES = ["galore_adamw", "galore_adamw8bit", "dct_adamw", "dct_adamw8bit", "sst_adamw",
              "sst_adamw8bit"]
ADAFACTOR_NAMES = ["galore_adafactor", "dct_adafactor"]

ADAM_BAD = [
    (dict(lr="1e-3"), r"lr='1e-3'.*real number, got str.*without quotes"),
    (dict(lr=-1.0), r"lr=-1.0"),
    (dict(lr=float("nan")), r"lr=nan"),
    (dict(lr=True), r"lr=True.*real number"),
    (dict(betas=0.9), r"betas=0.9: expected a tuple of 2 numbers"),
    (dict(betas=(0.9,)), r"betas=\(0.9,\)"),
    (dict(betas=(0.9, "0.999")), r"betas\[1\]='0.999'"),
    (dict(betas=(0.9, 1.0)), r"betas\[1\]=1.0"),
    (dict(eps="1e-8"), r"eps='1e-8'.*real number"),
    (dict(eps=-1e-8), r"eps=-1e-08"),
    (dict(weight_decay="0.1"), r"weight_decay='0.1'"),
    (dict(weight_decay=-0.1), r"weight_decay=-0.1"),
    (dict(bits=4), r"bits=4"),
    (dict(block_size=0), r"block_size=0"),
    (dict(code="nf4"), r"code='nf4'"),
    (dict(nonfinite="warn"), r"nonfinite='warn'"),
]
ADAFACTOR_BAD = [
    (dict(lr="1e-3", relative_step=False), r"lr='1e-3'"),
    (dict(lr=1e-3, eps=1e-8, relative_step=False), r"eps=1e-08: expected a tuple of 2"),
    (dict(lr=1e-3, eps=(1e-30, "1e-3"), relative_step=False), r"eps\[1\]='1e-3'"),
    (dict(lr=1e-3), r"relative_step=True"),  # HF's combination rule, with the fix
    (dict(lr=None, relative_step=False), r"lr=None needs relative_step=True"),
    (dict(decay_rate="-0.8"), r"decay_rate='-0.8'"),
    (dict(decay_rate=0.5), r"decay_rate=0.5"),
    (dict(clip_threshold=0), r"clip_threshold=0"),
    (dict(beta1=1.5), r"beta1=1.5"),
    (dict(bits=8), r"takes no argument 'bits' \(8-bit state is for the Adam-based"),
]
COMMON_BAD = [
    (dict(rank=0), r"rank=0"),
    (dict(rank=2.5), r"rank=2.5"),
    (dict(rank="8"), r"rank='8'"),
]
PROJECTION_BAD = [
    (dict(update_proj_gap=0), r"update_proj_gap=0"),
    (dict(update_proj_gap=1.5), r"update_proj_gap=1.5"),
    (dict(scale=0), r"scale=0"),
    (dict(scale="0.25"), r"scale='0.25'"),
    (dict(proj_type="diagonal"), r"proj_type='diagonal'"),
]


def _cases():
    for name in ADAM_NAMES:
        for kw, needle in ADAM_BAD + COMMON_BAD:
            if "8bit" in name and kw.get("bits") == 4:
                needle = "bits=4"
            yield name, kw, needle
        if not name.startswith("sst"):
            for kw, needle in PROJECTION_BAD:
                yield name, kw, needle
    for name in ADAFACTOR_NAMES:
        for kw, needle in ADAFACTOR_BAD + COMMON_BAD + PROJECTION_BAD:
            kw = {"lr": None, **kw} if "lr" not in kw else kw
            yield name, kw, needle


CASES = list(_cases())


@pytest.mark.parametrize(("name", "kw", "needle"), CASES,
                         ids=[f"{n}-{'-'.join(map(str, k))}-{i}" for i, (n, k, _) in
                              enumerate(CASES)])
def test_create_optimizer_refuses_bad_settings(name, kw, needle):
    model = tiny_llama()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=needle):
        lo.create_optimizer(model, name, **{"rank": 8, **kw})
    if not name.startswith("sst"):  # SST converts the model before building groups
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize(("call", "needle"), [
    (lambda m: lo.create_optimizer(m, "galore_adamww"), r"Did you mean 'galore_adamw'"),
    (lambda m: lo.create_optimizer(m, 3), r"name=3: pass one of"),
    (lambda m: lo.create_optimizer(list(m.parameters()), "galore_adamw"),
     r"needs the model .* got list"),
    (lambda m: lo.param_groups(list(m.parameters())), r"model must be a torch.nn.Module"),
    (lambda m: lo.param_groups(m, rank=0), r"rank=0"),
    (lambda m: lo.param_groups(m, target_modules=3), r"target_modules=3"),
    (lambda m: lo.param_groups(m, ["no_such_module"]), r"matched no nn.Linear"),
    (lambda m: lo.param_groups(m, rank=8, embedding_bits=16), r"embedding_bits=16"),
    (lambda m: lo.create_optimizer(m, "dct_adamw", rank=8, lrr=1e-3),
     r"takes no argument 'lrr'.*Did you mean 'lr'"),
    (lambda m: lo.param_groups(m.requires_grad_(False)), r"no trainable parameters"),
    (lambda m: lo.param_groups([x.requires_grad_(False) for x in
                                [p for n, p in m.named_parameters() if "proj" in n]] and m),
     r"weights are frozen \(requires_grad=False\)"),
    (lambda m: lo.create_optimizer(m, "galore_adamw", rank=8, correct_bias="no"),
     r"correct_bias='no'"),
])
def test_entry_points_name_the_wrong_argument(call, needle):
    with pytest.raises(ValueError, match=needle):
        call(tiny_llama())


@pytest.mark.parametrize(("call", "needle"), [
    (lambda m: lo.GaLoreAdamW(m), r"got the model .*param_groups\(model"),
    (lambda m: lo.memory.state_bytes(m), r"needs an optimizer .* got LlamaForCausalLM"),
])
def test_type_errors_say_what_to_pass(call, needle):
    with pytest.raises(TypeError, match=needle):
        call(tiny_llama())


def test_request_refresh_takes_one_tensor_too():
    opt = lo.create_optimizer(tiny_llama(), "galore_adamw", rank=8)
    _, param, _ = opt.projected_params()[0]
    opt.request_refresh(param)
    assert [p for p in opt.state] == [param] and "refresh_requested" in opt.state[param]

