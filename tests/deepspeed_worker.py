"""Checks against the real DeepSpeed engine on CPU, run by tests/test_deepspeed.py with
``deepspeed --num_gpus 2 --module tests.deepspeed_worker OUT`` (gloo), from the repository's
root: one launch for every case.

Each rank trains on its half of a batch; the reference is one process (no DeepSpeed) that
accumulates both halves: the mean of the ranks' gradients, which DeepSpeed all-reduces.
Rank 0 writes ``OUT/results.json``: per case, the largest parameter difference from the
reference, or the error raised.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import deepspeed
import torch

import lowrank_optim as lo
from lowrank_optim import distributed
from tests.helpers import lm_loss, tiny_llama, token_batches

STEPS = 3
KWARGS = {"adamw": dict(lr=1e-2), "galore_adamw": dict(rank=8, update_proj_gap=2, lr=1e-2),
          "apollo_mini": dict(update_proj_gap=2, lr=1e-2)}
TRAINS = [("adamw", 1), ("adamw", 2), ("adamw", 3), ("galore_adamw", 0),
          ("apollo_mini", 0)]  # must equal the ref
REFUSES = [("galore_adamw", 1), ("galore_adamw", 2), ("galore_adamw", 3)]  # must raise


def ds_config(stage: int, bf16: bool = False) -> dict:
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
            "gradient_clipping": 0.0,
            "bf16": {"enabled": bf16}, "steps_per_print": 10**9}


def reference(name: str) -> dict[str, torch.Tensor]:
    """One process, no DeepSpeed, both ranks' halves accumulated (the same sums as the
    all-reduced mean: Adam's first steps magnify rounding in tiny gradients)."""
    model = tiny_llama()
    opt = lo.create_optimizer(model, name, **KWARGS[name])
    for ids in token_batches(STEPS, seed=3):
        opt.zero_grad()
        for half in (ids[:2], ids[2:]):
            (lm_loss(model, half) / 2).backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def train_under_zero(name: str, stage: int, rank: int, bf16: bool = False
                     ) -> tuple[dict[str, torch.Tensor], dict]:
    """Parameters after ``STEPS`` steps under ZeRO ``stage``, and what the engine built."""
    model = tiny_llama()
    opt = lo.create_optimizer(model, name, **KWARGS[name])
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(stage, bf16))
    for ids in token_batches(STEPS, seed=3):
        local = ids[2 * rank:2 * rank + 2]
        loss = engine(input_ids=local, labels=local).loss
        engine.backward(loss)
        engine.step()
    params = list(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params], enabled=stage == 3):
        out = {n: p.detach().float().clone() for n, p in params}
    info = {"wrapper": type(engine.optimizer).__name__,
            "subspaces": len(distributed.subspace_tensors(opt))}
    engine.destroy()
    return out, info


def main(out: Path) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(1)
    rank = torch.distributed.get_rank()
    results: dict[str, dict] = {}
    refs = {name: reference(name) for name in KWARGS}
    for name, stage in TRAINS:
        t0 = time.perf_counter()
        got, info = train_under_zero(name, stage, rank)
        diff = max((got[n] - refs[name][n]).abs().max().item() for n in refs[name])
        moved = max((refs[name][n] - p).abs().max().item()
                    for n, p in tiny_llama().named_parameters())
        results[f"{name}-zero{stage}"] = {"max_diff": diff, "moved": moved, **info,
                                          "seconds": time.perf_counter() - t0}
    for name, stage, bf16 in [*((n, s, False) for n, s in REFUSES), ("galore_adamw", 0, True)]:
        key = f"{name}-zero{stage}" + ("-bf16" if bf16 else "")
        try:
            results[key] = {"error": None, **train_under_zero(name, stage, rank, bf16)[1]}
        except ValueError as e:
            results[key] = {"error": str(e)}
    # ZeRO-3 with deepspeed.zero.Init: the weights are partitioned before the optimizer exists
    with deepspeed.zero.Init(config_dict_or_path=ds_config(3)):
        model = tiny_llama()
    for name in ("galore_adamw", "sst_adamw"):
        try:
            lo.create_optimizer(model, name, rank=8, lr=1e-2)
            results[f"{name}-zero3-init"] = {"error": None}
        except ValueError as e:
            results[f"{name}-zero3-init"] = {"error": str(e)}
    results["adamw-zero3-init"] = {
        "built": type(lo.create_optimizer(model, "adamw", lr=1e-2)).__name__}
    if rank == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / f"done{rank}").write_text("ok")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(next(a for a in sys.argv[1:] if not a.startswith("--local_rank"))))
