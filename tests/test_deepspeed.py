"""DeepSpeed: engine messages, the recipe's launch checks, and the real engine on 2 CPU
processes (gloo): ZeRO 0-3 against one process (``tests.deepspeed_worker``, one launch for every
case), and ``recipes.pretrain`` under ``deepspeed --num_gpus 2 --module recipes.pretrain ...
--deepspeed ds_zero0.json`` and under accelerate's ``deepspeed_zero2.yaml``.

The first DeepSpeed launch on a machine compiles DeepSpeed's shared-memory comm op (about 30 s,
gcc and the ``ninja`` of the venv); later launches load it from torch's extension cache.
"""

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

import lowrank_optim as lo
from lowrank_optim import distributed
from recipes import config, launch, pretrain
from tests.helpers import free_port, tiny_llama
from tests.test_recipe_launch import (
    TEST_CONFIG,
    assert_same_run,
    python_path,
    single_process,
    succeeded,
)
from tests.test_recipe_launch import launch as accelerate_launch

ROOT = Path(__file__).resolve().parents[1]

needs_compiler = pytest.mark.skipif(not shutil.which("c++") and not shutil.which("g++"),
                                    reason="DeepSpeed compiles its CPU comm op with a C++ compiler")


def _deepspeed_env() -> dict[str, str]:
    """The venv's bin first on PATH (its ninja builds DeepSpeed's op), CPU accelerator, the
    repository's root on PYTHONPATH (the ranks run ``python -m <module>``)."""
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    env = {**os.environ, "PATH": path, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": python_path()}
    for key in ("ACCELERATE_USE_CPU", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(key, None)
    return env


def deepspeed_launch(module: str, *args: str) -> list[str]:
    """``deepspeed --num_gpus 2 --module module args`` (the launcher as a module of this
    venv)."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
            "--master_port", str(free_port()), "--module", module, *args]


# -- messages: what works, per optimizer (no engine needed) ----------------------------------


@pytest.mark.parametrize("name, fsdp2", [
    ("galore_adamw", True), ("dct_adamw", True), ("galore_adafactor", False),
    ("galore_adamw8bit", False), ("dct_adamw8bit", False), ("apollo_adamw", False),
    ("fira_adamw", False),
])
def test_zero_refusal_names_the_engines_that_run_this_optimizer(name, fsdp2):
    kwargs = {"relative_step": False} if "adafactor" in name else {}
    opt = lo.create_optimizer(tiny_llama(), name, rank=8, lr=1e-2, **kwargs)
    distributed.check_zero_stage(opt, 0)  # stage 0 keeps whole parameters
    with pytest.raises(ValueError) as err:
        distributed.check_zero_stage(opt, 2)
    message = str(err.value)
    assert "ZeRO stage 2 would flatten" in message
    assert f"{type(opt).__name__}, as configured, runs under DDP and DeepSpeed ZeRO stage 0" in (
        message)
    assert ("and also under FSDP2" in message) == fsdp2
    assert ("but not under FSDP2" in message) == (not fsdp2)
    distributed.check_zero_stage(lo.create_optimizer(tiny_llama(), "adamw"), 3)  # baselines


def _fake_accelerator(num_processes: int, process_index: int, kind: str = "NO"):
    from accelerate.utils import DistributedType

    return types.SimpleNamespace(num_processes=num_processes, process_index=process_index,
                                 distributed_type=DistributedType[kind])


@pytest.mark.parametrize("env, accelerator, deepspeed, refusal", [
    ({"WORLD_SIZE": "2", "RANK": "1"}, (1, 0, "NO"), None,
     "WORLD_SIZE=2 processes but this one runs as rank 0 of 1"),
    ({"WORLD_SIZE": "2", "RANK": "1"}, (2, 0, "MULTI_CPU"), None,
     "RANK=1 but it runs as rank 0 of 2"),
    ({"WORLD_SIZE": "2", "RANK": "1"}, (2, 1, "MULTI_CPU"), "--deepspeed ds.json",
     "DeepSpeed was asked for (--deepspeed ds.json) but the accelerator runs ddp"),
    ({"WORLD_SIZE": "2", "RANK": "1"}, (2, 1, "MULTI_CPU"), None, None),
    ({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "3"}, (1, 0, "NO"), None,
     "OMPI_COMM_WORLD_SIZE=4 processes but this one runs as rank 0 of 1"),
    ({}, (1, 0, "NO"), None, None),
])
def test_launches_the_recipe_cannot_run_are_refused(monkeypatch, env, accelerator, deepspeed,
                                                    refusal):
    for key in (*launch.WORLD_SIZE_VARIABLES, *launch.RANK_VARIABLES):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    fake = _fake_accelerator(*accelerator)
    if refusal is None:
        launch.check_launch(fake, deepspeed)
        return
    with pytest.raises(RuntimeError) as err:
        launch.check_launch(fake, deepspeed)
    assert refusal in str(err.value)
    assert "deepspeed --num_gpus 2 --module recipes.pretrain --deepspeed" in str(err.value)


# -- the real engine, 2 CPU processes ---------------------------------------------------------


@pytest.mark.slow
@needs_compiler
def test_zero_stages_against_the_real_engine(tmp_path):
    """ZeRO 1/2/3 + AdamW and ZeRO-0 + GaLore equal one process; ZeRO 1/2/3 + GaLore and
    GaLore / SST on deepspeed.zero.Init weights are refused with the engines that work."""
    pytest.importorskip("deepspeed")
    proc = subprocess.run(deepspeed_launch("tests.deepspeed_worker", str(tmp_path)),
                          env=_deepspeed_env(), capture_output=True, text=True, timeout=400,
                          cwd=ROOT)
    assert proc.returncode == 0 and (tmp_path / "done1").exists(), (
        proc.stdout[-3000:] + proc.stderr[-5000:])
    results = json.loads((tmp_path / "results.json").read_text())
    for case in ("adamw-zero1", "adamw-zero2", "galore_adamw-zero0",  # the same sums: exact
                 "apollo_mini-zero0"):
        assert results[case]["max_diff"] == 0.0 and results[case]["moved"] > 1e-2, case
    # ZeRO-3 reduce-scatters in another order; Adam's first step magnifies that rounding
    assert results["adamw-zero3"]["max_diff"] < 2e-4, results["adamw-zero3"]
    assert results["galore_adamw-zero0"]["subspaces"] == 14  # projected: one basis per matrix
    bf16 = results["galore_adamw-zero0-bf16"]  # whole fp32 copies of the parameters: projected
    assert bf16["error"] is None and bf16["subspaces"] == 14, bf16
    for stage in (1, 2, 3):
        error = results[f"galore_adamw-zero{stage}"]["error"]
        assert error and "its 14 matrices were replaced by 1 1-D tensor(s)" in error, error
        assert "GaLoreAdamW, as configured, runs under DDP and DeepSpeed ZeRO stage 0" in error
    zero3 = results["galore_adamw-zero3-init"]["error"]
    assert zero3 and "holds DeepSpeed ZeRO-3 partitioned parameters" in zero3, zero3
    assert "model.layers.0.self_attn.q_proj.weight (64, 64)" in zero3
    assert "rank=8 exceeds" not in zero3
    sst = results["sst_adamw-zero3-init"]["error"]
    assert sst and "ZeRO-3 partitioned parameters" in sst and "ZeRO stage 0" in sst, sst
    assert results["adamw-zero3-init"]["built"] == "AdamW"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Corpus and tokenizer built once here, so launched ranks only read them."""
    path = str(tmp_path_factory.mktemp("recipe-cache"))
    pretrain.load_data(config.parse_args(["--config", TEST_CONFIG, "--cache-dir", path]))
    return path


def _metric_lines_once(out: Path) -> None:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    keys = [(m["step"], "loss" in m) for m in lines]
    assert len(keys) == len(set(keys)), "metrics written more than once"


@pytest.mark.slow
@needs_compiler
def test_recipe_under_the_deepspeed_launcher_equals_one_process(tmp_path, cache):
    """``deepspeed --num_gpus 2 --module recipes.pretrain --deepspeed ds_zero0.json``: GaLore
    (refresh every 4 steps) trains as one process with the same global batch, metrics written
    once."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "zero0"
    args = ["--optimizer", "galore_adamw", "--max-steps", "8"]
    cmd = deepspeed_launch("recipes.pretrain", "--config", TEST_CONFIG,
                           "--cache-dir", cache, "--output-dir", str(out), "--batch-size", "2",
                           "--deepspeed", str(ROOT / "recipes" / "accelerate" / "ds_zero0.json"),
                           "--check-sync-every", "4", *args)
    proc = subprocess.run(cmd, env=_deepspeed_env(), capture_output=True, text=True,
                          timeout=400, cwd=ROOT)
    r0, r1 = succeeded(proc, out, 2)
    assert "galore_adamw / deepspeed-zero0 x 2" in proc.stdout
    assert r0["param_digest"] == r1["param_digest"]
    assert r0["subspace_digest"] == r1["subspace_digest"]
    _metric_lines_once(out)
    single_process(tmp_path / "single", cache, *args)
    assert_same_run(out, tmp_path / "single", rtol=1e-6)


@pytest.mark.slow
@needs_compiler
def test_accelerate_deepspeed_config_runs_deepspeed_on_cpu(tmp_path, cache, monkeypatch):
    """``accelerate launch --config_file deepspeed_zero2.yaml`` on CPU used to run DDP (or one
    process per rank); now ZeRO-2 runs, and AdamW equals one process."""
    pytest.importorskip("deepspeed")
    monkeypatch.setenv("PATH", _deepspeed_env()["PATH"])  # launch() passes os.environ on
    out = tmp_path / "zero2"
    args = ["--optimizer", "adamw", "--max-steps", "4"]
    proc = accelerate_launch("deepspeed_zero2.yaml", 2, out, cache, *args, "--batch-size", "2")
    succeeded(proc, out, 2)
    assert "adamw / deepspeed-zero2 x 2" in proc.stdout
    _metric_lines_once(out)
    single_process(tmp_path / "single", cache, *args)
    assert_same_run(out, tmp_path / "single", rtol=1e-6)
