"""Param-group builder (HF optim_target_modules semantics), registry and memory accounting."""

import pytest
import torch

import lowrank_optim as lo
from lowrank_optim.memory import adamw_state_bytes, state_bytes
from tests.helpers import lm_loss, tiny_llama, token_batches, train

galore_torch = pytest.importorskip("galore_torch")


def _names(groups):
    return groups[0]["param_names"]


def test_all_linear_targets_every_linear_but_lm_head():
    model = tiny_llama()
    names = _names(lo.param_groups(model, "all-linear", rank=4))
    assert len(names) == 2 * 7  # q k v o gate up down per layer
    assert not any("lm_head" in n or "embed" in n or "norm" in n for n in names)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (["attn"], 8),  # substring
        (["q_proj", "v_proj"], 4),
        (r".*mlp\.(gate|up)_proj", 4),  # regex string, full match
        ([r".*layers\.1\.mlp\..*"], 3),  # regex in a list
        ("model.layers.0.self_attn.q_proj", 1),  # exact name
    ],
)
def test_target_module_forms(target, expected):
    assert len(_names(lo.param_groups(tiny_llama(), target, rank=4))) == expected


def test_every_trainable_param_lands_in_exactly_one_group():
    model = tiny_llama()
    groups = lo.param_groups(model, ["mlp"], rank=4)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))


def test_one_summary_line_instead_of_warning_flood(caplog):
    with caplog.at_level("INFO", logger="lowrank_optim"):
        lo.param_groups(tiny_llama(), ["mlp", "input_layernorm"], rank=4)
    records = [r for r in caplog.records if r.name == "lowrank_optim"]
    assert len(records) == 1
    assert "6 Linear weights" in records[0].message
    assert "ignored 2 matched non-Linear modules" in records[0].message


def test_create_optimizer_builds_projected_groups():
    model = tiny_llama()
    opt = lo.create_optimizer(model, "galore_adamw", lr=1e-2, rank=8, scale=0.25)
    assert isinstance(opt, lo.GaLoreAdamW)
    assert opt.param_groups[0]["rank"] == 8 and opt.param_groups[0]["scale"] == 0.25
    assert opt.param_groups[1]["rank"] is None
    assert isinstance(lo.create_optimizer(model, "adamw", lr=1e-3), torch.optim.AdamW)
    assert {"galore_adamw", "galore_adafactor", "adamw"} <= set(lo.available())


def test_state_bytes_match_the_analytic_count():
    model = tiny_llama()
    r = 8
    groups = lo.param_groups(model, rank=r, update_proj_gap=2)
    opt = lo.GaLoreAdamW(groups)
    train(model, opt, token_batches(3))
    expected = {"moments": 0, "projectors": 0, "other": 0}
    for p in groups[0]["params"]:
        m, n = p.shape
        expected["moments"] += 2 * r * max(m, n) * 4
        expected["projectors"] += r * min(m, n) * 4
        expected["other"] += 4 + 8  # step (fp32) + refresh_step (int64)
    for p in groups[1]["params"]:
        expected["moments"] += 2 * p.numel() * 4
        expected["other"] += 4
    got = state_bytes(opt)
    assert (got.moments, got.projectors, got.other, got.indices) == (
        expected["moments"], expected["projectors"], expected["other"], 0)
    assert got.num_params == sum(p.numel() for p in model.parameters())
    assert got.total < adamw_state_bytes(model.parameters())
    assert got.bytes_per_param == pytest.approx(got.total / got.num_params)


def test_state_bytes_not_above_galore_torch_at_equal_rank():
    """galore-torch keeps a view of the whole SVD factor alive; we keep only the r vectors."""
    kw = dict(rank=8, update_proj_gap=2, scale=0.25)
    a, b = tiny_llama(), tiny_llama()
    ours = lo.GaLoreAdamW(lo.param_groups(a, **kw))
    ref = galore_torch.GaLoreAdamW(lo.param_groups(b, **kw))
    train(a, ours, token_batches(3))
    train(b, ref, token_batches(3))
    mine, theirs = state_bytes(ours), state_bytes(ref)
    assert mine.moments == theirs.moments
    assert mine.projectors < theirs.projectors
    assert mine.total < theirs.total


def test_bf16_params_train_with_fp32_svd():
    model = tiny_llama().to(torch.bfloat16)
    opt = lo.GaLoreAdamW(lo.param_groups(model, rank=8, update_proj_gap=5), lr=3e-3)
    losses = []
    for ids in token_batches(40, seed=5):
        opt.zero_grad()
        loss = lm_loss(model, ids)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(map(lambda x: x == x, losses))
    assert sum(losses[-5:]) / 5 < losses[0] - 0.3
    state = next(s for s in opt.state.values() if "proj_right" in s or "proj_left" in s)
    basis = state.get("proj_right", state.get("proj_left"))
    assert basis.dtype == torch.bfloat16
    assert state["exp_avg"].dtype == torch.bfloat16


def test_projected_param_names_are_unique_across_unnamed_groups():
    a, b = (torch.nn.Parameter(torch.randn(8, 8)) for _ in range(2))
    opt = lo.GaLoreAdamW([{"params": [a], "rank": 2}, {"params": [b], "rank": 4}])
    names = [name for name, _, _ in opt.projected_params()]
    assert names == ["group0.param0", "group1.param0"]


# -- README promises: head selection, rank above every weight, state_bytes printing ---------
def test_all_linear_plus_head_adds_an_untied_head_only():
    model = tiny_llama()
    names = _names(lo.param_groups(model, "all-linear+head", rank=4))
    assert len(names) == 2 * 7 + 1 and names[-1] == "lm_head.weight"
    tied = tiny_llama(tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    # a tied head is the embedding: never projected (the HF Trainer's GaLore selects by
    # parameter name, and a tied head's weight is named after the embedding)
    assert len(_names(lo.param_groups(tied, "all_linear+head", rank=4))) == 2 * 7


@pytest.mark.parametrize("name", ["galore_adamw", "dct_adamw", "galore_adamw8bit",
                                  "galore_adafactor", "sst_adamw"])
def test_rank_above_every_weight_trains_everything_unprojected(name, caplog):
    """The README's promise: weights narrower than rank go to the plain group, even when that
    is all of them (rank=128 on hidden 64), with a warning naming the rank that projects."""
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with caplog.at_level("INFO", logger="lowrank_optim"):
        opt = lo.create_optimizer(model, name, **({"lr": 1e-3, "relative_step": False}
                                                  if "adafactor" in name else {}))
    warnings = [r.message for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "rank=128 exceeds" in warnings[0] and "rank <= 64" in \
        warnings[0]
    assert not any(g.get("rank") for g in opt.param_groups)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(before)
    assert not any(type(m).__name__ == "SpectralLinear" for m in model.modules())
    losses = train(model, opt, token_batches(3))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert state_bytes(opt).projectors == 0


def test_sst_converts_only_layers_at_least_rank_wide():
    import torch.nn as nn

    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = lo.create_optimizer(model, "sst_adamw", rank=8)
    assert type(model[0]).__name__ == "SpectralLinear" and type(model[2]) is nn.Linear
    plain = [p for g in opt.param_groups if not g.get("rank") for p in g["params"]]
    assert any(p is model[2].weight for p in plain)
    with pytest.raises(ValueError, match=r"rank=8 exceeds its number of singular values"):
        lo.sst.convert(nn.Sequential(nn.Linear(32, 4)), rank=8)  # explicit convert: strict


def test_state_bytes_prints_units_bytes_per_param_and_the_empty_case():
    model = tiny_llama()
    opt = lo.create_optimizer(model, "galore_adamw", rank=8)
    n = sum(p.numel() for p in model.parameters())
    empty = str(state_bytes(opt))
    assert f"no optimizer state yet over {n:,} params" in empty and "first step()" in empty
    train(model, opt, token_batches(1))
    counts = state_bytes(opt)
    line = str(counts)
    assert f"= {counts.total / n:.3f} B/param" in line and f"over {n:,} params" in line
    assert "moments" in line and "KiB" in line and "projectors" in line
    assert lo.memory.format_bytes(512) == "512 B"
    assert lo.memory.format_bytes(3 * 2**30 + 2**29) == "3.50 GiB"


def test_summary_line_names_the_optimizer_and_its_lr(caplog):
    with caplog.at_level("INFO", logger="lowrank_optim"):
        lo.create_optimizer(tiny_llama(), "dct_adamw", rank=8, lr=3e-3)
        lo.create_optimizer(tiny_llama(), "adamw", lr=2e-4)
    lines = [r.message for r in caplog.records if r.name == "lowrank_optim"]
    assert len(lines) == 2
    assert "rank-8 projection for 14 Linear weights" in lines[0]
    assert lines[0].endswith("dct_adamw (DCTAdamW) lr=0.003")
    assert lines[1].endswith("adamw (AdamW) lr=0.0002")
