"""Layer-wise updates past one process, on 2 gloo ranks: under DDP (each parameter steps in the
communication hook of its all-reduced bucket) and under FSDP2 (each shard steps after its
reduce-scatter), against the regular DDP / FSDP2 run, with and without gradient accumulation.

What is exact and what is not: without accumulation, and under FSDP2 (which accumulates the
sharded gradients itself), the layer-wise step uses the very gradient bits of the regular step,
so the parameters are equal bit for bit.  With accumulation under DDP the low-rank windows
project each micro-batch and average the projections over the ranks, which equals projecting
the averaged sum only to fp32 rounding (the same tolerance as one process's layer-wise
accumulation, tests/test_layerwise.py)."""

from __future__ import annotations

import contextlib

import pytest
import torch

import lowrank_optim as lo
from lowrank_optim.layerwise import LayerwiseOptimizer
from tests.helpers import init_gloo, lm_loss, spawn_two, tiny_llama, token_batches

CASES = {"galore_adamw": dict(rank=8, update_proj_gap=2, lr=1e-2),
         "dct_adamw": dict(rank=8, update_proj_gap=2, lr=1e-2)}
STEPS = 4
#: about 10 buckets for the tiny model (DDP's default would hold all of it in one)
BUCKET_MB = 0.05


def _train(module, opt, rank, accumulation, no_sync=None, gather=lambda t: t.detach().clone(),
           norms=None):
    """``STEPS`` optimizer steps of ``accumulation`` micro-batches (this rank's half of each
    batch of 4); ``no_sync`` (DDP's) wraps every micro-batch of a window but the last.
    ``norms`` collects each step's gradient norm (whole tensors, every parameter)."""
    model = getattr(module, "module", module)
    batches = token_batches(STEPS * accumulation, batch=4, seq=32, seed=1)
    params = []
    for k in range(0, len(batches), accumulation):
        for j, ids in enumerate(batches[k:k + accumulation]):
            local = ids[2 * rank:2 * rank + 2]
            quiet = no_sync is not None and j < accumulation - 1
            with no_sync() if quiet else contextlib.nullcontext():
                (lm_loss(module, local) / accumulation).backward()
        if norms is not None and not isinstance(opt, LayerwiseOptimizer):
            grads = [gather(p.grad) for p in model.parameters()]
            norms.append(float(torch.stack([g.square().sum() for g in grads]).sum().sqrt()))
        opt.step()
        if norms is not None and isinstance(opt, LayerwiseOptimizer):
            norms.append(float(opt.last_grad_norm))
        opt.zero_grad()
        params.append({n: gather(p) for n, p in model.named_parameters()})
    return params


def _diff(a, b):
    return max((x[k] - y[k]).abs().max().item() for x, y in zip(a, b, strict=True) for k in x)


def _ddp_runs(rank, name, kwargs, accumulation, layerwise, bucket_view=False):
    from torch.nn.parallel import DistributedDataParallel

    model = tiny_llama()
    ddp = DistributedDataParallel(model, bucket_cap_mb=BUCKET_MB,
                                  gradient_as_bucket_view=bucket_view)
    opt = lo.create_optimizer(model, name, **kwargs)
    if layerwise:
        opt = LayerwiseOptimizer(opt, gradient_accumulation_steps=accumulation).attach_ddp(ddp)
    return _train(ddp, opt, rank, accumulation, no_sync=ddp.no_sync)


def _fsdp_runs(rank, name, kwargs, accumulation, layerwise, norms=None):
    from tests.test_recipe_engines import _fsdp_model

    model = _fsdp_model()
    opt = lo.create_optimizer(model, name, **kwargs)
    if layerwise:
        opt = LayerwiseOptimizer(opt, gradient_accumulation_steps=accumulation)
    return _train(model, opt, rank, accumulation, gather=lambda t: t.full_tensor(), norms=norms)


def _peak(rank, layerwise):
    """Peak allocated bytes of 2 DDP optimizer steps (accumulation 2) after 2 warm-up steps."""
    from torch.nn.parallel import DistributedDataParallel

    from tests.test_layerwise import peak_allocated_bytes

    model = tiny_llama()
    ddp = DistributedDataParallel(model, bucket_cap_mb=BUCKET_MB)
    opt = lo.create_optimizer(model, "galore_adamw", rank=8, update_proj_gap=100, lr=1e-2)
    if layerwise:
        opt = LayerwiseOptimizer(opt, gradient_accumulation_steps=2).attach_ddp(ddp)
    batches = token_batches(8, batch=2, seq=8, seed=4)

    def loop(part):
        for k in range(0, len(part), 2):
            with ddp.no_sync():
                lm_loss(ddp, part[k][rank:rank + 1]).backward()
            lm_loss(ddp, part[k + 1][rank:rank + 1]).backward()
            opt.step()
            opt.zero_grad()

    loop(batches[:4])
    return peak_allocated_bytes(lambda: loop(batches[4:]))


def _errors(rank):
    from torch.nn.parallel import DistributedDataParallel

    out = {}
    model = tiny_llama()
    lw = LayerwiseOptimizer(lo.create_optimizer(model, "galore_adamw", rank=8))
    try:  # no DDP attached: a step on this rank's own gradient is refused
        lm_loss(model, token_batches(1)[0]).backward()
    except RuntimeError as e:
        out["no_ddp"] = str(e)
    lw.remove_hooks()
    model = tiny_llama()
    unused = DistributedDataParallel(model, find_unused_parameters=True)
    try:
        LayerwiseOptimizer(lo.create_optimizer(model, "galore_adamw", rank=8)).attach_ddp(unused)
    except ValueError as e:
        out["unused"] = str(e)
    model = tiny_llama()
    ddp = DistributedDataParallel(model)
    lw = LayerwiseOptimizer(lo.create_optimizer(model, "galore_adamw", rank=8),
                            gradient_accumulation_steps=2).attach_ddp(ddp)
    with ddp.no_sync():  # the window's last micro-batch never all-reduced
        lm_loss(ddp, token_batches(1)[0][rank:rank + 1]).backward()
    try:
        lw.step()
    except RuntimeError as e:
        out["no_sync"] = str(e)
    return out


def _worker(rank, world, port, out):
    import torch.distributed as dist

    init_gloo(rank, world, port)
    results = {}
    def view_runs(*args):
        return _ddp_runs(*args, bucket_view=True)

    for engine, runs in (("ddp", _ddp_runs), ("ddp-view", view_runs), ("fsdp2", _fsdp_runs)):
        for name, kwargs in CASES.items():
            for accumulation in (1, 2):
                if engine == "ddp-view" and name != "galore_adamw":
                    continue
                regular = runs(rank, name, kwargs, accumulation, False)
                layerwise = runs(rank, name, kwargs, accumulation, True)
                moved = _diff(regular, [{k: torch.zeros_like(v) for k, v in s.items()}
                                        for s in regular])
                results[engine, name, accumulation] = (_diff(regular, layerwise), moved)
    # a shard's norm is the whole gradient's (summed over ranks): what per-parameter clipping
    # and last_grad_norm use
    norms = {False: [], True: []}
    for layerwise in (False, True):
        _fsdp_runs(rank, "galore_adamw", CASES["galore_adamw"], 1, layerwise, norms[layerwise])
    results["norms"] = norms
    results["peak"] = (_peak(rank, False), _peak(rank, True))
    results["errors"] = _errors(rank)
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_layerwise_under_ddp_and_fsdp2_equals_the_regular_run(tmp_path):
    spawn_two(_worker, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for results in ranks:
        for (engine, name, accumulation), (diff, moved) in (
                (k, v) for k, v in results.items() if isinstance(k, tuple)):
            assert moved > 0.1, (engine, name)  # the runs trained
            if engine == "fsdp2" or accumulation == 1:
                assert diff == 0.0, (engine, name, accumulation, diff)
            else:  # projected per micro-batch, averaged over ranks: fp32 rounding
                assert 0 <= diff < 2e-5, (engine, name, accumulation, diff)
        assert results["norms"][True] == pytest.approx(results["norms"][False], rel=1e-5)
        regular, layerwise = results["peak"]
        grad_bytes = sum(p.numel() * 4 for p in tiny_llama().parameters())
        # DDP keeps its buckets (one copy of every gradient) in both runs; layer-wise frees
        # the param.grad copy the regular run holds until its optimizer step, and holds
        # at most a bucket's gradients at a time
        print(f"rank peak allocated: regular DDP {regular:,} B, layer-wise DDP {layerwise:,} B, "
              f"all gradients {grad_bytes:,} B; diffs " + ", ".join(
                  f"{k}: {v[0]:.1e}" for k, v in results.items() if isinstance(k, tuple)))
        assert regular - layerwise > 0.3 * grad_bytes, (regular, layerwise, grad_bytes)
        errors = results["errors"]
        assert "attach_ddp" in errors.get("no_ddp", ""), errors
        assert "find_unused_parameters=False" in errors.get("unused", ""), errors
        assert "never all-reduced" in errors.get("no_sync", ""), errors


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(pytest.main([__file__, "-q"]))


def _trainer_worker(rank, world, port, out):
    """A Trainer per rank (accelerate's DDP on gloo), regular then layer-wise, accumulation 2."""
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from pathlib import Path

    from transformers import Trainer

    import trainer_callbacks as tc
    from tests.test_trainer_swap import dataset, losses, training_args

    runs = {}
    for layerwise in (False, True):
        model = tiny_llama()
        args = training_args(Path(out) / f"{layerwise}-{rank}", max_steps=3, max_grad_norm=0,
                             per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             ddp_backend="gloo")
        trainer = Trainer(model=model, args=args, train_dataset=dataset(24))
        tc.attach(trainer, "galore_adamw", rank=8, update_proj_gap=2, layerwise=layerwise,
                  memory=False)
        trainer.train()
        lw = tc._common.layerwise_optimizer(trainer.optimizer)
        runs[layerwise] = {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
                           "losses": losses(trainer), "world": args.world_size,
                           "attached": lw is not None and lw._ddp is trainer.model_wrapped,
                           "grads": [p.grad for p in model.parameters() if p.grad is not None]}
    torch.save(runs, f"{out}/trainer{rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_trainer_attach_layerwise_runs_under_ddp(tmp_path):
    """``attach(trainer, ..., layerwise=True)`` in a 2-process Trainer (HF's own layer-wise
    optimizers refuse DDP): equal to the regular DDP Trainer, replicas in sync."""
    spawn_two(_trainer_worker, tmp_path)
    ranks = [torch.load(tmp_path / f"trainer{r}.pt") for r in (0, 1)]
    for runs in ranks:
        regular, layerwise = runs[False], runs[True]
        assert regular["world"] == 2 and layerwise["attached"] and not layerwise["grads"]
        assert layerwise["losses"] == pytest.approx(regular["losses"], rel=1e-5)
        for n, a in regular["params"].items():
            torch.testing.assert_close(layerwise["params"][n], a, rtol=1e-4, atol=2e-5, msg=n)
    for n, a in ranks[0][True]["params"].items():  # replicas identical
        assert torch.equal(a, ranks[1][True]["params"][n]), n
