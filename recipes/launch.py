"""The recipe's ``Accelerator``: precision, trackers, engine (DDP, FSDP2, DeepSpeed), and the
launches it refuses.

accelerate runs FSDP and DeepSpeed only on accelerator devices; launched with an FSDP2 or
DeepSpeed config on CPU (gloo) it silently falls back to DDP (``ACCELERATE_USE_CPU=true``) or,
for DeepSpeed, lets every process train alone as rank 0 of 1.  The recipe runs launched CPU
processes through accelerate's gloo path and then turns accelerate's own FSDP2 or DeepSpeed
path back on (:func:`switch_cpu_engine`, the one place that writes accelerate's private
state), so CPU tests exercise the same code as GPUs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from recipes.config import RecipeConfig

#: how to launch the recipe on several CPU processes, for the errors of :func:`check_launch`
WORKING_LAUNCHES = (
    "Launches that work on CPU (recipes/README.md): DDP with `ACCELERATE_USE_CPU=true accelerate "
    "launch --config_file recipes/accelerate/ddp.yaml --num_processes 2 --mixed_precision no "
    "-m recipes.pretrain ...` (fsdp2.yaml for FSDP2) or `torchrun --nproc_per_node 2 "
    "-m recipes.pretrain ...`; DeepSpeed with `DS_ACCELERATOR=cpu deepspeed --num_gpus 2 "
    "--module recipes.pretrain --deepspeed recipes/accelerate/ds_zero0.json ...` (ZeRO stage 0: "
    "every optimizer; ds_zero2.json: adamw and lora only), from the repository's root"
)

#: where launchers put the number of processes and this process's rank (torchrun, deepspeed,
#: accelerate: WORLD_SIZE / RANK; MPI launchers: the others), as accelerate reads them
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
RANK_VARIABLES = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "LOCAL_RANK")
#: where launchers put this process's rank on its machine
LOCAL_RANK_VARIABLES = ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK",
                        "MPI_LOCALRANKID")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("true", "1", "yes")


def _launched(variables: tuple[str, ...]) -> tuple[str, int] | None:
    """``(name, value)`` of the first of ``variables`` set in the environment, or None."""
    name = next((v for v in variables if os.environ.get(v)), None)
    return None if name is None else (name, int(os.environ[name]))


def local_rank() -> int | None:
    """This process's rank on its machine as the launcher set it, or None (not launched)."""
    launched = _launched(LOCAL_RANK_VARIABLES)
    return None if launched is None else launched[1]


def set_project_dir(accelerator: Any, path: str | os.PathLike) -> None:
    """Point the accelerator's project and logging directories (where TensorBoard writes) at
    ``path``: the run's directory, which the processes agree on after the accelerator exists
    (:func:`recipes.pretrain.agree_output_dir`)."""
    config = accelerator.project_configuration
    config.project_dir = config.logging_dir = str(path)


def _no_accelerator_device() -> bool:
    """Whether this machine has no GPU (or other accelerator): processes talk over gloo."""
    available = getattr(torch, "accelerator", None)
    if available is not None:
        return not torch.accelerator.is_available()
    return not torch.cuda.is_available()  # pragma: no cover - torch < 2.6


def engine_name(accelerator: Any) -> str:
    """``single``, ``ddp``, ``fsdp`` or ``deepspeed-zero<stage>``."""
    kind = str(accelerator.distributed_type).split(".")[-1].lower()
    if kind == "deepspeed":
        return f"deepspeed-zero{zero_stage(accelerator)}"
    return {"no": "single", "multi_cpu": "ddp", "multi_gpu": "ddp"}.get(kind, kind)


def zero_stage(accelerator: Any) -> int:
    """The ZeRO stage of a DeepSpeed accelerator's config."""
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def deepspeed_plugin(cfg: RecipeConfig) -> Any:
    """The ``DeepSpeedPlugin`` of ``cfg.deepspeed`` (a JSON file), or None.

    ``None`` also when DeepSpeed comes from an accelerate config (``distributed_type:
    DEEPSPEED``): accelerate then builds the plugin from the launcher's environment.
    """
    if not cfg.deepspeed:
        return None
    from accelerate.utils import DeepSpeedPlugin

    path = Path(cfg.deepspeed)
    if not path.is_file():
        raise FileNotFoundError(f"deepspeed={cfg.deepspeed!r}: no such DeepSpeed JSON config")
    return DeepSpeedPlugin(hf_ds_config=json.loads(path.read_text()))


def _mixed_precision(cfg: RecipeConfig) -> str | None:
    """``cfg.mixed_precision``, with ``auto`` resolved (``None``: the launcher's setting)."""
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
    if os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return None  # what the launcher / accelerate config says
    cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return "bf16" if cuda_bf16 else "no"


def _trackers(cfg: RecipeConfig) -> list[str] | None:
    trackers = set(cfg.report_to)
    log_with = sorted({"tensorboard", "wandb"} if "all" in trackers
                      else trackers & {"tensorboard", "wandb"})
    return log_with or None


def make_accelerator(cfg: RecipeConfig) -> Any:
    """An ``Accelerator`` with the recipe's accumulation, precision, engine and trackers.

    DeepSpeed is asked for with ``cfg.deepspeed`` (a JSON config; any launcher: ``deepspeed``,
    ``torchrun``, ``accelerate launch``) or an accelerate config with ``distributed_type:
    DEEPSPEED``.  Launched processes on a machine without GPUs run over gloo, with FSDP2 or
    DeepSpeed switched back on (see the module's docstring).  Launches that would still not
    run as asked are refused (:func:`check_launch`).
    """
    from accelerate import Accelerator

    plugin = deepspeed_plugin(cfg)
    wants_deepspeed = (f"--deepspeed {cfg.deepspeed}" if plugin is not None else
                       "the accelerate config's distributed_type: DEEPSPEED"
                       if _env_flag("ACCELERATE_USE_DEEPSPEED") else None)
    # launched processes (LOCAL_RANK / WORLD_SIZE set) on a machine without GPUs: gloo, which
    # accelerate only sets up with cpu=True (else each process would run alone)
    world = _launched(WORLD_SIZE_VARIABLES)
    launched = "LOCAL_RANK" in os.environ or (world is not None and world[1] > 1)
    cpu = launched and _no_accelerator_device()
    accelerator = Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              mixed_precision=_mixed_precision(cfg), log_with=_trackers(cfg),
                              project_dir=cfg.output_dir or cfg.runs_dir, cpu=cpu,
                              deepspeed_plugin=plugin)
    _enable_fsdp2_on_cpu(accelerator)
    if wants_deepspeed:
        _enable_deepspeed_on_cpu(accelerator, plugin)
    check_launch(accelerator, wants_deepspeed)
    return accelerator


def switch_cpu_engine(accelerator: Any, distributed_type: Any, plugin: Any) -> None:
    """Make a gloo (``MULTI_CPU``) accelerator run FSDP or DeepSpeed with ``plugin``.

    The recipe's only use of accelerate's private state.  Why: ``AcceleratorState.__init__``
    (accelerate 1.0 up to at least 1.15, ``accelerate/state.py``) turns FSDP on only for the
    accelerator-device distributed types (``MULTI_GPU``, ``MULTI_XPU``, ...; not
    ``MULTI_CPU``) and DeepSpeed only when ``cpu`` is false, and no public argument or
    environment variable chooses them for gloo processes.  This writes what that constructor
    writes on GPUs:

    * the plugin: ``state.fsdp_plugin``; for DeepSpeed ``state.deepspeed_plugins``, selected
      with ``DeepSpeedPlugin.select(_from_accelerator_state=True)`` after taking the
      launcher's precision, and ``state._mixed_precision = "no"`` (DeepSpeed's config holds the
      precision), and no wrapped engine yet (``accelerator.deepspeed_engine_wrapped``);
    * ``state.distributed_type`` and ``PartialState._shared_state["distributed_type"]``
      (accelerate keeps the type in both shared states and reads either).

    ``tests/test_recipe_accelerate.py`` fails when accelerate changes: when these private
    names go away, or when the public path starts to run FSDP / DeepSpeed on CPU (then this
    function can go).

    Parameters
    ----------
    accelerator
        An ``Accelerator`` whose ``distributed_type`` is ``MULTI_CPU``.
    distributed_type
        ``DistributedType.FSDP`` or ``DistributedType.DEEPSPEED``.
    plugin
        The ``FullyShardedDataParallelPlugin`` or ``DeepSpeedPlugin`` to run.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = accelerator.state
    if distributed_type == DistributedType.FSDP:
        state.fsdp_plugin = plugin
    elif distributed_type == DistributedType.DEEPSPEED:
        plugin.set_mixed_precision(state._mixed_precision)  # as AcceleratorState does on GPUs
        plugin.select(_from_accelerator_state=True)
        state.deepspeed_plugins = plugin
        state._mixed_precision = "no"  # DeepSpeed's config holds the precision
        accelerator.deepspeed_engine_wrapped = None
    else:
        raise ValueError(f"switch_cpu_engine runs FSDP or DEEPSPEED, not {distributed_type}")
    state.distributed_type = distributed_type
    PartialState._shared_state["distributed_type"] = distributed_type


def _enable_deepspeed_on_cpu(accelerator: Any, plugin: Any) -> None:
    """Turn accelerate's DeepSpeed path on for gloo processes (accelerate made them DDP)."""
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        raise RuntimeError(
            f"DeepSpeed's accelerator is {get_accelerator().device_name()!r} but the processes run "
            f"on CPU; set DS_ACCELERATOR=cpu. {WORKING_LAUNCHES}.")
    plugin = plugin if plugin is not None else DeepSpeedPlugin()  # the launcher's variables
    switch_cpu_engine(accelerator, DistributedType.DEEPSPEED, plugin)


def _enable_fsdp2_on_cpu(accelerator: Any) -> None:
    """Turn accelerate's FSDP2 path on for gloo processes launched with an FSDP config."""
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.utils import DistributedType

    wants_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not wants_fsdp or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()  # reads the launcher's FSDP_* variables
    if plugin.fsdp_version != 2:
        raise ValueError("On CPU the recipe runs FSDP2 only (fsdp_version: 2).")
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    switch_cpu_engine(accelerator, DistributedType.FSDP, plugin)


def check_launch(accelerator: Any, wants_deepspeed: str | None = None) -> None:
    """Refuse launches this process would not run as asked, before any work.

    Raises ``RuntimeError`` (saying which launches work) when the launcher started more
    processes than accelerate sees (each would train alone on the same data and write the same
    metrics: the losses of a DeepSpeed engine that believes it is alone come out doubled), when
    this process's rank disagrees with the launcher's ``RANK`` (several processes would each
    act as rank 0), or when DeepSpeed was asked for but the accelerator is not DeepSpeed.

    Parameters
    ----------
    accelerator
        The recipe's ``Accelerator``.
    wants_deepspeed
        What asked for DeepSpeed (``--deepspeed FILE`` or the accelerate config), or None.
    """
    from accelerate.utils import DistributedType

    world_variable, world = _launched(WORLD_SIZE_VARIABLES) or ("WORLD_SIZE", 1)
    rank_variable, rank = _launched(RANK_VARIABLES) or ("RANK", 0)
    n, i = accelerator.num_processes, accelerator.process_index
    problems = []
    if world != n:
        problems.append(f"the launcher started {world_variable}={world} processes but this one "
                        f"runs as rank {i} of {n} ({engine_name(accelerator)}): every process "
                        "would train alone on the same samples and write the same metrics")
    elif rank != i:
        problems.append(f"the launcher made this process {rank_variable}={rank} but it runs as "
                        f"rank {i} of {n}: several processes would act as the same rank")
    if wants_deepspeed and accelerator.distributed_type != DistributedType.DEEPSPEED:
        problems.append(f"DeepSpeed was asked for ({wants_deepspeed}) but the accelerator "
                        f"runs {engine_name(accelerator)}")
    if problems:
        raise RuntimeError("Refusing this launch: " + "; ".join(problems) + ". "
                           + WORKING_LAUNCHES + ".")
