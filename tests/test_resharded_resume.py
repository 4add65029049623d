"""Resharded resume (issue 18, item 5): a checkpoint written on N processes resumes on M.

:mod:`lowrank_optim.distributed.checkpoint` (``torch.distributed.checkpoint``) for FSDP2 2 -> 1,
FSDP2 1 -> 2, DDP 2 -> 1 and DDP 1 -> 2, GaLore (``rank=8, update_proj_gap=2``: the first
step after the resume refreshes the basis) and DCT (``rank=8``); 2 gloo CPU processes, one
spawn per test.  A run trains 2 steps, checkpoints, the other layout loads and trains steps 3
and 4; what is compared:

* the loaded optimizer state equals the saved one bit for bit (every tensor, dtypes included:
  bases, ``int64`` DCT indices and counters, moments gathered from their shards), and the
  loaded parameters equal the saved ones bit for bit, in every case;
* the continued training equals the uninterrupted run given the same gradients (the resumed
  run's gradients replayed on the uninterrupted run, or the other way round, as
  :func:`tests.helpers.replay_recorded_steps` does):

  - **DDP: exactly** (``atol=0``).  Every DDP rank steps the whole, replicated tensors with the
    all-reduced gradient through the same code as one process, so the arithmetic is the same;
  - **FSDP2: to atol 2e-6**, the tolerance of the FSDP2-vs-one-process tests
    (``tests/test_recipe_engines.py``).  A shard-local step multiplies the rank's rows
    (``G_k P^T`` on a 32-row block instead of the 64-row matrix; a refresh sums row scores),
    which rounds differently from the unsharded step: the runs on either side of the
    checkpoint differ by float32 rounding, not by what the checkpoint carries (that part is
    checked bit for bit above).

Also: ZeRO-1 (``consolidate_state_dict``) resumes on another number of processes, plain
``torch.save`` of rank 0's DDP state resumes on one process, and the checks fail when they
should (a perturbed state, disagreeing replicas, another structure, SST, ZeRO through DCP).
"""

from __future__ import annotations

import json
import os
import sys
import time

import pytest
import torch
import torch.distributed as dist

import lowrank_optim as lo
from lowrank_optim.distributed import checkpoint as ck
from tests.helpers import (
    init_gloo,
    lm_loss,
    spawn_two,
    tiny_llama,
    token_batches,
)
from tests.helpers import replay_recorded_steps as replay

OPTIMIZERS = {"galore_adamw": dict(rank=8, update_proj_gap=2, lr=1e-2),
              "dct_adamw": dict(rank=8, lr=1e-2)}
CUT, STEPS = 2, 4  # checkpoint after 2 of 4 steps
FSDP2_ATOL = 2e-6

#: one BLAS thread here as in the spawned ranks (:func:`init_gloo`): another thread count
#: blocks matmuls and SVDs differently, which alone changes the last bits
pytestmark = pytest.mark.usefixtures("one_thread")


def _batches() -> list[torch.Tensor]:
    return token_batches(STEPS, batch=4, seq=32, seed=1)


def _names(model: torch.nn.Module) -> dict[torch.Tensor, str]:
    model = getattr(model, "module", model)
    return {p: n for n, p in model.named_parameters()}


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if lo.distributed.is_dtensor(t) else t).detach().clone()


def full_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[tuple[str, str],
                                                                          torch.Tensor]:
    """The optimizer state by (parameter name, key), DTensors gathered (a collective)."""
    names = _names(model)
    out = {}
    for p, name in names.items():
        for key in sorted(opt.state.get(p, {})):
            out[name, key] = _full(opt.state[p][key])
    return out


def full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: _full(p) for p, n in _names(model).items()}


def mismatches(a: dict, b: dict) -> list:
    """Entries of two states (or parameter dicts) that are not bit-identical (dtype too)."""
    bad = sorted(set(a) ^ set(b))
    return bad + [k for k in sorted(set(a) & set(b))
                  if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape
                  or not torch.equal(a[k], b[k])]


def _train(module, opt, rank: int | None, steps: list[torch.Tensor]) -> dict:
    """One step per batch (``rank``'s half of it, or all of it for ``None``), recording the
    (reduced) gradients and the parameters after each step."""
    grads, params = [], []
    model = getattr(module, "module", module)
    for ids in steps:
        opt.zero_grad()
        local = ids if rank is None else ids[2 * rank:2 * rank + 2]
        lm_loss(module, local).backward()
        grads.append({n: _full(p.grad) for n, p in model.named_parameters()})
        opt.step()
        params.append(full_params(model))
    return {"grads": grads, "params": params}


def _fsdp_model(seed: int = 0):
    from torch.distributed.fsdp import fully_shard

    model = tiny_llama(seed=seed)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _single_runs(tmp_path, prefix: str) -> dict:
    """One process: CUT steps on the whole batches, a checkpoint, and the live objects (the
    uninterrupted run, continued later on the other side's gradients)."""
    runs = {}
    for name, kwargs in OPTIMIZERS.items():
        model = tiny_llama()
        opt = lo.create_optimizer(model, name, **kwargs)
        _train(model, opt, None, _batches()[:CUT])
        ck.save_checkpoint(tmp_path / f"{prefix}-single-{name}", model, opt)
        runs[name] = (model, opt, full_state(model, opt), full_params(model))
    return runs


def _run_rank(rank: int, world: int, port: int, out: str, cases) -> None:
    """``cases(rank, out)`` in the gloo group; its models, DDP wrappers and optimizers are
    freed before the group is destroyed (a DDP reducer or ZeRO buffer destroyed after it
    hangs or aborts the process at exit now and then)."""
    import gc

    init_gloo(rank, world, port)
    cases(rank, out)
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


# -- FSDP2 2 -> 1 and 1 -> 2 ------------------------------------------------------------------
def _fsdp_cases(rank, out):
    results = {}
    for name, kwargs in OPTIMIZERS.items():
        # 2 -> 1: train CUT steps sharded, checkpoint, go on (the uninterrupted sharded run)
        model = _fsdp_model()
        opt = lo.create_optimizer(model, name, **kwargs)
        first = _train(model, opt, rank, _batches()[:CUT])
        ck.save_checkpoint(os.path.join(out, f"fsdp-{name}"), model, opt)
        saved = full_state(model, opt)
        moments = sorted({k for s in opt.state.values() for k, v in s.items()
                          if lo.distributed.is_dtensor(v)})
        rest = _train(model, opt, rank, _batches()[CUT:])
        results[f"2to1-{name}"] = {"first": first, "rest": rest, "saved": saved,
                                   "dtensor_keys": moments}
        # 1 -> 2: the one-process checkpoint into fresh shards (other initial weights)
        model = _fsdp_model(seed=99)
        opt = lo.create_optimizer(model, name, **kwargs)
        manifest = ck.load_checkpoint(os.path.join(out, f"fsdp-single-{name}"), model, opt)
        loaded, params = full_state(model, opt), full_params(model)
        rest = _train(model, opt, rank, _batches()[CUT:])
        results[f"1to2-{name}"] = {"loaded": loaded, "params": params, "rest": rest,
                                   "world": manifest["world_size"]}
    # replicas that disagree are refused before anything is written
    model = _fsdp_model()
    opt = lo.create_optimizer(model, "galore_adamw", **OPTIMIZERS["galore_adamw"])
    _train(model, opt, rank, _batches()[:1])
    if rank == 1:
        state = next(s for s in opt.state.values()
                     if any(k == "ortho" or k.startswith("proj") for k in s))
        key = next(k for k, v in state.items() if v.dim() == 2 and not
                   lo.distributed.is_dtensor(v))
        state[key].add_(1e-3)
    try:
        ck.save_checkpoint(os.path.join(out, "fsdp-bad"), model, opt)
        results["replica_error"] = None
    except RuntimeError as e:
        results["replica_error"] = str(e)
    results["accelerate"] = _accelerate_template_load(rank, out)
    if rank == 0:
        torch.save(results, os.path.join(out, "fsdp.pt"))


def _accelerate_template_load(rank, out) -> dict:
    """accelerate's own FSDP2 save / load of the optimizer (the recipe's path) with a pending
    refresh request: the load drops it (its template is a zero-gradient step), and
    :func:`restore_dropped_state` brings it back."""
    from accelerate import PartialState
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import load_fsdp_optimizer, save_fsdp_optimizer

    class Processes:  # what the two functions use of an Accelerator
        process_index = rank

        def wait_for_everyone(self):
            dist.barrier()

    PartialState(cpu=True)  # accelerate's logging needs it
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2,
                                            state_dict_type="SHARDED_STATE_DICT")
    name, kwargs = "galore_adamw", OPTIMIZERS["galore_adamw"]
    model = _fsdp_model()
    opt = lo.create_optimizer(model, name, **kwargs)
    _train(model, opt, rank, _batches()[:CUT])
    opt.request_refresh()
    directory = os.path.join(out, "accelerate")
    save_fsdp_optimizer(plugin, Processes(), opt, model, directory)
    saved = full_state(model, opt)
    model = _fsdp_model()
    opt = lo.create_optimizer(model, name, **kwargs)
    load_fsdp_optimizer(plugin, Processes(), opt, model, directory)
    dropped = sorted(set(saved) - set(full_state(model, opt)))
    restored = lo.distributed.restore_dropped_state(os.path.join(directory, "optimizer_0"),
                                                    model, opt)
    return {"dropped": [".".join(k) for k in dropped], "restored": restored,
            "mismatches": mismatches(full_state(model, opt), saved)}


def test_fsdp2_checkpoint_resumes_on_one_process_and_one_process_checkpoint_on_two(tmp_path):
    start = time.perf_counter()
    single = _single_runs(tmp_path, "fsdp")
    spawn_two(_run_rank, tmp_path, _fsdp_cases)
    res = torch.load(tmp_path / "fsdp.pt", weights_only=True)
    worst = {}
    for name, kwargs in OPTIMIZERS.items():
        # 2 -> 1: a fresh process (other initial weights) loads the sharded checkpoint
        rec = res[f"2to1-{name}"]
        assert rec["dtensor_keys"], name  # moments really were shards
        model = tiny_llama(seed=99)
        opt = lo.create_optimizer(model, name, **kwargs)
        manifest = ck.load_checkpoint(tmp_path / f"fsdp-{name}", model, opt)
        assert manifest["world_size"] == 2 and manifest["sharded"], manifest
        assert mismatches(full_state(model, opt), rec["saved"]) == [], name
        assert mismatches(full_params(model), rec["first"]["params"][-1]) == [], name
        worst[f"2to1-{name}"] = replay(model, opt, rec["rest"], f"2->1 {name}", atol=FSDP2_ATOL)
        # 1 -> 2: the shards loaded the one-process state; the uninterrupted one-process run
        # continued on the sharded run's gradients equals it
        rec = res[f"1to2-{name}"]
        model, opt, saved_state, saved_params = single[name]
        assert rec["world"] == 1
        assert mismatches(rec["loaded"], saved_state) == [], name
        assert mismatches(rec["params"], saved_params) == [], name
        worst[f"1to2-{name}"] = replay(model, opt, rec["rest"], f"1->2 {name}", atol=FSDP2_ATOL)
    acc = res["accelerate"]
    assert acc["dropped"] and all(k.endswith(".refresh_requested") for k in acc["dropped"])
    assert acc["restored"] == acc["dropped"] and acc["mismatches"] == []
    assert res["replica_error"] and "replicated tensors differ" in res["replica_error"]
    assert "optimizer state" in res["replica_error"]
    print(f"FSDP2 largest differences {worst}, {time.perf_counter() - start:.1f} s")


# -- DDP 2 -> 1 and 1 -> 2, ZeRO-1, plain torch.save --------------------------------------------
def _ddp_cases(rank, out):
    from torch.nn.parallel import DistributedDataParallel

    results = {}
    for name, kwargs in OPTIMIZERS.items():
        model = tiny_llama()
        opt = lo.create_optimizer(model, name, **kwargs)
        ddp = DistributedDataParallel(model)
        first = _train(ddp, opt, rank, _batches()[:CUT])
        ck.save_checkpoint(os.path.join(out, f"ddp-{name}"), ddp, opt)
        if rank == 0:  # replicated: rank 0's plain state_dict is the whole state too
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()},
                       os.path.join(out, f"ddp-plain-{name}.pt"))
        saved = full_state(model, opt)
        rest = _train(ddp, opt, rank, _batches()[CUT:])
        results[f"2to1-{name}"] = {"first": first, "rest": rest, "saved": saved}
        model = tiny_llama(seed=99)
        opt = lo.create_optimizer(model, name, **kwargs)
        ddp = DistributedDataParallel(model)
        ck.load_checkpoint(os.path.join(out, f"ddp-single-{name}"), ddp, opt)
        loaded, params = full_state(model, opt), full_params(model)
        results[f"1to2-{name}"] = {"loaded": loaded, "params": params,
                                   "rest": _train(ddp, opt, rank, _batches()[CUT:])}
    # ZeRO-1: the consolidated state (by global index) on 2 ranks -> one plain process, and the
    # one-process state -> ZeRO-1 on 2 ranks; through DCP it is refused naming this fix
    name, kwargs = "galore_adamw", OPTIMIZERS["galore_adamw"]
    model = tiny_llama()
    opt = lo.create_optimizer(model, name, zero1=True, **kwargs)
    ddp = DistributedDataParallel(model)
    first = _train(ddp, opt, rank, _batches()[:CUT])
    opt.consolidate_state_dict(to=0)
    if rank == 0:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()},
                   os.path.join(out, "zero1-2.pt"))
    try:
        ck.save_checkpoint(os.path.join(out, "zero1-dcp"), ddp, opt)
    except NotImplementedError as e:
        results["zero1_error"] = str(e)
    results["zero1-2to1"] = {"first": first, "rest": _train(ddp, opt, rank, _batches()[CUT:])}
    saved = torch.load(os.path.join(out, "zero1-single.pt"), weights_only=True)
    model = tiny_llama(seed=99)
    model.load_state_dict(saved["model"])
    opt = lo.create_optimizer(model, name, zero1=True, **kwargs)
    opt.load_state_dict(saved["opt"])
    ddp = DistributedDataParallel(model)
    results["zero1-1to2"] = {"params": full_params(model),
                             "rest": _train(ddp, opt, rank, _batches()[CUT:])}
    if rank == 0:
        torch.save(results, os.path.join(out, "ddp.pt"))


def test_ddp_and_zero1_checkpoints_resume_exactly_on_another_number_of_processes(tmp_path):
    start = time.perf_counter()
    single = _single_runs(tmp_path, "ddp")
    zero_model = tiny_llama()  # the one-process run ZeRO-1 on 2 ranks resumes
    zero_opt = lo.create_optimizer(zero_model, "galore_adamw", **OPTIMIZERS["galore_adamw"])
    _train(zero_model, zero_opt, None, _batches()[:CUT])
    torch.save({"model": zero_model.state_dict(), "opt": zero_opt.state_dict()},
               tmp_path / "zero1-single.pt")
    spawn_two(_run_rank, tmp_path, _ddp_cases)
    res = torch.load(tmp_path / "ddp.pt", weights_only=True)
    for name, kwargs in OPTIMIZERS.items():
        rec = res[f"2to1-{name}"]
        model = tiny_llama(seed=99)
        opt = lo.create_optimizer(model, name, **kwargs)
        assert ck.load_checkpoint(tmp_path / f"ddp-{name}", model, opt)["world_size"] == 2
        assert mismatches(full_state(model, opt), rec["saved"]) == [], name
        assert mismatches(full_params(model), rec["first"]["params"][-1]) == [], name
        replay(model, opt, rec["rest"], f"DDP 2->1 {name}", atol=0.0)  # exact
        # rank 0's plain torch.save of a DDP run resumes on one process just as well
        plain = torch.load(tmp_path / f"ddp-plain-{name}.pt", weights_only=True)
        model = tiny_llama(seed=99)
        model.load_state_dict(plain["model"])
        opt = lo.create_optimizer(model, name, **kwargs)
        opt.load_state_dict(plain["opt"])
        assert mismatches(full_state(model, opt), rec["saved"]) == [], name
        replay(model, opt, rec["rest"], f"DDP 2->1 torch.save {name}", atol=0.0)
        rec = res[f"1to2-{name}"]
        model, opt, saved_state, saved_params = single[name]
        assert mismatches(rec["loaded"], saved_state) == [], name
        assert mismatches(rec["params"], saved_params) == [], name
        replay(model, opt, rec["rest"], f"DDP 1->2 {name}", atol=0.0)  # exact
    # ZeRO-1 on 2 ranks -> one process (plain optimizer), and one process -> ZeRO-1 on 2
    saved = torch.load(tmp_path / "zero1-2.pt", weights_only=True)
    model = tiny_llama(seed=99)
    model.load_state_dict(saved["model"])
    opt = lo.create_optimizer(model, "galore_adamw", **OPTIMIZERS["galore_adamw"])
    opt.load_state_dict(saved["opt"])
    rec = res["zero1-2to1"]
    assert mismatches(full_params(model), rec["first"]["params"][-1]) == []
    replay(model, opt, rec["rest"], "ZeRO-1 2->1", atol=0.0)
    rec = res["zero1-1to2"]
    assert mismatches(rec["params"], full_params(zero_model)) == []
    replay(zero_model, zero_opt, rec["rest"], "ZeRO-1 1->2", atol=0.0)
    assert "consolidate_state_dict(to=0)" in res["zero1_error"]
    print(f"DDP / ZeRO-1: exact, {time.perf_counter() - start:.1f} s")


# -- the checks fail when they should (one process) ---------------------------------------------
def test_wrong_loads_are_detected_or_refused(tmp_path):
    name, kwargs = "galore_adamw", OPTIMIZERS["galore_adamw"]
    model = tiny_llama()
    opt = lo.create_optimizer(model, name, **kwargs)
    record = _train(model, opt, None, _batches())
    cut_model = tiny_llama()
    cut = lo.create_optimizer(cut_model, name, **kwargs)
    _train(cut_model, cut, None, _batches()[:CUT])
    ck.save_checkpoint(tmp_path / "ckpt", cut_model, cut)
    saved = full_state(cut_model, cut)
    # a correct load continues exactly; a perturbed moment is seen by the state comparison
    # and by the continued training
    model = tiny_llama(seed=99)
    opt = lo.create_optimizer(model, name, **kwargs)
    ck.load_checkpoint(tmp_path / "ckpt", model, opt)
    state = next(s for s in opt.state.values() if "exp_avg" in s)
    state["exp_avg"].view(-1)[0] += 1e-3
    assert mismatches(full_state(model, opt), saved)
    later = {"grads": record["grads"][CUT:], "params": record["params"][CUT:]}
    with pytest.raises(AssertionError):
        replay(model, opt, later, "perturbed", atol=FSDP2_ATOL)
    model = tiny_llama(seed=99)
    opt = lo.create_optimizer(model, name, **kwargs)
    ck.load_checkpoint(tmp_path / "ckpt", model, opt)
    assert mismatches(full_state(model, opt), saved) == []
    replay(model, opt, later, "one process", atol=0.0)
    # an entry the initialising step does not create (a pending refresh request) is loaded
    cut.request_refresh()
    ck.save_checkpoint(tmp_path / "requested", cut_model, cut)
    model = tiny_llama(seed=99)
    opt = lo.create_optimizer(model, name, **kwargs)
    ck.load_checkpoint(tmp_path / "requested", model, opt)
    assert mismatches(full_state(model, opt), full_state(cut_model, cut)) == []
    assert any("refresh_requested" in s for s in opt.state.values())
    # another structure or optimizer is refused before anything is loaded
    for other, other_kwargs, match in [
        (name, {**kwargs, "rank": 4}, "structure differs.*rank: saved 8"),
        ("dct_adamw", OPTIMIZERS["dct_adamw"], "holds the state of GaLoreAdamW"),
    ]:
        model = tiny_llama(seed=99)
        opt = lo.create_optimizer(model, other, **other_kwargs)
        with pytest.raises(ValueError, match=match):
            ck.load_checkpoint(tmp_path / "ckpt", model, opt)
        assert not opt.state
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ck.load_checkpoint(tmp_path / "missing", model, opt)
    # SST cannot be resharded: refused naming the fix
    sst_model = tiny_llama()
    lo.sst.convert(sst_model, rank=8)
    sst = lo.create_optimizer(sst_model, "sst_adamw", rank=8, lr=1e-2)
    with pytest.raises(NotImplementedError, match="SST.*optimizer.load_state_dict"):
        ck.save_checkpoint(tmp_path / "sst", sst_model, sst)
    # a step-0 checkpoint (no state yet) loads as no state, without an initialising step
    model = tiny_llama()
    opt = lo.create_optimizer(model, name, **kwargs)
    ck.save_checkpoint(tmp_path / "step0", model, opt)
    assert not opt.state
    fresh_model = tiny_llama(seed=99)
    fresh = lo.create_optimizer(fresh_model, name, **kwargs)
    ck.load_checkpoint(tmp_path / "step0", fresh_model, fresh)
    assert not fresh.state and mismatches(full_params(fresh_model), full_params(model)) == []


ACCELERATE_SAVE = r"""
import sys, torch
import lowrank_optim as lo
from accelerate import Accelerator
from tests.helpers import lm_loss, tiny_llama, token_batches

out, kwargs = sys.argv[1], dict(rank=8, update_proj_gap=2, lr=1e-2)
accelerator = Accelerator(cpu=True)
model = tiny_llama()
opt = lo.create_optimizer(model, "galore_adamw", **kwargs)
model, prepared = accelerator.prepare(model, opt)
for ids in token_batches(2, batch=2, seq=32, seed=1):
    prepared.zero_grad()
    accelerator.backward(lm_loss(model, ids))
    prepared.step()
print(type(prepared).__name__)
lo.distributed.save_checkpoint(out + "/ckpt", model, prepared)
torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, out + "/plain.pt")
"""


def test_state_behind_wrappers_is_the_wrapped_optimizers(tmp_path):
    """accelerate's ``AcceleratedOptimizer`` and ``LayerwiseOptimizer`` are
    ``torch.optim.Optimizer`` subclasses themselves: saved through them, the checkpoint holds
    the wrapped optimizer's class, structure and state, and loads into the plain optimizer (and
    back through a wrapper)."""
    import subprocess

    from lowrank_optim.layerwise import LayerwiseOptimizer
    from tests.test_recipe_launch import ROOT, python_path

    name, kwargs = "galore_adamw", OPTIMIZERS["galore_adamw"]
    proc = subprocess.run([sys.executable, "-c", ACCELERATE_SAVE, str(tmp_path)], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": python_path(),
                               "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "AcceleratedOptimizer" in proc.stdout
    assert ck.read_manifest(tmp_path / "ckpt")["optimizer"] == "GaLoreAdamW"
    plain = torch.load(tmp_path / "plain.pt", weights_only=True)
    ref_model = tiny_llama(seed=99)
    ref_model.load_state_dict(plain["model"])
    ref = lo.create_optimizer(ref_model, name, **kwargs)
    ref.load_state_dict(plain["opt"])
    model = tiny_llama(seed=99)
    opt = lo.create_optimizer(model, name, **kwargs)
    ck.load_checkpoint(tmp_path / "ckpt", model, opt)
    assert mismatches(full_state(model, opt), full_state(ref_model, ref)) == []
    assert mismatches(full_params(model), full_params(ref_model)) == []
    # through a LayerwiseOptimizer, both ways
    ck.save_checkpoint(tmp_path / "layerwise", model, LayerwiseOptimizer(opt))
    assert ck.read_manifest(tmp_path / "layerwise")["structure"] is not None
    model = tiny_llama(seed=99)
    opt = lo.create_optimizer(model, name, **kwargs)
    ck.load_checkpoint(tmp_path / "layerwise", model, LayerwiseOptimizer(opt))
    assert mismatches(full_state(model, opt), full_state(ref_model, ref)) == []


# -- the recipe: a world-size change is a setting change; an engine change of FSDP2 is refused
class _Accelerator:
    def __init__(self, kind: str, processes: int) -> None:
        self.distributed_type, self.num_processes = kind, processes
        self.mixed_precision, self.is_main_process = "no", True


@pytest.mark.parametrize("saved, now, allowed", [
    (("MULTI_CPU", 2), ("NO", 1), True),  # DDP 2 -> 1: same files, replicated state
    (("NO", 1), ("MULTI_CPU", 2), True),  # 1 -> DDP 2
    (("FSDP", 2), ("FSDP", 1), True),  # FSDP2 2 -> 1: a setting change (see the report)
    (("FSDP", 2), ("NO", 1), False),  # FSDP2 files under another engine: refused
    (("MULTI_CPU", 2), ("FSDP", 2), False),
])
def test_recipe_resume_across_world_sizes_and_engines(tmp_path, saved, now, allowed):
    from recipes import checkpoint as recipe_checkpoint
    from recipes.config import RecipeConfig

    cfg = RecipeConfig()
    (tmp_path / recipe_checkpoint.SETTINGS_FILE).write_text(json.dumps(
        {"settings": recipe_checkpoint.run_settings(cfg, _Accelerator(*saved))}))
    with pytest.raises(recipe_checkpoint.CheckpointError, match="num_processes|engine"):
        recipe_checkpoint.check_resume_settings(tmp_path, cfg, _Accelerator(*now))
    cfg.allow_config_change = True
    if allowed:
        changes = recipe_checkpoint.check_resume_settings(tmp_path, cfg, _Accelerator(*now))
        assert set(changes) <= {"num_processes", "engine"} and changes
    else:
        with pytest.raises(recipe_checkpoint.CheckpointError,
                           match="cannot resume under another engine.*load_checkpoint"):
            recipe_checkpoint.check_resume_settings(tmp_path, cfg, _Accelerator(*now))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q", "-s"]))
