"""The optimizers under the engines the recipes use: DeepSpeed-style flattening (simulated),
refresh-on-rank-0 broadcast (DDP) and FSDP2 shards (torch's fully_shard on gloo, 2 processes)."""

import os
import sys

import pytest
import torch
import torch.distributed as dist

import lowrank_optim as lo
from lowrank_optim import distributed
from tests.helpers import (
    init_gloo,
    lm_loss,
    replay_recorded_steps,
    spawn_two,
    tiny_llama,
    token_batches,
)

# -- DeepSpeed ZeRO hands the optimizer flattened 1-D partitions: detect, never train unprojected


def _flatten_like_zero(opt):
    """What DeepSpeed ZeRO 1/2 does to a client optimizer: each group's tensors are replaced by
    one flat fp32 partition (and gradients arrive on that partition)."""
    flats = []
    for group in opt.param_groups:
        flat = torch.cat([p.detach().reshape(-1) for p in group["params"]]).clone()
        flat.grad = torch.randn_like(flat)
        group["params"] = [flat]
        flats.append(flat)
    return flats


@pytest.mark.parametrize("name", ["galore_adamw", "dct_adamw", "galore_adafactor"])
def test_flattened_groups_raise_instead_of_training_unprojected(name):
    model = tiny_llama()
    opt = lo.create_optimizer(model, name, rank=8, lr=1e-3 if "adamw" in name else None)
    flats = _flatten_like_zero(opt)
    before = [f.detach().clone() for f in flats]
    with pytest.raises(ValueError, match="matrices were replaced by 1 1-D tensor.*ZeRO"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, flats, strict=True))  # nothing changed
    assert not opt.state


def test_zero3_partitioned_parameters_are_rejected_and_plain_1d_groups_still_train():
    model = tiny_llama()
    weight = model.model.layers[0].mlp.up_proj.weight
    weight.ds_shape = weight.shape  # what deepspeed.zero.Init leaves on a partitioned parameter
    with pytest.raises(ValueError, match="ZeRO-3 partitioned"):
        lo.GaLoreAdamW([{"params": [weight], "rank": 4}])
    bias = torch.nn.Parameter(torch.zeros(5))  # built 1-D: galore-torch updates it unprojected
    opt = lo.GaLoreAdamW([{"params": [bias], "rank": 4}], lr=0.1)
    bias.grad = torch.ones(5)
    opt.step()
    assert (bias < 0).all()


def test_adamw_baseline_trains_on_flattened_groups():
    model = tiny_llama()
    opt = lo.create_optimizer(model, "adamw", lr=1e-3)
    flats = _flatten_like_zero(opt)
    before = flats[0].detach().clone()
    opt.step()
    assert not torch.equal(before, flats[0])


# -- multi-process scenarios (gloo, 2 ranks), one spawn for several checks ---------------------


def _nondeterministic_refresh(projector, rank):
    """Make ``projector``'s refresh rank-dependent (as a nondeterministic SVD would be)."""
    inner = projector.refresh

    def refresh(grad, state, group, rule):
        noise = torch.randn(grad.shape, generator=torch.Generator().manual_seed(100 + rank))
        return inner(grad + 1e-2 * grad.norm() * noise, state, group, rule)

    projector.refresh = refresh


BROADCAST_CASES = [(name, use) for name in ("galore_adamw", "dct_adamw") for use in (False, True)]


def _broadcast_worker(rank, world, port, out):
    init_gloo(rank, world, port)
    for name, use_broadcast in BROADCAST_CASES:
        model = tiny_llama()
        opt = lo.create_optimizer(model, name, rank=8, update_proj_gap=3, lr=1e-2)
        _nondeterministic_refresh(opt.projector, rank)
        if use_broadcast:
            distributed.broadcast_refreshes(opt)
        for ids in token_batches(7, seed=5):  # identical gradients on both ranks, as under DDP
            opt.zero_grad()
            lm_loss(model, ids).backward()
            opt.step()
        state = [t for s in opt.state.values() for _, t in sorted(s.items())
                 if isinstance(t, torch.Tensor)]
        result = {"params": distributed.digest(model.parameters()),
                  "subspaces": distributed.digest(distributed.subspace_tensors(opt)),
                  "state": distributed.digest(state)}
        try:
            distributed.check_in_sync(model, opt)
            result["in_sync"] = True
        except RuntimeError as e:
            assert "Ranks disagree on their parameters and subspaces" in str(e)
            result["in_sync"] = False
        torch.save(result, os.path.join(out, f"{name}-{use_broadcast}-{rank}.pt"))
    dist.destroy_process_group()


def test_broadcast_refreshes_makes_nondeterministic_refreshes_agree(tmp_path):
    spawn_two(_broadcast_worker, tmp_path)
    for name, use_broadcast in BROADCAST_CASES:
        r0, r1 = (torch.load(tmp_path / f"{name}-{use_broadcast}-{r}.pt") for r in (0, 1))
        if use_broadcast:  # rank 0's refreshes everywhere: replicas stay bit-identical
            assert r0 == r1 and r0["in_sync"], name
        else:  # the simulated nondeterminism really splits the replicas
            assert r0["subspaces"] != r1["subspaces"] and r0["params"] != r1["params"], name
            assert not r0["in_sync"] and not r1["in_sync"], name


# -- FSDP2: the shard-local step equals the unsharded step (same gradients) --------------------

SHARDED = {
    "galore_std": ("galore_adamw", dict(rank=8, update_proj_gap=2, lr=1e-2)),  # right + left
    "galore_full": ("galore_adamw", dict(rank=8, update_proj_gap=2, lr=1e-2, proj_type="full")),
    "dct_rotate": ("dct_adamw", dict(rank=8, lr=1e-2, rotate_moments=True)),
    "galore_broadcast": ("galore_adamw", dict(rank=8, update_proj_gap=2, lr=1e-2)),
    # cheap refreshes: each rank computes the replicated basis itself, so ranks must agree
    "galore_randomized": ("galore_adamw", dict(rank=8, update_proj_gap=2, lr=1e-2,
                                               svd_method="randomized")),
    "galore_warm": ("galore_adamw", dict(rank=8, update_proj_gap=2, lr=1e-2, svd_method="warm",
                                         proj_type="full")),
    "adamw": ("adamw", dict(lr=1e-2)),
}
UNSHARDABLE = {  # name: (optimizer, kwargs, the reason the error must give)
    "galore_adafactor": ("galore_adafactor", dict(rank=8, lr=1e-2, relative_step=False),
                         "inner rule 'adafactor' is not elementwise"),
    "sst_adamw": ("sst_adamw", dict(rank=8, lr=1e-2),
                  "does not support FSDP2: Sparse Spectral Training"),
    "dct_error_feedback": ("dct_adamw", dict(rank=8, lr=1e-2, error_feedback=True),
                           "error_feedback=True is not supported under FSDP2"),
    "galore_adamw8bit": ("galore_adamw8bit", dict(rank=8, lr=1e-2),
                         "bits=8 is not supported under FSDP2: low-bit optimizer state"),
    "apollo_adamw": ("apollo_adamw", dict(rank=8, lr=1e-2), "inner rule 'apollo' is not "
                     "elementwise"),
    "fira_adamw": ("fira_adamw", dict(rank=8, lr=1e-2), "inner rule 'fira' is not elementwise"),
}


def _fsdp_model(sst_rank=None):
    from torch.distributed.fsdp import fully_shard

    model = tiny_llama()
    if sst_rank:  # as in the recipe: SST converts the model before it is sharded
        lo.sst.convert(model, rank=sst_rank)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _count_calls(obj, method: str) -> list:
    """Record each call of ``obj.method`` (if it has one) in the returned list."""
    calls: list = []
    inner = getattr(obj, method, None)
    if inner is not None:
        def counted(*args, **kwargs):
            calls.append(1)
            return inner(*args, **kwargs)
        setattr(obj, method, counted)
    return calls


def _fsdp_worker(rank, world, port, out):
    init_gloo(rank, world, port)
    for case, (name, kwargs) in SHARDED.items():
        model = _fsdp_model()
        opt = lo.create_optimizer(model, name, **kwargs)
        if case.endswith("broadcast"):
            distributed.broadcast_refreshes(opt)
        shard_refreshes = _count_calls(getattr(opt, "projector", None), "refresh_rows")
        grads, params = [], []
        for ids in token_batches(4, batch=4, seq=32, seed=1):
            opt.zero_grad()
            local = ids[2 * rank:2 * rank + 2]
            lm_loss(model, local).backward()
            grads.append({n: p.grad.full_tensor() for n, p in model.named_parameters()})
            opt.step()
            params.append({n: p.full_tensor() for n, p in model.named_parameters()})
        moments = [type(v).__name__ for s in opt.state.values() for k, v in s.items()
                   if k.startswith("exp_")]
        if rank == 0:
            torch.save({"grads": grads, "params": params, "moments": moments,
                        "shard_refreshes": len(shard_refreshes),
                        "bytes": lo.memory.state_bytes(opt).total},
                       os.path.join(out, f"{case}.pt"))
    errors = {}
    for case, (name, kwargs, _) in UNSHARDABLE.items():
        model = _fsdp_model(sst_rank=kwargs["rank"] if name == "sst_adamw" else None)
        try:
            lo.create_optimizer(model, name, **kwargs)
        except NotImplementedError as e:
            errors[case] = str(e)
    if rank == 0:
        torch.save(errors, os.path.join(out, "errors.pt"))
    dist.destroy_process_group()


def test_fsdp2_sharded_steps_equal_unsharded_steps_or_fail_fast(tmp_path):
    """One spawn for every case (a module fixture would run once per xdist worker)."""
    spawn_two(_fsdp_worker, tmp_path)
    for case, (name, kwargs) in SHARDED.items():
        rec = torch.load(tmp_path / f"{case}.pt")
        model = tiny_llama()
        opt = lo.create_optimizer(model, name, **kwargs)
        replay_recorded_steps(model, opt, rec, case)
        # moments of shard-local steps are DTensors (checkpointed as shards), the rest plain
        assert "DTensor" in rec["moments"], case
        assert 0 < rec["bytes"] < lo.memory.state_bytes(opt).total, case
        if name == "dct_adamw":  # 6 right-side weights per layer x 2 layers x 4 steps
            assert rec["shard_refreshes"] == 6 * 2 * 4, rec["shard_refreshes"]
    errors = torch.load(tmp_path / "errors.pt")
    for case, (_, _, reason) in UNSHARDABLE.items():
        assert case in errors and reason in errors[case], (case, errors.get(case))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
