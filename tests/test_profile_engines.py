"""The profiler per rank under FSDP2 (issue 18, item 6): the analytic per-rank optimizer state
and parameter shards equal what 2 gloo ranks hold, layer-wise profiles under DDP and FSDP2,
DDP's bucket copy of the gradients, and the command line (7B on 2 GPUs in seconds)."""

from __future__ import annotations

import pytest
import torch

import lowrank_optim as lo
from lowrank_optim.profile import DDP_BUCKET_BYTES, main, profile
from tests.helpers import init_gloo, spawn_two, tiny_llama, token_batches

#: case -> (optimizer FSDP2 steps, its settings, the tiny LLaMA's overrides)
SHARDED = {"galore_adamw": ("galore_adamw", dict(rank=8, update_proj_gap=2, lr=1e-2), {}),
           "dct_adamw": ("dct_adamw", dict(rank=8, lr=1e-2), {}),
           "adamw": ("adamw", dict(lr=1e-2), {}),
           # odd rows: rank 0 holds one row more (moments), both allocate the padded shard
           "galore_adamw_odd": ("galore_adamw", dict(rank=8, lr=1e-2),
                                dict(vocab_size=255, intermediate_size=175))}


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind the local shards of ``tensors``."""
    storages = {}
    for t in tensors:
        s = lo.distributed.local_tensor(t).untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def _fsdp_worker(rank, world, port, out):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    init_gloo(rank, world, port)
    results = {}
    for case, (name, kwargs, overrides) in SHARDED.items():
        model = tiny_llama(**overrides)
        for layer in model.model.layers:  # the recipe's units
            fully_shard(layer)
        fully_shard(model)
        opt = lo.create_optimizer(model, name, **kwargs)
        for ids in token_batches(2, batch=4, seq=32, seed=1,
                                 vocab=overrides.get("vocab_size", 256)):
            opt.zero_grad()
            local = ids[2 * rank:2 * rank + 2]
            model(input_ids=local, labels=local).loss.backward()
            grads = _storage_bytes(p.grad for p in model.parameters())
            opt.step()
        results[case] = {"state": lo.memory.state_bytes(opt).total,
                         "weights": _storage_bytes(model.parameters()), "grads": grads}
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_fsdp2_profile_equals_the_bytes_each_rank_holds(tmp_path):
    """One spawn, every optimizer: state, parameter shards and sharded gradients per rank."""
    spawn_two(_fsdp_worker, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for case, (name, kwargs, overrides) in SHARDED.items():
        model = tiny_config(tmp_path / case, **overrides) if overrides else "tiny"
        settings = dict(precision="fp32", opt_args={k: v for k, v in kwargs.items()
                                                    if k != "rank"},
                        **({"rank": kwargs["rank"]} if "rank" in kwargs else {}))
        analytic = profile(model, name, world_size=2, engine="fsdp2", **settings)
        s = analytic.settings
        assert s["per_rank_state"] == [r[case]["state"] for r in ranks], (case, ranks)
        assert analytic.optimizer_state == max(s["per_rank_state"]), case
        # FSDP2 pads dim 0 to a multiple of the ranks: both ranks allocate the same shards
        assert s["weight_shards"] == ranks[0][case]["weights"] == ranks[1][case]["weights"]
        assert s["gradient_shards"] == ranks[0][case]["grads"] == ranks[1][case]["grads"]
        assert max(s["per_rank_state"]) < profile(model, name, **settings).optimizer_state
    odd = [r["galore_adamw_odd"]["state"] for r in ranks]
    assert odd[0] > odd[1], odd  # the uneven split is seen, and counted


def tiny_config(path, **overrides) -> str:
    """A ``config.json`` of the tiny LLaMA with ``overrides``, for ``profile(path)``."""
    from lowrank_optim.model_configs import llama_config

    llama_config("tiny", **overrides).save_pretrained(path)
    return str(path / "config.json")


def _tiny(**kwargs):
    return profile("tiny", "galore_adamw", rank=8, precision="fp32", **kwargs)


def test_fsdp2_weights_and_gradients_follow_the_documented_formulas():
    model = tiny_llama()
    n = 2

    def shard(p):  # dim 0 padded to a multiple of n
        return -(-p.shape[0] // n) * (p.numel() // p.shape[0]) * p.element_size()

    layers = [list(layer.parameters()) for layer in model.model.layers]
    inside = {id(p) for unit in layers for p in unit}
    root = [p for p in model.parameters() if id(p) not in inside]
    head = [p for p in root if p is not model.get_input_embeddings().weight]
    every = list(model.parameters())
    layer = max(sum(n * shard(p) for p in u) for u in layers)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    for layerwise in (False, True):
        p = _tiny(world_size=n, engine="fsdp2", layerwise=layerwise)
        assert p.weights == (sum(map(shard, every)) + buffers + sum(n * shard(t) for t in root)
                             + 2 * layer)
        grad_shards = (max(sum(map(shard, u)) for u in [root, *layers]) if layerwise
                       else sum(map(shard, every)))
        assert p.gradients == grad_shards + sum(n * shard(t) for t in head) + layer
    # with more than a few layers, the shards outweigh the gathered units
    one, fsdp = (profile("1b", "galore_adamw", world_size=w, engine=e)
                 for w, e in ((1, "ddp"), (4, "fsdp2")))
    assert fsdp.weights < 0.7 * one.weights and fsdp.gradients < 0.7 * one.gradients
    assert fsdp.optimizer_state < 0.7 * one.optimizer_state


def test_ddp_gradients_count_the_bucket_copy():
    one, ddp = _tiny(), _tiny(world_size=2)
    grads = one.gradients
    assert ddp.gradients == 2 * grads and ddp.settings["ddp_buckets"] == grads
    assert ddp.settings["ddp_bucket_view"] is False
    assert _tiny(world_size=2, ddp_bucket_view=True).gradients == grads
    # layer-wise: the buckets plus the param.grad of the bucket being filled (at most all)
    assert _tiny(world_size=2, layerwise=True).gradients == grads + min(grads, DDP_BUCKET_BYTES)
    assert _tiny(world_size=2, layerwise=True, ddp_bucket_view=True).gradients == grads
    big = profile("1b", "galore_adamw", rank=256, world_size=4, layerwise=True)
    all_grads = big.settings["ddp_buckets"]
    assert big.gradients == all_grads + max(DDP_BUCKET_BYTES, big.settings["param_grads"])
    assert _tiny(layerwise=True).gradients < grads  # one process: no DDP, one gradient
    zero = _tiny(world_size=2, engine="zero1")
    assert zero.gradients == ddp.gradients  # ZeRO-1 runs under DDP


@pytest.mark.parametrize("name, kwargs, match", [
    ("galore_adafactor", {}, "not elementwise"),
    ("galore_adamw8bit", {}, "bits=8"),
    ("galore_adamw", {"opt_args": {"bits": 8}}, "bits=8"),
    ("apollo_adamw", {}, "not elementwise"),
    ("sst_adamw", {}, "does not support FSDP2"),
])
def test_fsdp2_profile_refuses_what_fsdp2_refuses(name, kwargs, match):
    with pytest.raises(ValueError, match=f"engine='fsdp2'.*{match}.*engine='ddp' or 'zero1'"):
        profile("tiny", name, rank=8, world_size=2, engine="fsdp2", **kwargs)


def test_cli_reports_one_gpu_of_fsdp2_and_layerwise_runs(capsys):
    base = ["--model", "tiny", "--optimizer", "galore_adamw", "--rank", "8", "--world-size", "2"]
    assert main([*base, "--engine", "fsdp2"]) == 0
    assert "layerwise False, fsdp2 x 2 (one GPU's bytes)" in capsys.readouterr().out
    assert main([*base, "--engine", "fsdp2", "--layerwise"]) == 0
    assert "layerwise True, fsdp2 x 2 (one GPU's bytes)" in capsys.readouterr().out
    assert main([*base, "--layerwise"]) == 0
    assert "ddp x 2 (one GPU's bytes; DDP gradient_as_bucket_view=False)" in (
        capsys.readouterr().out)
    assert main([*base, "--ddp-bucket-view"]) == 0
    assert "gradient_as_bucket_view=True" in capsys.readouterr().out


def test_cli_7b_on_two_gpus_with_fsdp2_galore_layerwise(capsys):
    """The issue's question, answered in analytic mode in seconds."""
    assert main(["--model", "7b", "--optimizer", "galore_adamw", "--rank", "1024",
                 "--world-size", "2", "--engine", "fsdp2", "--layerwise"]) == 0
    out = capsys.readouterr().out
    assert "7b (6,738.4M params), galore_adamw" in out and "fsdp2 x 2" in out
    assert "yes 24 GB (RTX 3090 / 4090)" in out


def test_cli_refuses_an_engine_the_optimizer_cannot_run_in_one_line(capsys):
    for engine, match in (("fsdp2", "not elementwise"), ("zero1", "SST's U, S and V")):
        name = "galore_adafactor" if engine == "fsdp2" else "sst_adamw"
        with pytest.raises(SystemExit) as exit_info:
            main(["--model", "tiny", "--optimizer", name, "--rank", "8", "--world-size", "2",
                  "--engine", engine])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert match in err and "Traceback" not in err, err
