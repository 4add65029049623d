"""The recipe's one use of accelerate's private state (``recipes.launch.switch_cpu_engine``):
FSDP2 and DeepSpeed on gloo processes.

These tests fail when accelerate changes under the workaround: when the public path starts to
run FSDP / DeepSpeed on CPU by itself (then the workaround can go), or when the private names
it writes go away (then it must be redone).  Each case runs in a process of its own
(accelerate's state is a process-wide singleton), as one gloo process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import free_port
from tests.test_recipe_launch import ROOT, python_path

PROBE = r"""
import json, sys
from accelerate import Accelerator, FullyShardedDataParallelPlugin
from accelerate.state import PartialState
from accelerate.utils import DistributedType
from recipes.launch import switch_cpu_engine

if sys.argv[1] == "fsdp":
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
    kind = DistributedType.FSDP
else:
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin(hf_ds_config={"train_micro_batch_size_per_gpu": 1,
                                           "zero_optimization": {"stage": 0}})
    accelerator = Accelerator(cpu=True, deepspeed_plugin=plugin)
    kind = DistributedType.DEEPSPEED
public = str(accelerator.distributed_type)
switch_cpu_engine(accelerator, kind, plugin)
state = accelerator.state
active = state.fsdp_plugin if kind == DistributedType.FSDP else state.deepspeed_plugin
print(json.dumps({"public": public, "accelerator": str(accelerator.distributed_type),
                  "partial": str(PartialState().distributed_type), "plugin": active is plugin,
                  "precision": accelerator.mixed_precision}))
accelerator.end_training()
"""


def probe(engine: str) -> dict:
    """One gloo process asking accelerate for ``engine`` publicly, then switched."""
    env = {**os.environ, "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_FSDP": str(engine == "fsdp").lower(), "FSDP_VERSION": "2",
           "ACCELERATE_USE_DEEPSPEED": str(engine == "deepspeed").lower(),
           "DS_ACCELERATOR": "cpu", "PYTHONPATH": python_path()}
    proc = subprocess.run([sys.executable, "-c", PROBE, engine], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, (
        f"recipes.launch.switch_cpu_engine no longer works with this accelerate: the private "
        f"state it writes has changed; redo it.\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("engine, kind", [("fsdp", "FSDP"), ("deepspeed", "DEEPSPEED")])
def test_cpu_processes_need_the_workaround_and_it_still_works(engine, kind):
    if engine == "deepspeed":
        pytest.importorskip("deepspeed")
    result = probe(engine)
    assert result["public"] == "DistributedType.MULTI_CPU", (
        f"accelerate now runs {kind} on CPU processes by itself ({result['public']}): "
        "drop recipes.launch.switch_cpu_engine and its callers")
    assert result["accelerator"] == result["partial"] == f"DistributedType.{kind}", result
    assert result["plugin"] and result["precision"] == "no", result
