"""LLaMA pretraining with any optimizer of lowrank-optim, launched with accelerate.

The GaLore paper's workflow (arXiv:2403.03507): a LLaMA model built from a config (tiny for
CPU, 60m ... 7b), cosine schedule with 10% warm-up decaying to 10% of the peak, periodic
validation perplexity, checkpoints with exact resume, on one process or many (DDP, FSDP2,
DeepSpeed: accelerate's configs in ``recipes/accelerate/``, or ``--deepspeed ds_zero0.json``
with any launcher, e.g. ``deepspeed --num_gpus 2 recipes/pretrain.py``).

    accelerate launch recipes/pretrain.py --config recipes/configs/tiny.yaml
    accelerate launch --config_file recipes/accelerate/ddp.yaml recipes/pretrain.py \\
        --config recipes/configs/llama_60m.yaml --optimizer galore_adamw

Settings come from the dataclass :class:`RecipeConfig` (defaults), then the YAML/JSON file
given with ``--config``, then that file's ``optimizer_overrides[<optimizer>]`` block, then
command-line flags (``--max-steps 100``; dicts and lists as JSON or space-separated values).

Data: the offline stdlib-documentation corpus (default), local text files (``--data
'texts/*.txt'``) or a Hugging Face dataset (``--hf-dataset allenai/c4 --hf-config en
--streaming true --tokenizer t5-base``, online).  Outputs in ``output_dir``: ``metrics.jsonl``
(one JSON line per log / eval), ``summary.json`` (final numbers), ``rank<i>.json`` (per-rank
digests of parameters and subspaces, written last: a success marker), ``checkpoints/step_<n>``.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
import typing
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `corpus` next to this file

import corpus  # noqa: E402

import lowrank_optim as lo  # noqa: E402
from lowrank_optim import distributed, safe_load  # noqa: E402
from lowrank_optim.model_configs import LLAMA_SHAPES, build_llama  # noqa: E402
from lowrank_optim.registry import BASELINES, MODEL_BUILDERS  # noqa: E402

#: optimizer names the recipe adds to ``lowrank_optim.available()``
RECIPE_BASELINES = ("lora",)


class RecipeError(ValueError):
    """A setting, flag or checkpoint the recipe cannot use; the command line prints the message
    and exits with status 2 (no traceback)."""


class CheckpointError(RecipeError):
    """A checkpoint that is incomplete, unreadable, unsafe to load, or saved with other
    settings."""


@dataclass
class RecipeConfig:
    """Every setting of the recipe (YAML keys and ``--flag-name`` flags are these names)."""

    # model
    model: str = "tiny"  # one of lowrank_optim.model_configs.LLAMA_SHAPES
    model_overrides: dict = field(default_factory=dict)  # LlamaConfig fields, e.g. layers
    # optimizer
    optimizer: str = "galore_adamw"  # lowrank_optim.available() or "lora"
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list | None = None  # None: the optimizer's default (Adafactor takes none)
    rank: int = 128  # projection rank; LoRA's r; SST's sampled vectors
    update_proj_gap: int | None = None  # None: the optimizer's default (GaLore 200, DCT 1)
    scale: float | None = None  # None: the optimizer's default (GaLore 0.25, DCT 1.0)
    proj_type: str = "std"
    target_modules: Any = "all-linear"  # "all-linear", a regex, or a list of names
    optimizer_kwargs: dict = field(default_factory=dict)  # passed to the optimizer as is
    lora_alpha: float = 32.0
    refresh_sync: str = "none"  # "broadcast": refresh on rank 0 and broadcast (DDP)
    optimizer_overrides: dict = field(default_factory=dict)  # {name: {field: value}}
    # data
    data: list = field(default_factory=list)  # local text files (globs); empty: stdlib docs
    hf_dataset: str | None = None  # e.g. allenai/c4 (needs `datasets`, online)
    hf_config: str | None = None
    hf_split: str = "train"
    hf_val_split: str = "validation"
    hf_text_field: str = "text"
    streaming: bool = False
    tokenizer: str = "bpe"  # "bpe" (trained locally), "bytes", tokenizer.json, or a HF name
    vocab_size: int = 1024  # of the locally trained BPE
    corpus_max_chars: int | None = None  # cut the stdlib corpus (tests)
    val_fraction: float = 0.05
    cache_dir: str = "~/.cache/lowrank_optim"
    seq_len: int = 256
    # batch and schedule
    batch_size: int = 8  # per process and micro-step
    gradient_accumulation_steps: int = 1
    max_steps: int = 1000  # optimizer steps; the schedule spans them
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 0.0  # 0: no clipping
    mixed_precision: str = "auto"  # auto (launcher's, else bf16 on CUDA), no, bf16, fp16
    # engine
    deepspeed: str | None = None  # a DeepSpeed JSON config: run under DeepSpeed (any launcher)
    # evaluation, logging, checkpoints
    eval_every: int = 0  # 0: only at the end
    eval_samples: int = 256  # validation windows per evaluation
    log_every: int = 10
    report_to: list = field(default_factory=lambda: ["console"])  # + tensorboard, wandb, all
    project: str = "lowrank-optim"
    run_name: str | None = None
    output_dir: str = "runs/pretrain"
    save_every: int = 0  # 0: no periodic checkpoint
    keep_checkpoints: int = 2
    resume_from: str | None = None  # a checkpoint directory, or "latest" in output_dir
    allow_config_change: bool = False  # resume although structural settings differ (logged)
    allow_inexact_resume: bool = False  # resume although RNG states are missing/unreadable
    stop_after: int | None = None  # stop (with a checkpoint) after this step: an interruption
    save_final_model: bool = False
    check_sync_every: int = 0  # DDP: check every N steps that ranks hold identical replicas
    progress: bool = True
    seed: int = 0


# -- configuration ----------------------------------------------------------------------------
def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(RecipeConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(RecipeConfig)}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _bad(name: str, value: Any, problem: str) -> RecipeError:
    """The error for setting ``name``: its value, what is wrong, and the flag that sets it."""
    return RecipeError(f"{name}={value!r}: {problem} (set with {_flag(name)} or `{name}:` in "
                       "the config file)")


def _coerce(name: str, value: Any) -> Any:
    """``value`` (from YAML or the command line) as the type of field ``name``.

    Raises
    ------
    RecipeError
        The value does not convert; the message names the setting and its flag.
    """
    kind = _field_types()[name]
    args = typing.get_args(kind)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), kind) if args else kind
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional or base is Any:
            return None
        raise _bad(name, value, "cannot be null")
    if base is bool:
        if isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise _bad(name, value, "expected true or false")
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, (bool, int)) or value not in (0, 1):
            raise _bad(name, value, "expected true or false")
        return bool(value)
    if base in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise _bad(name, value, f"expected {'an integer' if base is int else 'a number'}")
        try:
            number = float(value)
        except ValueError:
            raise _bad(name, value, f"expected {'an integer' if base is int else 'a number'}"
                       ) from None
        if base is float:
            return number
        if not math.isfinite(number) or int(number) != number:
            raise _bad(name, value, "expected an integer")
        return int(number)
    if base in (dict, list):
        if isinstance(value, str):
            try:
                value = json.loads(value) if value[:1] in "[{" else [value]
            except json.JSONDecodeError as e:
                raise _bad(name, value, f"not valid JSON ({e})") from None
        if isinstance(value, (list, tuple)) and base is list:
            return list(value)
        if not isinstance(value, base):
            raise _bad(name, value, f"expected a {base.__name__}")
        return value
    if base is Any and isinstance(value, str) and value[:1] == "[":
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise _bad(name, value, f"not valid JSON ({e})") from None
    if base is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # YAML reads `run_name: 1` as a number
        if not isinstance(value, str):
            raise _bad(name, value, "expected a string")
    return value


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Settings from a YAML or JSON file.

    Raises
    ------
    RecipeError
        The file is missing, does not parse, or does not hold a mapping.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise RecipeError(f"--config {path}: cannot read the file ({e.strerror or e})") from None
    try:
        if str(path).endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as e:  # json.JSONDecodeError, yaml.YAMLError
        raise RecipeError(f"--config {path}: does not parse ({e})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"--config {path}: expected a mapping of settings")
    return data


def _check_keys(data: Any, where: str) -> None:
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping of settings, got {data!r}")
    known = {f.name for f in dataclasses.fields(RecipeConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        import difflib

        hints = {u: difflib.get_close_matches(str(u), known, 1) for u in unknown}
        hint = "; ".join(f"{u!r}: did you mean {m[0]!r}?" for u, m in hints.items() if m)
        raise RecipeError(f"{where}: unknown settings {unknown}{'; ' + hint if hint else ''}; "
                          f"valid ones: {sorted(known)}")


def make_config(file_settings: dict[str, Any], cli_settings: dict[str, Any]) -> RecipeConfig:
    """Defaults < file < file's ``optimizer_overrides[optimizer]`` < command line.

    Raises
    ------
    RecipeError
        An unknown key, a value of the wrong type, or settings :func:`validate_config` rejects.
    """
    _check_keys(file_settings, "config file")
    _check_keys(cli_settings, "command line")
    merged = {**file_settings, **cli_settings}
    name = str(merged.get("optimizer", RecipeConfig.optimizer))
    overrides = _coerce("optimizer_overrides", merged.get("optimizer_overrides", {}))
    for block, block_settings in overrides.items():  # a typo in any block fails now, not later
        if _normal_name(block) not in optimizer_names():
            raise _bad("optimizer_overrides", block,
                       f"not an optimizer; blocks are named after {optimizer_names()}")
        _check_keys(block_settings, f"optimizer_overrides[{block!r}]")
    per_optimizer = next((v for k, v in overrides.items()
                          if _normal_name(k) == _normal_name(name)), {}) or {}
    settings = {**file_settings, **per_optimizer, **cli_settings}
    cfg = RecipeConfig(**{k: _coerce(k, v) for k, v in settings.items()})
    validate_config(cfg)
    return cfg


def _normal_name(name: Any) -> str:
    return str(name).lower().replace("-", "_")


#: optimizer_kwargs keys that have their own setting (the setting would silently win, or lose)
_OWN_SETTINGS = ("lr", "weight_decay", "betas", "rank", "update_proj_gap", "scale", "proj_type",
                 "target_modules")


def validate_config(cfg: RecipeConfig) -> None:
    """Raise :class:`RecipeError` on settings the recipe cannot run, or would silently ignore.

    Each message names the setting, its value, what is wrong and the flag that sets it.
    """
    from lowrank_optim.projectors.dct import DCT_PROJ_TYPES
    from lowrank_optim.validation import PROJ_TYPES

    names = optimizer_names()
    if _normal_name(cfg.optimizer) not in names:
        raise _bad("optimizer", cfg.optimizer, f"choose one of {names}")
    if cfg.model not in LLAMA_SHAPES:
        raise _bad("model", cfg.model, f"choose one of {sorted(LLAMA_SHAPES)}")
    for key in ("batch_size", "gradient_accumulation_steps", "max_steps", "seq_len", "log_every",
                "eval_samples", "rank", "keep_checkpoints", "vocab_size"):
        if getattr(cfg, key) < 1:
            raise _bad(key, getattr(cfg, key), "must be >= 1")
    for key in ("eval_every", "save_every", "check_sync_every", "seed"):
        if getattr(cfg, key) < 0:
            raise _bad(key, getattr(cfg, key), "must be >= 0 (0: off)" if key != "seed"
                       else "must be >= 0")
    for key in ("update_proj_gap", "stop_after", "corpus_max_chars"):
        if getattr(cfg, key) is not None and getattr(cfg, key) < 1:
            raise _bad(key, getattr(cfg, key), "must be >= 1, or null for the default")
    if cfg.stop_after is not None and cfg.stop_after > cfg.max_steps:
        raise _bad("stop_after", cfg.stop_after, f"beyond max_steps={cfg.max_steps}, so it would "
                   "never interrupt the run; lower it or drop it")
    for key, text in (("lr", "must be > 0"), ("lora_alpha", "must be > 0"),
                      ("scale", "must be > 0, or null for the default")):
        value = getattr(cfg, key)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise _bad(key, value, text)
    for key, text in (("weight_decay", "must be >= 0"),
                      ("max_grad_norm", "must be >= 0 (0: no clipping)")):
        if not (math.isfinite(getattr(cfg, key)) and getattr(cfg, key) >= 0):
            raise _bad(key, getattr(cfg, key), text)
    if not 0.0 <= cfg.warmup_ratio < 1.0:
        raise _bad("warmup_ratio", cfg.warmup_ratio, "must be in [0, 1)")
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise _bad("min_lr_ratio", cfg.min_lr_ratio, "must be in [0, 1]")
    if not 0.0 < cfg.val_fraction < 1.0:
        raise _bad("val_fraction", cfg.val_fraction, "must be in (0, 1)")
    if cfg.betas is not None:
        try:
            betas = [float(b) for b in cfg.betas]
        except (TypeError, ValueError):
            raise _bad("betas", cfg.betas, "expected two numbers, e.g. --betas 0.9 0.999"
                       ) from None
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise _bad("betas", cfg.betas, "expected two numbers in [0, 1), e.g. --betas 0.9 "
                       "0.999")
    proj_types = DCT_PROJ_TYPES if _normal_name(cfg.optimizer).startswith("dct_") else PROJ_TYPES
    if cfg.proj_type not in proj_types:
        raise _bad("proj_type", cfg.proj_type, f"choose one of {list(proj_types)} for "
                   f"{cfg.optimizer}")
    targets = cfg.target_modules
    if not (isinstance(targets, str) and targets or isinstance(targets, list) and targets
            and all(isinstance(t, str) and t for t in targets)):
        raise _bad("target_modules", targets, "expected 'all-linear', a regex, or a non-empty "
                   "list of module names")
    clashes = sorted(set(cfg.optimizer_kwargs) & set(_OWN_SETTINGS))
    if clashes:
        raise _bad("optimizer_kwargs", cfg.optimizer_kwargs, f"{clashes} have their own "
                   f"settings; use {', '.join(_flag(c) for c in clashes)} instead")
    if cfg.refresh_sync not in ("none", "broadcast"):
        raise _bad("refresh_sync", cfg.refresh_sync, "choose 'none' or 'broadcast'")
    if cfg.mixed_precision not in ("auto", "no", "bf16", "fp16"):
        raise _bad("mixed_precision", cfg.mixed_precision, "choose auto, no, bf16 or fp16")
    trackers = {"console", "tensorboard", "wandb", "all", "none"}
    if not cfg.report_to or set(cfg.report_to) - trackers:
        raise _bad("report_to", cfg.report_to, f"choose from {sorted(trackers)}")
    if "none" in cfg.report_to and len(set(cfg.report_to)) > 1:
        raise _bad("report_to", cfg.report_to, "'none' cannot be combined with trackers")
    if not all(isinstance(d, str) and d for d in cfg.data):
        raise _bad("data", cfg.data, "expected file paths or glob patterns")
    if cfg.hf_dataset and cfg.data:
        raise _bad("data", cfg.data, f"hf_dataset={cfg.hf_dataset!r} is set too; choose one "
                   "source (--data or --hf-dataset)")
    for key in ("output_dir", "cache_dir", "tokenizer"):
        if not getattr(cfg, key):
            raise _bad(key, getattr(cfg, key), "cannot be empty")


def parse_args(argv: list[str] | None = None) -> RecipeConfig:
    """The recipe's command line: ``--config FILE`` plus one flag per :class:`RecipeConfig`
    field."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 argument_default=argparse.SUPPRESS)
    ap.add_argument("--config", help="YAML or JSON file of settings")
    # the `deepspeed` launcher appends --local_rank=<i>; LOCAL_RANK in the environment says the same
    ap.add_argument("--local_rank", "--local-rank", dest="local_rank", help=argparse.SUPPRESS)
    for f in dataclasses.fields(RecipeConfig):
        flag = "--" + f.name.replace("_", "-")
        if _field_types()[f.name] in (list, list | None):
            ap.add_argument(flag, dest=f.name, nargs="+", metavar=f.name.upper())
        else:
            ap.add_argument(flag, dest=f.name, metavar=f.name.upper())
    ns = vars(ap.parse_args(argv))
    path = ns.pop("config", None)
    ns.pop("local_rank", None)
    cli = {k: (v if not isinstance(v, list) or len(v) > 1 or v[0][:1] != "[" else v[0])
           for k, v in ns.items()}
    return make_config(load_config_file(path) if path else {}, cli)


def optimizer_names() -> list[str]:
    """Every optimizer the recipe can run: the library's, plus the LoRA baseline."""
    return sorted({*lo.available(), *RECIPE_BASELINES})


# -- building blocks ----------------------------------------------------------------------------
#: how to launch the recipe on several CPU processes, for the errors of :func:`check_launch`
WORKING_LAUNCHES = (
    "Launches that work on CPU (recipes/README.md): DDP with `ACCELERATE_USE_CPU=true accelerate "
    "launch --config_file recipes/accelerate/ddp.yaml --num_processes 2 --mixed_precision no "
    "recipes/pretrain.py ...` (fsdp2.yaml for FSDP2) or `torchrun --nproc_per_node 2 "
    "recipes/pretrain.py ...`; DeepSpeed with `DS_ACCELERATOR=cpu deepspeed --num_gpus 2 "
    "recipes/pretrain.py --deepspeed recipes/accelerate/ds_zero0.json ...` (ZeRO stage 0: every "
    "optimizer; ds_zero2.json: adamw and lora only)"
)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("true", "1", "yes")


#: where launchers put the number of processes and this process's rank (torchrun, deepspeed,
#: accelerate: WORLD_SIZE / RANK; MPI launchers: the others), as accelerate reads them
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
RANK_VARIABLES = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "LOCAL_RANK")


def _launched(variables: tuple[str, ...]) -> tuple[str, int] | None:
    """``(name, value)`` of the first of ``variables`` set in the environment, or None."""
    name = next((v for v in variables if os.environ.get(v)), None)
    return None if name is None else (name, int(os.environ[name]))


def _no_accelerator_device() -> bool:
    """Whether this machine has no GPU (or other accelerator): processes talk over gloo."""
    available = getattr(torch, "accelerator", None)
    if available is not None:
        return not torch.accelerator.is_available()
    return not torch.cuda.is_available()  # pragma: no cover - torch < 2.6


def deepspeed_plugin(cfg: RecipeConfig):
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


def make_accelerator(cfg: RecipeConfig):
    """An ``Accelerator`` with the recipe's accumulation, precision, engine and trackers.

    accelerate runs FSDP and DeepSpeed only on accelerator devices; launched with an FSDP2 or
    DeepSpeed config on CPU (gloo) it silently falls back to DDP (``ACCELERATE_USE_CPU=true``)
    or, for DeepSpeed, lets every process train alone as rank 0 of 1.  The recipe runs
    launched CPU processes through accelerate's gloo path and then turns accelerate's own FSDP2
    or DeepSpeed path back on, so CPU tests exercise the same code as GPUs.  DeepSpeed is asked
    for with ``cfg.deepspeed`` (a JSON config; any launcher: ``deepspeed``, ``torchrun``,
    ``accelerate launch``) or an accelerate config with ``distributed_type: DEEPSPEED``.
    Launches that would still not run as asked are refused (:func:`check_launch`).
    """
    from accelerate import Accelerator

    mixed = cfg.mixed_precision
    if mixed == "auto":
        if os.environ.get("ACCELERATE_MIXED_PRECISION"):
            mixed = None  # what the launcher / accelerate config says
        else:
            cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
            mixed = "bf16" if cuda_bf16 else "no"
    trackers = set(cfg.report_to)
    log_with = sorted({"tensorboard", "wandb"} if "all" in trackers
                      else trackers & {"tensorboard", "wandb"})
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
                              mixed_precision=mixed, log_with=log_with or None,
                              project_dir=cfg.output_dir, cpu=cpu, deepspeed_plugin=plugin)
    _enable_fsdp2_on_cpu(accelerator)
    if wants_deepspeed:
        _enable_deepspeed_on_cpu(accelerator, plugin)
    check_launch(accelerator, wants_deepspeed)
    return accelerator


def _enable_deepspeed_on_cpu(accelerator, plugin) -> None:
    """Turn accelerate's DeepSpeed path on for gloo processes (accelerate made them DDP)."""
    from accelerate.state import PartialState
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        raise RuntimeError(
            f"DeepSpeed's accelerator is {get_accelerator().device_name()!r} but the processes run "
            f"on CPU; set DS_ACCELERATOR=cpu. {WORKING_LAUNCHES}.")
    plugin = plugin if plugin is not None else DeepSpeedPlugin()  # the launcher's variables
    state = accelerator.state
    plugin.set_mixed_precision(state._mixed_precision)  # as AcceleratorState does on GPUs
    plugin.select(_from_accelerator_state=True)
    state.deepspeed_plugins = plugin
    state._mixed_precision = "no"  # DeepSpeed's config holds the precision
    state.distributed_type = DistributedType.DEEPSPEED
    PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED
    accelerator.deepspeed_engine_wrapped = None


def check_launch(accelerator, wants_deepspeed: str | None = None) -> None:
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
                        f"runs as rank {i} of {n} ({_engine(accelerator)}): every process would "
                        "train alone on the same samples and write the same metrics")
    elif rank != i:
        problems.append(f"the launcher made this process {rank_variable}={rank} but it runs as "
                        f"rank {i} of {n}: several processes would act as the same rank")
    if wants_deepspeed and accelerator.distributed_type != DistributedType.DEEPSPEED:
        problems.append(f"DeepSpeed was asked for ({wants_deepspeed}) but the accelerator "
                        f"runs {_engine(accelerator)}")
    if problems:
        raise RuntimeError("Refusing this launch: " + "; ".join(problems) + ". "
                           + WORKING_LAUNCHES + ".")


def _enable_fsdp2_on_cpu(accelerator) -> None:
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    wants_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not wants_fsdp or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()  # reads the launcher's FSDP_* variables
    if plugin.fsdp_version != 2:
        raise ValueError("On CPU the recipe runs FSDP2 only (fsdp_version: 2).")
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


@dataclass
class Data:
    """Token windows for training and validation, and the tokenizer's vocabulary size."""

    train: Any  # corpus.PackedWindows or corpus.StreamingWindows
    val: corpus.PackedWindows
    vocab_size: int
    description: str


def load_data(cfg: RecipeConfig) -> Data:
    """The configured corpus, tokenized (cached) and cut into windows."""
    if cfg.hf_dataset:
        texts = corpus.hf_texts(cfg.hf_dataset, cfg.hf_config, cfg.hf_split, cfg.hf_text_field,
                                cfg.streaming)
        val_iter = corpus.hf_texts(cfg.hf_dataset, cfg.hf_config, cfg.hf_val_split,
                                   cfg.hf_text_field, cfg.streaming)()
        tokenizer = corpus.make_tokenizer(cfg.tokenizer, None, cfg.vocab_size, cfg.cache_dir)
        val_texts, need = [], cfg.eval_samples * cfg.seq_len
        for text in val_iter:  # enough validation text for eval_samples windows
            val_texts.append(text)
            need -= len(text) // 2
            if need <= 0:
                break
        val_ids = corpus.encode_documents(tokenizer, val_texts)
        train = corpus.StreamingWindows(texts, tokenizer, cfg.seq_len)
        return Data(train, corpus.PackedWindows(val_ids, cfg.seq_len, shuffle=False),
                    tokenizer.vocab_size, f"{cfg.hf_dataset} ({tokenizer.name})")
    if cfg.data:
        docs, source = corpus.file_documents(cfg.data), f"{len(cfg.data)} file pattern(s)"
    else:
        docs = corpus.cached_stdlib_documents(cfg.cache_dir, cfg.corpus_max_chars)
        source = "stdlib docs"
    train_texts, val_texts = corpus.split_documents(docs, cfg.val_fraction)
    tokenizer = corpus.make_tokenizer(cfg.tokenizer, train_texts, cfg.vocab_size, cfg.cache_dir)
    train_ids, val_ids = corpus.cached_token_streams(tokenizer, train_texts, val_texts,
                                                     cfg.cache_dir)
    description = (f"{source}, {tokenizer.name}: {len(train_ids):,} train / "
                   f"{len(val_ids):,} val tokens")
    return Data(corpus.PackedWindows(train_ids, cfg.seq_len, seed=cfg.seed),
                corpus.PackedWindows(val_ids, cfg.seq_len, shuffle=False),
                tokenizer.vocab_size, description)


def build_model(cfg: RecipeConfig, vocab_size: int) -> torch.nn.Module:
    """A freshly initialised LLaMA of ``cfg.model``'s shape with the tokenizer's vocabulary."""
    overrides = {"vocab_size": vocab_size,
                 "max_position_embeddings": max(1024, cfg.seq_len), **cfg.model_overrides}
    return build_llama(cfg.model, seed=cfg.seed, **overrides)


def wrap_lora(model: torch.nn.Module, cfg: RecipeConfig) -> torch.nn.Module:
    """peft LoRA on the targeted Linear layers; embeddings, norms and the head stay trainable
    (pretraining from scratch), the wrapped base weights stay frozen."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, bias="none",
                      target_modules=cfg.target_modules)
    model = get_peft_model(model, lora)
    for name, p in model.named_parameters():
        if ".base_layer." not in name:
            p.requires_grad_(True)
    return model


def build_optimizer(cfg: RecipeConfig, model: torch.nn.Module):
    """``(model, optimizer)`` for ``cfg.optimizer`` (LoRA wraps the model, SST converts it)."""
    name = cfg.optimizer.lower().replace("-", "_")
    kwargs: dict[str, Any] = {"lr": cfg.lr, "weight_decay": cfg.weight_decay,
                              **cfg.optimizer_kwargs}
    if cfg.betas is not None:
        kwargs["betas"] = tuple(float(b) for b in cfg.betas)
    if name == "lora":
        model = wrap_lora(model, cfg)
        optimizer = lo.create_optimizer(model, "adamw", **kwargs)
    elif name in BASELINES:
        optimizer = lo.create_optimizer(model, name, **kwargs)
    else:
        kwargs.update(rank=cfg.rank, target_modules=cfg.target_modules)
        if name not in MODEL_BUILDERS:  # projected optimizers; SST has its own schedule
            kwargs["proj_type"] = cfg.proj_type
            for key in ("update_proj_gap", "scale"):
                if getattr(cfg, key) is not None:
                    kwargs[key] = getattr(cfg, key)
        optimizer = lo.create_optimizer(model, name, **kwargs)
    if cfg.refresh_sync == "broadcast":
        if not isinstance(optimizer, lo.LowRankOptimizer):
            raise ValueError(f"refresh_sync='broadcast' needs a low-rank optimizer, not {name}")
        distributed.broadcast_refreshes(optimizer)
    return model, optimizer


def build_scheduler(cfg: RecipeConfig, optimizer: torch.optim.Optimizer):
    """Linear warm-up over ``warmup_ratio`` of the steps, then cosine to ``min_lr_ratio``."""
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=round(cfg.warmup_ratio * cfg.max_steps),
        num_training_steps=cfg.max_steps, min_lr_rate=cfg.min_lr_ratio)


def state_bytes(optimizer: torch.optim.Optimizer) -> lo.memory.StateBytes:
    """Optimizer-state bytes held by this rank (FSDP2 shards counted locally)."""
    return lo.memory.state_bytes(optimizer)


@torch.no_grad()
def evaluate(model, val: corpus.PackedWindows, cfg: RecipeConfig, accelerator) -> float:
    """Mean validation loss over the same windows whatever the number of processes."""
    world, rank, micro = accelerator.num_processes, accelerator.process_index, cfg.batch_size
    n = max(1, min(cfg.eval_samples, len(val)) // (micro * world)) * micro * world
    total = torch.zeros((), device=accelerator.device)
    model.eval()
    for start in range(rank * micro, n, micro * world):
        ids = val.samples(start % len(val), micro).to(accelerator.device)
        total += model(input_ids=ids, labels=ids).loss.float()
    model.train()
    return accelerator.reduce(total, "sum").item() / (n // micro)


def perplexity(loss: float) -> float:
    """``exp(loss)``, capped (a diverged run reports a huge number, not an overflow)."""
    return math.exp(min(loss, 50.0))


# -- crash-safe files ---------------------------------------------------------------------------
#: test hook: ``"<point>:<n>"`` kills this process with SIGKILL the n-th time it reaches
#: ``_fault_point(<point>)`` (points: atomic-open, atomic-write, atomic-replace, atomic-dirsync,
#: append-write, checkpoint-state, checkpoint-prune); unset in normal runs
FAULT_ENV = "LOWRANK_RECIPE_FAULT"
_fault_hits: dict[str, int] = {}


def _fault_armed(point: str) -> bool:
    return bool(point) and os.environ.get(FAULT_ENV, "").partition(":")[0] == point


def _fault_point(point: str) -> None:
    """SIGKILL this process here if ``$LOWRANK_RECIPE_FAULT`` names ``point`` (tests only)."""
    if not _fault_armed(point):
        return
    _fault_hits[point] = _fault_hits.get(point, 0) + 1
    if _fault_hits[point] == int(os.environ[FAULT_ENV].partition(":")[2] or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def _write_fd(fd: int, payload: bytes, point: str) -> None:
    """Write all of ``payload`` (in two halves around ``point`` when a test armed it)."""
    if _fault_armed(point):
        _write_fd(fd, payload[:len(payload) // 2], "")
        _fault_point(point)
        payload = payload[len(payload) // 2:]
    view = memoryview(payload)
    while view:
        view = view[os.write(fd, view):]


def _fsync_dir(directory: Path) -> None:
    """Make a rename or a new file in ``directory`` durable (no-op where directories cannot be
    opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Replace ``path`` with ``data`` so that a kill at any moment leaves the old file or the new
    one, never a partial one.

    The data goes to a temporary file in the same directory (``.<name>.<pid>.tmp``), which is
    flushed and fsynced, renamed over ``path`` with ``os.replace``, and the directory is fsynced.

    Parameters
    ----------
    path : str or os.PathLike
        The file to write.
    data : str or bytes
        Its whole new content (``str`` is encoded as UTF-8).
    """
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        _fault_point("atomic-open")
        _write_fd(fd, payload, "atomic-write")
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    _fault_point("atomic-replace")
    os.replace(tmp, path)
    _fault_point("atomic-dirsync")
    _fsync_dir(path.parent)


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append ``line`` and a newline to ``path`` with one write, then fsync.

    A kill can only leave a partial *last* line (no newline, or not JSON), which
    :meth:`Metrics.truncate` drops at resume.
    """
    path = Path(path)
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        _write_fd(fd, (line + "\n").encode("utf-8"), "append-write")
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        _fsync_dir(path.parent)


def _remove_stale_temporaries(directory: Path) -> None:
    """Temporary files of :func:`atomic_write` left by a killed process."""
    for tmp in directory.glob(".*.tmp"):
        if re.fullmatch(r"\.(metrics\.jsonl|summary\.json|rank\d+\.json)\.\d+\.tmp", tmp.name):
            tmp.unlink(missing_ok=True)


# -- checkpoints --------------------------------------------------------------------------------
STATE_FILE = "train_state.json"  # written last: marks a checkpoint complete
SETTINGS_FILE = "recipe_settings.json"  # the settings the checkpoint was trained with
SCHEDULER_FILE = "scheduler.json"  # the learning-rate schedule's state_dict
RNG_FILE = "rng_state_{}.json"  # per process: python, numpy, torch (CPU, CUDA) generators
#: files accelerate writes for objects the recipe no longer hands it: accelerate unpickles
#: ``custom_checkpoint_<i>.pkl`` with weights_only=False, and drops an unreadable
#: ``random_states_<i>.pkl`` silently; the recipe never lets accelerate read either
ACCELERATE_PICKLES = re.compile(r"(custom_checkpoint|random_states)_\d+\.pkl")

#: settings that may change between a checkpoint and its resume: they do not change what is
#: trained (outputs, logging, evaluation, launch); every other one is checked at resume
RESUME_FREE_SETTINGS = frozenset({
    "optimizer_overrides",  # already merged into the fields it overrides
    "refresh_sync", "cache_dir", "hf_val_split", "eval_every", "eval_samples", "log_every",
    "report_to", "project", "run_name", "output_dir", "save_every", "keep_checkpoints",
    "resume_from", "allow_config_change", "allow_inexact_resume", "stop_after",
    "save_final_model", "check_sync_every", "progress",
    "mixed_precision",  # compared as resolved by the accelerator (below)
})


def read_checkpoint_json(path: Path, missing: str) -> Any:
    """The JSON in checkpoint file ``path``; a :class:`CheckpointError` naming the file when
    it is missing (``missing`` says what that means) or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: {missing}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is unreadable: {e}") from None


@dataclass
class TrainState:
    """The data position and counters, saved as ``train_state.json`` with each checkpoint
    (written last and atomically: its presence marks the checkpoint complete)."""

    step: int = 0  # optimizer steps done
    samples: int = 0  # training windows consumed (all processes)
    tokens: int = 0
    metrics_lines: int | None = None  # lines of metrics.jsonl written before this checkpoint
    loss_sums: list[float] | None = None  # per-process train-loss sums since the last log line
    since_log: int = 0  # steps in those sums
    files: dict[str, int] | None = None  # every file of the checkpoint and its size in bytes

    def save(self, directory: Path) -> None:
        """Write ``directory/train_state.json`` atomically."""
        atomic_write(Path(directory) / STATE_FILE, json.dumps(asdict(self)))

    @classmethod
    def load(cls, directory: Path) -> TrainState:
        """Read ``directory/train_state.json``.

        Raises
        ------
        CheckpointError
            The file is missing or unreadable; the message names it and the reason.
        """
        path = Path(directory) / STATE_FILE
        data = read_checkpoint_json(path, "the checkpoint is incomplete (its save was "
                                          "interrupted)")
        if not isinstance(data, dict) or not isinstance(data.get("step"), int):
            raise CheckpointError(f"{path} is unreadable: expected an object with a 'step'")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def checkpoint_problem(directory: Path) -> str | None:
    """Why ``directory`` cannot be resumed from (a message naming the file), or ``None``.

    A checkpoint is complete when ``train_state.json`` reads back and every file it lists is
    there with its recorded size, and its settings file (when present) reads back.
    """
    try:
        state = TrainState.load(directory)
    except CheckpointError as e:
        return str(e)
    for name, size in (state.files or {}).items():
        path = Path(directory) / name
        if not path.is_file():
            return f"{path} is missing (listed in {Path(directory) / STATE_FILE})"
        if path.stat().st_size != size:
            return (f"{path} has {path.stat().st_size} bytes, {size} when the checkpoint was "
                    "saved")
    settings = Path(directory) / SETTINGS_FILE
    if settings.exists():
        try:
            json.loads(settings.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            return f"{settings} is unreadable: {e}"
    return None


def _step_directories(output_dir: str | os.PathLike) -> list[Path]:
    """Every ``checkpoints/step_<n>`` directory, complete or not, oldest first."""
    root = Path(output_dir) / "checkpoints"
    found = [p for p in root.glob("step_*") if re.fullmatch(r"step_\d+", p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (see :func:`checkpoint_problem`), oldest first."""
    return [p for p in _step_directories(output_dir) if checkpoint_problem(p) is None]


def _discard(directory: Path) -> None:
    """Remove a checkpoint directory: renamed first (atomic: it stops being a checkpoint at
    once), then deleted."""
    trash = directory.with_name(f".deleting-{directory.name}-{os.getpid()}")
    os.replace(directory, trash)
    _fsync_dir(directory.parent)
    _fault_point("checkpoint-prune")
    shutil.rmtree(trash, ignore_errors=True)


def _sync_files(directory: Path) -> dict[str, int]:
    """fsync every file under ``directory``; their sizes by relative path."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        files[path.relative_to(directory).as_posix()] = path.stat().st_size
    for sub in {p.parent for p in directory.rglob("*")} | {directory}:
        _fsync_dir(sub)
    return files


def run_settings(cfg: RecipeConfig, accelerator) -> dict[str, Any]:
    """The settings that define what a run trains: every setting except
    :data:`RESUME_FREE_SETTINGS`, plus the precision, engine and number of processes."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in RESUME_FREE_SETTINGS}
    settings["optimizer"] = _normal_name(cfg.optimizer)
    if cfg.betas is not None:
        settings["betas"] = [float(b) for b in cfg.betas]
    settings["mixed_precision"] = str(accelerator.mixed_precision)
    settings["engine"] = _engine(accelerator)
    settings["num_processes"] = accelerator.num_processes
    return json.loads(json.dumps(settings, default=str))


def settings_changes(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{setting: {"saved": ..., "now": ...}}`` for each setting that differs.

    A setting the checkpoint did not record (added to the recipe later) counts as changed only
    when it is not at its default.
    """
    defaults = json.loads(json.dumps(asdict(RecipeConfig()), default=str))
    changes = {}
    for key in sorted(now):
        before = saved.get(key, defaults.get(key, now[key]))
        if before != now[key]:
            changes[key] = {"saved": before, "now": now[key]}
    return changes


def _describe_changes(changes: dict[str, dict[str, Any]], saved: dict[str, Any],
                      now: dict[str, Any]) -> str:
    lines = [f"  {k}: saved {v['saved']!r}, now {v['now']!r}" for k, v in changes.items()]
    batch_keys = ("batch_size", "gradient_accumulation_steps", "num_processes")
    if set(changes) & set(batch_keys) and all(k in saved for k in batch_keys):
        before, after = (math.prod(int(d[k]) for k in batch_keys) for d in (saved, now))
        lines.append(f"  (global batch: saved {before} sequences per step, now {after})")
    return "\n".join(lines)


def check_resume_settings(directory: Path, cfg: RecipeConfig,
                          accelerator) -> dict[str, dict[str, Any]]:
    """Compare this run's settings with those ``directory`` was saved with, before anything is
    loaded.

    Returns
    -------
    dict
        The differences (empty when none), allowed by ``allow_config_change``.

    Raises
    ------
    CheckpointError
        Settings differ (each listed, saved vs now) and ``allow_config_change`` is false.
    """
    now = run_settings(cfg, accelerator)
    path = Path(directory) / SETTINGS_FILE
    if not path.exists():
        if cfg.allow_config_change:
            return {"(all)": {"saved": f"{path} missing", "now": "not checked"}}
        raise CheckpointError(
            f"{path} is missing (a checkpoint of an older recipe version): its settings cannot be "
            "checked against this run's. Pass --allow-config-change true to resume anyway.")
    data = json.loads(path.read_text(encoding="utf-8"))
    saved = data.get("settings") if isinstance(data, dict) else None
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path} is unreadable: expected an object with 'settings'")
    changes = settings_changes(saved, now)
    if changes and not cfg.allow_config_change:
        raise CheckpointError(
            f"resume_from: {directory} was saved with other settings than this run's:\n"
            f"{_describe_changes(changes, saved, now)}\n"
            "Resume with the saved settings, or pass --allow-config-change true to continue "
            "with the new ones (the differences are then logged to metrics.jsonl and "
            "summary.json).")
    if changes and accelerator.is_main_process:
        print(f"[pretrain] warning: resuming {directory} with changed settings "
              f"(--allow-config-change true):\n{_describe_changes(changes, saved, now)}",
              file=sys.stderr, flush=True)
    return changes


# -- resume state the recipe saves itself (JSON; nothing of it is unpickled) -----------------
def rng_state(accelerator) -> dict[str, Any]:
    """This process's random generators as JSON-ready data: python ``random``, numpy's global
    generator, torch's CPU generator, every CUDA device's (when CUDA is available), and
    accelerate's micro-step counter (which accelerate used to keep with its RNG file)."""
    import numpy as np

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002 - the global one

    def encode(t: torch.Tensor) -> str:
        return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")

    return {
        "python": [version, list(internal), gauss],
        "numpy": [str(name), [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
        "torch": encode(torch.get_rng_state()),
        "cuda": ([encode(t) for t in torch.cuda.get_rng_state_all()]
                 if torch.cuda.is_available() else []),
        "accelerate_step": int(accelerator.step),
    }


def _decode_rng(data: Any) -> dict[str, Any]:
    """:func:`rng_state`'s data as generator states, each checked on a scratch generator (the
    global ones are untouched).

    Raises
    ------
    ValueError
        Missing keys, wrong types or sizes; the message says which.
    """
    import numpy as np

    if not isinstance(data, dict):
        raise ValueError("expected a JSON object")
    missing = sorted({"python", "numpy", "torch", "cuda", "accelerate_step"} - set(data))
    if missing:
        raise ValueError(f"no {', '.join(missing)}")
    try:
        version, internal, gauss = data["python"]
        python = (int(version), tuple(int(x) for x in internal),
                  None if gauss is None else float(gauss))
        random.Random().setstate(python)
        name, keys, pos, has_gauss, cached = data["numpy"]
        numpy_state = (str(name), np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss),
                       float(cached))
        np.random.RandomState().set_state(numpy_state)

        def decode(text: str) -> torch.Tensor:
            return torch.frombuffer(bytearray(base64.b64decode(text, validate=True)),
                                    dtype=torch.uint8).clone()

        cpu = decode(data["torch"])
        torch.Generator().set_state(cpu)
        cuda = [decode(t) for t in data["cuda"]]
        step = int(data["accelerate_step"])
    except (TypeError, ValueError, RuntimeError, OverflowError, IndexError, KeyError) as e:
        raise ValueError(f"not a valid generator state ({str(e).splitlines()[0][:200]})"
                         ) from None
    if torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            raise ValueError(f"{len(cuda)} CUDA generator states for "
                             f"{torch.cuda.device_count()} devices")
        sizes = [t.numel() for t in torch.cuda.get_rng_state_all()]
        if [t.numel() for t in cuda] != sizes:
            raise ValueError("CUDA generator states of the wrong size")
    return {"python": python, "numpy": numpy_state, "cpu": cpu, "cuda": cuda, "step": step}


@dataclass
class ResumeParts:
    """What :func:`verify_checkpoint` read from a checkpoint for this process, before anything
    was loaded: the scheduler's state, this process's generator states (``None`` when they
    could not be read and ``allow_inexact_resume`` accepted that), and what was accepted."""

    scheduler: dict[str, Any]
    rng: dict[str, Any] | None
    inexact: list[str]


def verify_checkpoint(directory: Path, cfg: RecipeConfig, accelerator) -> ResumeParts:
    """Check every file of ``directory`` before accelerate or an engine loads any of it.

    * Pickle-based files (``optimizer.bin``, DeepSpeed's ``*_states.pt``, FSDP2's ``.metadata``
      and non-tensor items) must load with ``torch.load(weights_only=True)`` or a restricted
      unpickler (:mod:`lowrank_optim.safe_load`); ``model.safetensors`` must read as
      safetensors, the JSON files as JSON.
    * ``custom_checkpoint_<i>.pkl`` / ``random_states_<i>.pkl`` (accelerate's pickles, written
      by recipe versions before issue 19) are refused: the recipe never lets accelerate read
      them.
    * ``scheduler.json`` and every process's ``rng_state_<i>.json`` are read and checked here.
      An RNG file that is missing or unreadable fails the resume too, unless
      ``allow_inexact_resume``: then the run continues with this run's seeded generators, is no
      longer bit-exact, and says so (console, ``metrics.jsonl``, ``summary.json``).

    Every process checks every file, so all reach the same decision.

    Raises
    ------
    CheckpointError
        A file is missing, truncated, unreadable or refused as unsafe; the message names the
        file and the reason.
    """
    directory = Path(directory)
    for path in sorted(directory.rglob("*.pkl")):
        if ACCELERATE_PICKLES.fullmatch(path.name):
            raise CheckpointError(
                f"{path}: refused: accelerate would unpickle this file (custom_checkpoint_*.pkl "
                "with weights_only=False), or drop it silently when unreadable "
                "(random_states_*.pkl); this recipe saves the scheduler and the RNG states as "
                f"{SCHEDULER_FILE} and {RNG_FILE.format('<i>')} instead, so the checkpoint was "
                "written by an older recipe version or the file was planted")
    engine_files = {"deepspeed": safe_load.DEEPSPEED_GLOBALS}.get(
        _engine(accelerator).partition("-")[0], ())
    try:
        safe_load.check_directory(directory, torch_globals=engine_files, skip={
            p.name for p in directory.glob(RNG_FILE.format("*"))})  # read below, allowance
    except safe_load.UnsafeFileError as e:
        raise CheckpointError(f"cannot resume from {directory}: {e}") from None
    path = directory / SCHEDULER_FILE
    scheduler = read_checkpoint_json(path, "the learning-rate schedule cannot be restored")
    if not isinstance(scheduler, dict) or not isinstance(scheduler.get("last_epoch"), int):
        raise CheckpointError(f"{path} is unreadable: expected a scheduler state_dict with "
                              "'last_epoch'")
    inexact, mine = [], None
    for rank in range(accelerator.num_processes):
        path = directory / RNG_FILE.format(rank)
        try:
            rng = _decode_rng(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            inexact.append(f"{path} is missing: process {rank}'s random generators cannot be "
                           "restored")
            continue
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as e:
            inexact.append(f"{path} is unreadable ({e}): process {rank}'s random generators "
                           "cannot be restored")
            continue
        if rank == accelerator.process_index:
            mine = rng
    if inexact and not cfg.allow_inexact_resume:
        raise CheckpointError(
            f"cannot resume exactly from {directory}:\n  " + "\n  ".join(inexact) + "\n"
            "Pass --allow-inexact-resume true to continue with freshly seeded generators (the "
            "run is then no longer bit-exact; logged to metrics.jsonl and summary.json).")
    if inexact and accelerator.is_main_process:
        print(f"[pretrain] warning: inexact resume from {directory} (--allow-inexact-resume "
              "true), the run is no longer bit-exact:\n  " + "\n  ".join(inexact),
              file=sys.stderr, flush=True)
    return ResumeParts(scheduler, mine, inexact)


def restore_parts(parts: ResumeParts, scheduler: Any, accelerator) -> None:
    """Load what :func:`verify_checkpoint` read: the scheduler's state and this process's
    generators (after ``accelerator.load_state``, where accelerate restored them before)."""
    import numpy as np

    scheduler.load_state_dict(parts.scheduler)
    if parts.rng is None:
        return
    random.setstate(parts.rng["python"])
    np.random.set_state(parts.rng["numpy"])  # noqa: NPY002 - the global generator
    torch.set_rng_state(parts.rng["cpu"])
    if parts.rng["cuda"]:
        torch.cuda.set_rng_state_all(parts.rng["cuda"])
    accelerator.step = parts.rng["step"]


def _save_parts(directory: Path, scheduler: Any, accelerator) -> None:
    """Each process: its generators as ``rng_state_<i>.json`` (accelerate's pickle of them is
    removed); the main process: ``scheduler.json``.

    Plain writes, like accelerate's files: they are fsynced with the others before
    ``train_state.json``, which marks the checkpoint complete, is written.
    """
    (directory / f"random_states_{accelerator.process_index}.pkl").unlink(missing_ok=True)
    (directory / RNG_FILE.format(accelerator.process_index)).write_text(
        json.dumps(rng_state(accelerator)), encoding="utf-8")
    if accelerator.is_main_process:
        (directory / SCHEDULER_FILE).write_text(json.dumps(scheduler.state_dict()),
                                                encoding="utf-8")


def save_checkpoint(accelerator, state: TrainState, cfg: RecipeConfig,
                    scheduler: Any) -> Path:
    """``accelerator.save_state`` (model as safetensors, optimizer) plus, written by the recipe
    as JSON, the scheduler, the RNG states of every process, the settings and the data
    position; older checkpoints beyond ``keep_checkpoints`` are removed.

    Crash safety: the files are fsynced, the settings and then ``train_state.json`` (the
    completion marker, listing every file and its size) are written atomically, and a
    checkpoint is removed by renaming it first; a kill at any moment leaves complete
    checkpoints and at most one incomplete one, which ``--resume-from latest`` skips.
    """
    root = Path(cfg.output_dir) / "checkpoints"
    directory = root / f"step_{state.step}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if directory.exists():  # an interrupted save of this step: start afresh
            _discard(directory)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(directory))
    _save_parts(directory, scheduler, accelerator)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _fault_point("checkpoint-state")
        state.files = _sync_files(directory)
        atomic_write(directory / SETTINGS_FILE, json.dumps(
            {"settings": run_settings(cfg, accelerator), "config": _flat_config(cfg)}, indent=1))
        state.save(directory)  # written last: marks the checkpoint complete
        _prune(cfg, state.step)
    accelerator.wait_for_everyone()
    return directory


def _prune(cfg: RecipeConfig, step: int) -> None:
    """Keep the newest ``keep_checkpoints`` complete checkpoints; remove the older ones, and
    interrupted saves before ``step``, and finish interrupted deletions."""
    complete = checkpoints(cfg.output_dir)
    for old in complete[:-cfg.keep_checkpoints]:
        _discard(old)
    for path in _step_directories(cfg.output_dir):  # interrupted saves of earlier steps
        if path not in complete and int(path.name.split("_")[1]) < step:
            _discard(path)
    _finish_deletions(cfg.output_dir)


def _finish_deletions(output_dir: str | os.PathLike) -> None:
    """Delete what :func:`_discard` renamed but was killed before deleting."""
    for trash in (Path(output_dir) / "checkpoints").glob(".deleting-step_*"):
        shutil.rmtree(trash, ignore_errors=True)


def resume_directory(cfg: RecipeConfig, verbose: bool = True) -> Path | None:
    """The checkpoint to resume from: ``None`` (``resume_from`` unset, or ``latest`` with no
    complete checkpoint yet), the newest complete one for ``latest``, or the given directory.

    ``latest`` skips incomplete or unreadable checkpoints with a warning (when ``verbose``) and
    falls back to the previous complete one.

    Raises
    ------
    CheckpointError
        An explicit directory that is not a complete, readable checkpoint (the message names
        the file and the reason).
    """
    if cfg.resume_from in (None, ""):
        return None
    if cfg.resume_from == "latest":
        for path in reversed(_step_directories(cfg.output_dir)):
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            if verbose:
                warnings.warn(f"resume_from=latest: skipping {path}: {problem}", RuntimeWarning,
                              stacklevel=2)
        return None
    path = Path(cfg.resume_from)
    if not path.is_dir():
        raise CheckpointError(f"resume_from={cfg.resume_from!r}: no such checkpoint directory")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"resume_from={cfg.resume_from!r} cannot be resumed: {problem}")
    return path


def _set_aside_later_checkpoints(output_dir: str | os.PathLike, step: int) -> None:
    """Checkpoints after ``step`` belong to a run this one replaces (started afresh, or resumed
    from an earlier checkpoint); renamed ``superseded_step_<n>`` so that ``latest`` cannot pick
    them, with a warning.  Incomplete ones are removed."""
    for path in _step_directories(output_dir):
        if int(path.name.split("_")[1]) <= step:
            continue
        if checkpoint_problem(path) is not None:
            _discard(path)
            continue
        target, n = path.with_name(f"superseded_{path.name}"), 1
        while target.exists():
            target, n = path.with_name(f"superseded_{path.name}.{n}"), n + 1
        os.replace(path, target)
        _fsync_dir(path.parent)
        warnings.warn(f"{path} is later than the step this run starts from ({step}): moved to "
                      f"{target} so that --resume-from latest cannot pick it", RuntimeWarning,
                      stacklevel=2)


class Metrics:
    """Console lines, accelerate trackers and ``metrics.jsonl`` (main process only).

    Each line is appended with one write and an fsync (:func:`append_line`); ``lines`` counts
    the lines in the file, recorded with each checkpoint so that a resume keeps exactly the
    lines written before it.
    """

    def __init__(self, accelerator, cfg: RecipeConfig, progress, lines: int = 0) -> None:
        self.accelerator, self.cfg, self.progress = accelerator, cfg, progress
        self.path = Path(cfg.output_dir) / "metrics.jsonl"
        self.console = "console" in cfg.report_to or "all" in cfg.report_to
        self.lines = lines

    @staticmethod
    def truncate(path: Path, step: int, lines: int | None = None) -> int:
        """Keep the first ``lines`` lines (all when ``None``) whose step is at most ``step``
        (a resumed run rewrites what follows); returns how many were kept.

        A partial or unreadable line (a kill mid-write) is dropped with a warning.  The file is
        replaced atomically (:func:`atomic_write`), and only when something is dropped: a kill
        at any moment leaves the old history or the new one.
        """
        if not path.exists():
            return 0
        text = path.read_text(encoding="utf-8", errors="replace")
        raw = text.split("\n")
        tail = raw.pop()  # "" when the file ends with a newline
        if tail:
            warnings.warn(f"{path}: dropping a partial last line (a write was interrupted): "
                          f"{tail[:80]!r}", RuntimeWarning, stacklevel=2)
        kept = []
        for number, line in enumerate(raw, 1):
            try:
                record = json.loads(line)
                line_step = int(record["step"])
            except (ValueError, KeyError, TypeError):
                warnings.warn(f"{path}:{number}: dropping an unreadable line: {line[:80]!r}",
                              RuntimeWarning, stacklevel=2)
                continue
            if line_step <= step and (lines is None or len(kept) < lines):
                kept.append(line)
        if len(kept) != len(raw) or tail:
            atomic_write(path, "".join(x + "\n" for x in kept))
        return len(kept)

    def log(self, values: dict[str, Any], step: int) -> None:
        """One line of ``values`` at ``step``: trackers, ``metrics.jsonl`` and the console."""
        self.accelerator.log(values, step=step)
        if not self.accelerator.is_main_process:
            return
        append_line(self.path, json.dumps({"step": step, **values}))
        self.lines += 1
        if self.console:
            text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in values.items())
            (self.progress.write if self.progress is not None else print)(f"step {step}: {text}")


def _engine(accelerator) -> str:
    """``single``, ``ddp``, ``fsdp`` or ``deepspeed-zero<stage>``."""
    kind = str(accelerator.distributed_type).split(".")[-1].lower()
    if kind == "deepspeed":
        return f"deepspeed-zero{_zero_stage(accelerator)}"
    return {"no": "single", "multi_cpu": "ddp", "multi_gpu": "ddp"}.get(kind, kind)


def _zero_stage(accelerator) -> int:
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


# -- the run ------------------------------------------------------------------------------------
def train(cfg: RecipeConfig) -> dict[str, Any]:
    """Run the recipe; returns the summary (also written to ``summary.json``)."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    accelerator = make_accelerator(cfg)
    set_seed(cfg.seed)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    resume = resume_directory(cfg, verbose=accelerator.is_main_process)
    config_changes: dict[str, dict[str, Any]] = {}
    parts = None
    if resume is not None:  # refuse a mismatch or an unsafe file before anything is loaded
        config_changes = check_resume_settings(resume, cfg, accelerator)
        parts = verify_checkpoint(resume, cfg, accelerator)
        resumed_step = TrainState.load(resume).step
        if cfg.stop_after is not None and cfg.stop_after <= resumed_step:
            raise _bad("stop_after", cfg.stop_after, f"not after step {resumed_step} of {resume}"
                       ", so nothing would run; raise it or drop it")
    with accelerator.main_process_first():  # rank 0 builds the caches, the others read them
        data = load_data(cfg)
    model = build_model(cfg, data.vocab_size)
    model, optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer)
    ds_plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if ds_plugin is not None:  # no prepared dataloader to fill DeepSpeed's "auto" batch size
        ds_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
        ds_plugin.deepspeed_config["gradient_clipping"] = cfg.max_grad_norm
        # ZeRO 1-3 would flatten the low-rank optimizers' matrices: say so before DeepSpeed runs
        distributed.check_zero_stage(optimizer, _zero_stage(accelerator))
    # The scheduler is stepped here once per optimizer step (accelerate's prepared scheduler
    # would step num_processes times) and checkpointed by the recipe as JSON: registered with
    # accelerate, it would be unpickled with weights_only=False at resume.
    model, prepared_optimizer = accelerator.prepare(model, optimizer)
    if accelerator.is_main_process and set(cfg.report_to) & {"tensorboard", "wandb", "all"}:
        accelerator.init_trackers(cfg.project, config=_flat_config(cfg),
                                  init_kwargs={"wandb": {"name": cfg.run_name}}
                                  if cfg.run_name else {})
    if accelerator.is_main_process:
        print(f"[pretrain] {cfg.model} / {cfg.optimizer} / {_engine(accelerator)} x "
              f"{accelerator.num_processes} / precision {accelerator.mixed_precision} / "
              f"{data.description}", flush=True)

    state = TrainState()
    if resume is not None:
        state = TrainState.load(resume)
        accelerator.load_state(str(resume))  # every file verified by verify_checkpoint
        restore_parts(parts, scheduler, accelerator)
        accelerator.print(f"[pretrain] resumed from {resume} at step {state.step}"
                          + (" (inexact: random generators not restored)" if parts.inexact
                             else ""))
    kept_lines = 0
    if accelerator.is_main_process:  # history up to the checkpoint; later checkpoints set aside
        _remove_stale_temporaries(Path(cfg.output_dir))
        kept_lines = Metrics.truncate(Path(cfg.output_dir) / "metrics.jsonl", state.step,
                                      state.metrics_lines)
        _set_aside_later_checkpoints(cfg.output_dir, state.step)
        _prune(cfg, state.step)  # what a kill during the last save left to do

    world, rank = accelerator.num_processes, accelerator.process_index
    micro, accum = cfg.batch_size, cfg.gradient_accumulation_steps
    global_batch = micro * world * accum
    stop = min(cfg.max_steps, cfg.stop_after or cfg.max_steps)
    progress = tqdm(total=cfg.max_steps, initial=state.step, desc=cfg.optimizer,
                    disable=not (cfg.progress and accelerator.is_local_main_process))
    metrics = Metrics(accelerator, cfg, progress if cfg.progress else None, lines=kept_lines)
    if config_changes and accelerator.is_main_process:
        append_line(metrics.path, json.dumps({"step": state.step, "resumed_from": str(resume),
                                              "config_changes": config_changes}))
        metrics.lines += 1
    inexact = parts.inexact if parts is not None else []
    if inexact and accelerator.is_main_process:
        append_line(metrics.path, json.dumps({"step": state.step, "resumed_from": str(resume),
                                              "inexact_resume": inexact}))
        metrics.lines += 1
    params = [p for p in model.parameters() if p.requires_grad]
    loss_sum, since_log = torch.zeros((), device=accelerator.device), 0
    if state.loss_sums is not None and state.since_log:  # the log interval the checkpoint cut
        if len(state.loss_sums) == world:
            loss_sum += state.loss_sums[rank]
            since_log = state.since_log
        else:
            accelerator.print(f"[pretrain] warning: {state.since_log} step(s) of train loss "
                              f"since the last log line were saved by {len(state.loss_sums)} "
                              f"processes, not {world}: the next loss line leaves them out")
    first_loss = last_loss = None
    train_seconds, tokens_this_run, start_step = 0.0, 0, state.step
    val_loss = None

    def validate() -> float:
        loss = evaluate(model, data.val, cfg, accelerator)
        metrics.log({"val_loss": loss, "val_ppl": perplexity(loss),
                     "state_bytes": state_bytes(optimizer).total}, state.step)
        return loss

    model.train()
    while state.step < stop:
        t0 = time.perf_counter()
        for k in range(accum):
            start = state.samples + (k * world + rank) * micro
            ids = data.train.samples(start, micro).to(accelerator.device)
            with accelerator.accumulate(model):
                loss = model(input_ids=ids, labels=ids).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                prepared_optimizer.step()
                prepared_optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach().float() / accum
        scheduler.step()
        state.step += 1
        state.samples += global_batch
        state.tokens += global_batch * cfg.seq_len
        tokens_this_run += global_batch * cfg.seq_len
        since_log += 1
        train_seconds += time.perf_counter() - t0
        progress.update(1)

        # not at stop_after: its checkpoint carries the interval on, as an uninterrupted run
        if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:
            mean_loss = accelerator.reduce(loss_sum, "mean").item() / since_log
            loss_sum.zero_()
            since_log = 0
            first_loss = mean_loss if first_loss is None else first_loss
            last_loss = mean_loss
            metrics.log({"loss": mean_loss, "lr": scheduler.get_last_lr()[0],
                         "tokens_per_s": tokens_this_run / max(train_seconds, 1e-9),
                         "tokens": state.tokens}, state.step)
        if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < cfg.max_steps:
            val_loss = validate()
        if cfg.check_sync_every and state.step % cfg.check_sync_every == 0 and _engine(
                accelerator) in ("ddp", "deepspeed-zero0"):  # replicated parameters
            distributed.check_in_sync(model, optimizer)
        if cfg.save_every and state.step % cfg.save_every == 0 or state.step == cfg.stop_after:
            state.metrics_lines, state.since_log = metrics.lines, since_log
            state.loss_sums = accelerator.gather(loss_sum.reshape(1)).tolist()
            save_checkpoint(accelerator, state, cfg, scheduler)
    progress.close()

    finished = state.step >= cfg.max_steps
    if finished:
        val_loss = validate()
    sb = state_bytes(optimizer)
    summary = {
        "optimizer": cfg.optimizer, "model": cfg.model, "engine": _engine(accelerator),
        "num_processes": world, "step": state.step, "finished": finished,
        "first_loss": first_loss, "last_loss": last_loss, "val_loss": val_loss,
        "val_ppl": perplexity(val_loss) if val_loss is not None else None,
        "state_bytes": sb.total, "state_bytes_per_param": sb.bytes_per_param,
        "tokens_per_s": tokens_this_run / max(train_seconds, 1e-9),
        "train_steps_this_run": state.step - start_step, "data": data.description,
        "resumed_from": None if resume is None else str(resume),
        "config_changes": config_changes, "inexact_resume": inexact,
    }
    if cfg.save_final_model and finished:
        accelerator.save_model(model, str(Path(cfg.output_dir) / "final"))
    if accelerator.is_main_process:
        atomic_write(Path(cfg.output_dir) / "summary.json", json.dumps(summary, indent=1))
        print(f"[pretrain] {summary_line(summary)}", flush=True)
    per_rank = {
        "rank": rank, "step": state.step, "last_loss": last_loss, "val_loss": val_loss,
        "param_digest": distributed.digest(model.parameters()),
        "subspace_digest": distributed.digest(distributed.subspace_tensors(optimizer)),
    }
    accelerator.wait_for_everyone()
    accelerator.end_training()
    atomic_write(Path(cfg.output_dir) / f"rank{rank}.json", json.dumps(per_rank))
    return summary


def _flat_config(cfg: RecipeConfig) -> dict[str, Any]:
    return {k: (v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v))
            for k, v in asdict(cfg).items()}


TABLE_COLUMNS = ("optimizer", "val loss", "val ppl", "state bytes", "B/param", "tokens/s")


def summary_line(s: dict[str, Any]) -> str:
    """One row of the final table."""
    val = "-" if s["val_loss"] is None else f"{s['val_loss']:.4f}"
    ppl = "-" if s["val_ppl"] is None else f"{s['val_ppl']:.2f}"
    return (f"{s['optimizer']:<18}{val:>9}{ppl:>10}{s['state_bytes']:>13,}"
            f"{s['state_bytes_per_param']:>9.2f}{s['tokens_per_s']:>10,.0f}")


def format_table(summaries: list[dict[str, Any]]) -> str:
    """The final table: optimizer, validation loss / perplexity, state bytes, tokens/s."""
    head = (f"{TABLE_COLUMNS[0]:<18}{TABLE_COLUMNS[1]:>9}{TABLE_COLUMNS[2]:>10}"
            f"{TABLE_COLUMNS[3]:>13}{TABLE_COLUMNS[4]:>9}{TABLE_COLUMNS[5]:>10}")
    return "\n".join([head, "-" * len(head), *map(summary_line, summaries)])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run the recipe; returns the summary."""
    return train(parse_args(argv))


def cli(argv: list[str] | None = None) -> int:
    """The command line: :func:`main`, with a :class:`RecipeError` (a bad setting or
    checkpoint) printed as ``pretrain.py: error: ...`` and exit status 2, as argparse does."""
    try:
        main(argv)
    except RecipeError as e:
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr, flush=True)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
