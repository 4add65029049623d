"""ZeRO-1 by whole parameters (torch's ZeroRedundancyOptimizer over the low-rank optimizers) on
2 gloo ranks: equal to DDP, a smaller state per rank, exact resume through
``consolidate_state_dict``, and clear refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lowrank_optim as lo
from tests.helpers import init_gloo, record_steps, spawn_two, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
#: equal to DDP bit for bit (whole parameters stepped by their owner)
EXACT = {"galore_adamw": dict(rank=8, update_proj_gap=2, lr=1e-2),
         "dct_adamw": dict(rank=8, lr=1e-2),
         "galore_adamw8bit": dict(rank=8, update_proj_gap=2, lr=1e-2, min_8bit_size=256)}


def _ddp(model):
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model)


def _state_bytes(opt):
    sb = lo.memory.state_bytes(opt)
    return sb.total, sb.moments


def _worker(rank, world, port, out):
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer

    init_gloo(rank, world, port)
    results = {}
    for name, kwargs in EXACT.items():
        runs = {}
        for zero1 in (False, True):
            model = tiny_llama()
            opt = lo.create_optimizer(model, name, zero1=zero1, **kwargs)
            runs[zero1] = (record_steps(_ddp(model), opt, rank, steps=4), _state_bytes(opt))
        (ddp, ddp_bytes), (zero, zero_bytes) = runs[False], runs[True]
        diff = max((a[k] - b[k]).abs().max().item()
                   for a, b in zip(ddp["params"], zero["params"], strict=True) for k in a)
        results[name] = {"diff": diff, "bytes": (ddp_bytes, zero_bytes)}
    # the call: projection settings as keyword defaults of the wrapped class
    model = tiny_llama()
    groups = lo.param_groups(model, rank=8, update_proj_gap=2, scale=0.25)
    plain = [p for g in groups if g.get("rank") is None for p in g["params"]]
    projected = [p for g in groups if g.get("rank") is not None for p in g["params"]]
    opt = ZeroRedundancyOptimizer([{"params": plain, "rank": None}, {"params": projected}],
                                  optimizer_class=lo.GaLoreAdamW, lr=1e-2, rank=8,
                                  update_proj_gap=2, scale=0.25)
    keyword = record_steps(_ddp(model), opt, rank, steps=2)["params"][-1]
    model = tiny_llama()
    same = lo.create_optimizer(model, "galore_adamw", zero1=True, rank=8, update_proj_gap=2,
                               scale=0.25, lr=1e-2)
    registry = record_steps(_ddp(model), same, rank, steps=2)["params"][-1]
    results["keyword"] = max((keyword[k] - registry[k]).abs().max().item() for k in keyword)
    # resume: 2 steps, consolidate on rank 0, save, every rank loads, 2 more == 4 steps
    name, kwargs = "galore_adamw", EXACT["galore_adamw"]
    full_model = tiny_llama()
    full = lo.create_optimizer(full_model, name, zero1=True, **kwargs)
    uninterrupted = record_steps(_ddp(full_model), full, rank, steps=4)["params"][-1]
    model = tiny_llama()
    opt = lo.create_optimizer(model, name, zero1=True, **kwargs)
    ddp = _ddp(model)
    record_steps(ddp, opt, rank, steps=2)
    opt.consolidate_state_dict(to=0)
    if rank == 0:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, f"{out}/ckpt.pt")
    dist.barrier()
    saved = torch.load(f"{out}/ckpt.pt", weights_only=True)
    fresh_model = tiny_llama(seed=99)
    fresh_model.load_state_dict(saved["model"])
    fresh = lo.create_optimizer(fresh_model, name, zero1=True, **kwargs)
    fresh.load_state_dict(saved["opt"])
    resumed = _resume_steps(_ddp(fresh_model), fresh, rank)
    results["resume"] = max((uninterrupted[k] - resumed[k]).abs().max().item()
                            for k in uninterrupted)
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def _resume_steps(ddp, opt, rank):
    """Steps 3 and 4 of :func:`record_steps`'s batches (the ones the cut run did not take)."""
    from tests.helpers import token_batches

    model = ddp.module
    for ids in token_batches(4, batch=4, seq=32, seed=1)[2:]:
        opt.zero_grad()
        local = ids[2 * rank:2 * rank + 2]
        ddp(input_ids=local, labels=local).loss.backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_zero1_equals_ddp_splits_the_state_and_resumes_exactly(tmp_path):
    spawn_two(_worker, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for name in EXACT:
        assert r0[name]["diff"] == 0.0 and r1[name]["diff"] == 0.0, (name, r0[name], r1[name])
        (ddp_total, ddp_moments), (zero_total, zero_moments) = r0[name]["bytes"]
        other_total, other_moments = r1[name]["bytes"][1]
        # each rank holds the moments of its share of the tensors (split, not copied) and
        # well under DDP's whole state; DCT's shared bases are held by both
        assert zero_moments + other_moments == ddp_moments, name
        assert max(zero_total, other_total) < 0.8 * ddp_total, (name, r0, r1)
    assert r0["keyword"] == 0.0 and r1["keyword"] == 0.0  # keyword defaults == param groups
    # the profiler's analytic per-rank bytes (meta device) equal the measured ones
    from lowrank_optim.profile import profile

    for name, kwargs in EXACT.items():
        analytic = profile("tiny", name, rank=8, precision="fp32", world_size=2,
                           engine="zero1",
                           opt_args={k: v for k, v in kwargs.items() if k != "rank"})
        measured = [r0[name]["bytes"][1][0], r1[name]["bytes"][1][0]]
        assert analytic.settings["per_rank_state"] == measured, name
        assert analytic.optimizer_state == max(measured), name
    assert r0["resume"] == 0.0 and r1["resume"] == 0.0


def test_zero1_refusals_name_the_fix():
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        lo.create_optimizer(tiny_llama(), "galore_adamw", rank=8, zero1=True)
    with pytest.raises(NotImplementedError, match="SST's U, S and V"):
        lo.create_optimizer(tiny_llama(), "sst_adamw", rank=8, zero1=True)
    with pytest.raises(ValueError, match="zero1"):
        lo.create_optimizer(tiny_llama(), "galore_adamw", rank=8, zero1="yes")


@pytest.mark.parametrize("flags, clash", [
    (["--refresh-sync", "broadcast"], "--refresh-sync"),
    (["--deepspeed", str(ROOT / "recipes" / "accelerate" / "ds_zero0.json")], "--deepspeed"),
])
def test_recipe_refuses_zero1_with_what_it_cannot_combine(flags, clash):
    from recipes import config

    with pytest.raises(config.RecipeError, match=f"zero1.*{clash}"):
        config.parse_args(["--config", str(ROOT / "recipes" / "configs" / "tiny_test.yaml"),
                           "--zero1", "true", *flags])


@pytest.mark.parametrize("kwargs, match", [
    (dict(world_size=0, engine="zero1"), "world_size"),
    (dict(world_size=2, engine="fsdp1"), "engine must be one of"),
    (dict(world_size=2, engine="zero1", mode="measured"), "analytic"),
    (dict(world_size=2, engine="fsdp2", mode="measured"), "analytic"),
    (dict(world_size=2, engine="zero1", layerwise=True), "steps after backward"),
    (dict(world_size=2, engine="fsdp2", ddp_bucket_view=True), "ddp_bucket_view"),
    (dict(world_size=1, ddp_bucket_view=True), "world_size > 1"),
])
def test_profile_engine_settings_are_checked(kwargs, match):
    from lowrank_optim.profile import profile

    with pytest.raises(ValueError, match=match):
        profile("tiny", "galore_adamw", rank=8, **kwargs)


def test_profile_cli_reports_one_gpu_of_a_zero1_run(capsys):
    from lowrank_optim.profile import main

    assert main(["--model", "tiny", "--optimizer", "galore_adamw", "--rank", "8",
                 "--world-size", "2", "--engine", "zero1"]) == 0
    assert "zero1 x 2 (one GPU's bytes; DDP gradient_as_bucket_view=False)" in (
        capsys.readouterr().out)
