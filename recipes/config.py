"""The recipe's settings: :class:`RecipeConfig`, the config file and the command line.

Settings come from the dataclass :class:`RecipeConfig` (defaults), then the YAML/JSON file
given with ``--config``, then that file's ``optimizer_overrides[<optimizer>]`` block, then
command-line flags (``--max-steps 100``; dicts and lists as JSON or space-separated values).
Every value is converted to its field's type and checked (:func:`validate_config`) before
anything runs; a bad one raises :class:`RecipeError` naming the setting, its flag and the fix.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import glob
import importlib.util
import json
import math
import os
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lowrank_optim as lo
from lowrank_optim.model_configs import model_name, model_names_help

#: optimizer names the recipe adds to ``lowrank_optim.available()``
RECIPE_BASELINES = ("lora",)


class RecipeError(ValueError):
    """A setting, flag or checkpoint the recipe cannot use; the command line prints the message
    and exits with status 2 (no traceback)."""


@dataclass
class RecipeConfig:
    """Every setting of the recipe (YAML keys and ``--flag-name`` flags are these names)."""

    # model
    model: str = "tiny"  # one of lowrank_optim.model_configs.LLAMA_SHAPES (or llama_7b, ...)
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
    #: DDP: split the optimizer state across ranks by whole parameters (torch's
    #: ZeroRedundancyOptimizer; lowrank_optim.create_optimizer(..., zero1=True))
    zero1: bool = False
    #: {}: refresh every update_proj_gap steps; else a lowrank_optim.schedules spec, e.g.
    #: {"kind": "adaptive", "gap": 50, "max_gap": 400}, timing each layer's refreshes
    refresh_schedule: dict = field(default_factory=dict)
    optimizer_overrides: dict = field(default_factory=dict)  # {name: {field: value}}
    # data
    data: list = field(default_factory=list)  # local text files (globs); empty: stdlib docs
    hf_dataset: str | None = None  # e.g. allenai/c4 (needs `datasets`: the `data` extra; online)
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
    #: None: a directory of the run's own, <runs_dir>/<optimizer>-<YYYYmmdd-HHMMSS>; set: exactly
    #: that directory (a run there replaces what a previous run wrote)
    output_dir: str | None = None
    runs_dir: str = "runs"  # where runs without an output_dir get their directories
    save_every: int = 0  # 0: no periodic checkpoint
    keep_checkpoints: int = 2
    resume_from: str | None = None  # a checkpoint directory, or "latest" (the newest run's)
    allow_config_change: bool = False  # resume although structural settings differ (logged)
    allow_inexact_resume: bool = False  # resume although RNG states are missing/unreadable
    stop_after: int | None = None  # stop (with a checkpoint) after this step: an interruption
    save_final_model: bool = False
    check_sync_every: int = 0  # DDP: check every N steps that ranks hold identical replicas
    progress: bool = True
    seed: int = 0


# -- names and messages -----------------------------------------------------------------------
def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(RecipeConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(RecipeConfig)}


def flag(name: str) -> str:
    """The command-line flag of setting ``name`` (``max_steps`` -> ``--max-steps``)."""
    return "--" + name.replace("_", "-")


def bad_setting(name: str, value: Any, problem: str) -> RecipeError:
    """The error for setting ``name``: its value, what is wrong, and the flag that sets it."""
    return RecipeError(f"{name}={value!r}: {problem} (set with {flag(name)} or `{name}:` in "
                       "the config file)")


def normal_name(name: Any) -> str:
    """An optimizer name as the registry spells it (``GaLore-AdamW`` -> ``galore_adamw``)."""
    return str(name).lower().replace("-", "_")


def optimizer_names() -> list[str]:
    """Every optimizer the recipe can run: the library's, plus the LoRA baseline."""
    return sorted({*lo.available(), *RECIPE_BASELINES})


def flat_config(cfg: RecipeConfig) -> dict[str, Any]:
    """The settings with dicts and lists as JSON strings (for trackers and checkpoints)."""
    return {k: (v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v))
            for k, v in asdict(cfg).items()}


# -- converting values ------------------------------------------------------------------------
def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise bad_setting(name, value, "expected true or false")
        return value.lower() in ("true", "1", "yes")
    if not isinstance(value, (bool, int)) or value not in (0, 1):
        raise bad_setting(name, value, "expected true or false")
    return bool(value)


def _as_number(name: str, value: Any, base: type) -> int | float:
    expected = "an integer" if base is int else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise bad_setting(name, value, f"expected {expected}")
    try:
        number = float(value)
    except ValueError:
        raise bad_setting(name, value, f"expected {expected}") from None
    if base is float:
        return number
    if not math.isfinite(number) or int(number) != number:
        raise bad_setting(name, value, "expected an integer")
    return int(number)


def _parse_json(name: str, value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise bad_setting(name, value, f"not valid JSON ({e})") from None


def _as_container(name: str, value: Any, base: type) -> dict | list:
    if isinstance(value, str):
        value = _parse_json(name, value) if value[:1] in "[{" else [value]
    if isinstance(value, (list, tuple)) and base is list:
        return list(value)
    if not isinstance(value, base):
        raise bad_setting(name, value, f"expected a {base.__name__}")
    return value


def _as_string(name: str, value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # YAML reads `run_name: 1` as a number
    if not isinstance(value, str):
        raise bad_setting(name, value, "expected a string")
    return value


def coerce(name: str, value: Any) -> Any:
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
        raise bad_setting(name, value, "cannot be null")
    if base is bool:
        return _as_bool(name, value)
    if base in (int, float):
        return _as_number(name, value, base)
    if base in (dict, list):
        return _as_container(name, value, base)
    if base is Any and isinstance(value, str) and value[:1] == "[":
        return _parse_json(name, value)
    if base is str:
        return _as_string(name, value)
    return value


# -- the config file and the merge ------------------------------------------------------------
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
        hints = {u: difflib.get_close_matches(str(u), known, 1) for u in unknown}
        hint = "; ".join(f"{u!r}: did you mean {m[0]!r}?" for u, m in hints.items() if m)
        raise RecipeError(f"{where}: unknown settings {unknown}{'; ' + hint if hint else ''}; "
                          f"valid ones: {sorted(known)}")


def _optimizer_block(merged: dict[str, Any]) -> dict[str, Any]:
    """The ``optimizer_overrides`` block of the chosen optimizer (every block checked)."""
    name = str(merged.get("optimizer", RecipeConfig.optimizer))
    overrides = coerce("optimizer_overrides", merged.get("optimizer_overrides", {}))
    for block, block_settings in overrides.items():  # a typo in any block fails now, not later
        if normal_name(block) not in optimizer_names():
            raise bad_setting("optimizer_overrides", block,
                              f"not an optimizer; blocks are named after {optimizer_names()}")
        _check_keys(block_settings, f"optimizer_overrides[{block!r}]")
    return next((v for k, v in overrides.items()
                 if normal_name(k) == normal_name(name)), {}) or {}


def make_config(file_settings: dict[str, Any], cli_settings: dict[str, Any]) -> RecipeConfig:
    """Defaults < file < file's ``optimizer_overrides[optimizer]`` < command line.

    Raises
    ------
    RecipeError
        An unknown key, a value of the wrong type, or settings :func:`validate_config` rejects.
    """
    _check_keys(file_settings, "config file")
    _check_keys(cli_settings, "command line")
    per_optimizer = _optimizer_block({**file_settings, **cli_settings})
    settings = {**file_settings, **per_optimizer, **cli_settings}
    cfg = RecipeConfig(**{k: coerce(k, v) for k, v in settings.items()})
    validate_config(cfg)
    cfg.model = model_name(cfg.model)  # one spelling: "llama_7b" and "7B" train "7b"
    return cfg


# -- validation -------------------------------------------------------------------------------
#: optimizer_kwargs keys that have their own setting (the setting would silently win, or lose)
OWN_SETTINGS = ("lr", "weight_decay", "betas", "rank", "update_proj_gap", "scale", "proj_type",
                "target_modules")


def _check_counts(cfg: RecipeConfig) -> None:
    """Integers: counts >= 1, intervals >= 0 (0: off), optional ones >= 1 or null."""
    for key in ("batch_size", "gradient_accumulation_steps", "max_steps", "seq_len", "log_every",
                "eval_samples", "rank", "keep_checkpoints", "vocab_size"):
        if getattr(cfg, key) < 1:
            raise bad_setting(key, getattr(cfg, key), "must be >= 1")
    for key in ("eval_every", "save_every", "check_sync_every", "seed"):
        if getattr(cfg, key) < 0:
            raise bad_setting(key, getattr(cfg, key), "must be >= 0 (0: off)" if key != "seed"
                              else "must be >= 0")
    for key in ("update_proj_gap", "stop_after", "corpus_max_chars"):
        if getattr(cfg, key) is not None and getattr(cfg, key) < 1:
            raise bad_setting(key, getattr(cfg, key), "must be >= 1, or null for the default")
    if cfg.stop_after is not None and cfg.stop_after > cfg.max_steps:
        raise bad_setting("stop_after", cfg.stop_after, f"beyond max_steps={cfg.max_steps}, so "
                          "it would never interrupt the run; lower it or drop it")


def _check_numbers(cfg: RecipeConfig) -> None:
    """Rates, ratios and the optimizer's betas."""
    for key, text in (("lr", "must be > 0"), ("lora_alpha", "must be > 0"),
                      ("scale", "must be > 0, or null for the default")):
        value = getattr(cfg, key)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise bad_setting(key, value, text)
    for key, text in (("weight_decay", "must be >= 0"),
                      ("max_grad_norm", "must be >= 0 (0: no clipping)")):
        if not (math.isfinite(getattr(cfg, key)) and getattr(cfg, key) >= 0):
            raise bad_setting(key, getattr(cfg, key), text)
    if not 0.0 <= cfg.warmup_ratio < 1.0:
        raise bad_setting("warmup_ratio", cfg.warmup_ratio, "must be in [0, 1)")
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise bad_setting("min_lr_ratio", cfg.min_lr_ratio, "must be in [0, 1]")
    if not 0.0 < cfg.val_fraction < 1.0:
        raise bad_setting("val_fraction", cfg.val_fraction, "must be in (0, 1)")
    if cfg.betas is not None:
        _check_betas(cfg.betas)


def _check_betas(betas: list) -> None:
    try:
        values = [float(b) for b in betas]
    except (TypeError, ValueError):
        raise bad_setting("betas", betas, "expected two numbers, e.g. --betas 0.9 0.999"
                          ) from None
    if len(values) != 2 or not all(0.0 <= b < 1.0 for b in values):
        raise bad_setting("betas", betas, "expected two numbers in [0, 1), e.g. --betas 0.9 "
                          "0.999")


def _check_names(cfg: RecipeConfig) -> None:
    """The optimizer and the model shape."""
    names = optimizer_names()
    if normal_name(cfg.optimizer) not in names:
        raise bad_setting("optimizer", cfg.optimizer, f"choose one of {names}")
    if model_name(cfg.model) is None:
        raise bad_setting("model", cfg.model, f"choose one of {model_names_help()}")


def _check_projection(cfg: RecipeConfig) -> None:
    """The projection settings, ``optimizer_kwargs`` and ``refresh_sync``."""
    from lowrank_optim.projectors.dct import DCT_PROJ_TYPES
    from lowrank_optim.validation import PROJ_TYPES

    proj_types = DCT_PROJ_TYPES if normal_name(cfg.optimizer).startswith("dct_") else PROJ_TYPES
    if cfg.proj_type not in proj_types:
        raise bad_setting("proj_type", cfg.proj_type, f"choose one of {list(proj_types)} for "
                          f"{cfg.optimizer}")
    targets = cfg.target_modules
    if not (isinstance(targets, str) and targets or isinstance(targets, list) and targets
            and all(isinstance(t, str) and t for t in targets)):
        raise bad_setting("target_modules", targets, "expected 'all-linear', a regex, or a "
                          "non-empty list of module names")
    clashes = sorted(set(cfg.optimizer_kwargs) & set(OWN_SETTINGS))
    if clashes:
        raise bad_setting("optimizer_kwargs", cfg.optimizer_kwargs, f"{clashes} have their own "
                          f"settings; use {', '.join(flag(c) for c in clashes)} instead")
    if cfg.refresh_sync not in ("none", "broadcast"):
        raise bad_setting("refresh_sync", cfg.refresh_sync, "choose 'none' or 'broadcast'")
    if cfg.zero1:
        for key, off in (("refresh_sync", "none"), ("refresh_schedule", {}),
                         ("deepspeed", None)):
            if getattr(cfg, key) != off:
                raise bad_setting("zero1", True, f"does not combine with {flag(key)} (ZeRO-1 "
                                  "steps each parameter on the one rank that owns it; it runs "
                                  f"under DDP): drop {flag(key)} or --zero1")
    _check_refresh_schedule(cfg)


def _check_refresh_schedule(cfg: RecipeConfig) -> None:
    """A valid ``lowrank_optim.schedules`` spec, for an optimizer timed by update_proj_gap."""
    from lowrank_optim.registry import OPTIMIZERS
    from lowrank_optim.schedules import make_schedule

    if not cfg.refresh_schedule:
        return
    try:
        make_schedule(cfg.refresh_schedule)
    except (TypeError, ValueError) as e:
        raise bad_setting("refresh_schedule", cfg.refresh_schedule, str(e)) from None
    timed = sorted(n for n, c in OPTIMIZERS.items()
                   if getattr(c, "projector_type", None) is not None
                   and c.projector_type.refresh_timing == "gap")
    if normal_name(cfg.optimizer) not in timed:
        raise bad_setting("refresh_schedule", cfg.refresh_schedule, f"{cfg.optimizer} has no "
                          f"subspaces refreshed every update_proj_gap steps; schedules drive "
                          f"{timed} (drop the schedule for {cfg.optimizer})")


def _check_outputs(cfg: RecipeConfig) -> None:
    """Precision, trackers, data sources and directories."""
    if cfg.mixed_precision not in ("auto", "no", "bf16", "fp16"):
        raise bad_setting("mixed_precision", cfg.mixed_precision,
                          "choose auto, no, bf16 or fp16")
    trackers = {"console", "tensorboard", "wandb", "all", "none"}
    if not cfg.report_to or set(cfg.report_to) - trackers:
        raise bad_setting("report_to", cfg.report_to, f"choose from {sorted(trackers)}")
    if "none" in cfg.report_to and len(set(cfg.report_to)) > 1:
        raise bad_setting("report_to", cfg.report_to, "'none' cannot be combined with trackers")
    if not all(isinstance(d, str) and d for d in cfg.data):
        raise bad_setting("data", cfg.data, "expected file paths or glob patterns")
    if cfg.hf_dataset and cfg.data:
        raise bad_setting("data", cfg.data, f"hf_dataset={cfg.hf_dataset!r} is set too; choose "
                          "one source (--data or --hf-dataset)")
    for key in ("cache_dir", "tokenizer", "runs_dir"):
        if not getattr(cfg, key):
            raise bad_setting(key, getattr(cfg, key), "cannot be empty")
    if cfg.output_dir is not None and not cfg.output_dir:
        raise bad_setting("output_dir", cfg.output_dir, "cannot be empty (leave it unset for a "
                          "new directory under runs_dir)")


def _installed(*modules: str) -> bool:
    """Whether one of ``modules`` can be imported (looked up, not imported: no cost)."""
    return any(importlib.util.find_spec(m) is not None for m in modules)


def _needs(package: str, extra: str | None = None) -> str:
    install = f"pip install {package}"
    if extra:
        install += f" (or, in the repository, pip install -e '.[{extra}]')"
    return f"needs the `{package}` package, which this Python does not have: {install}"


def _package_problems(cfg: RecipeConfig) -> list[RecipeError]:
    """Optional packages that the settings ask for and that are not installed."""
    problems = []
    if cfg.hf_dataset and not _installed("datasets"):
        problems.append(bad_setting("hf_dataset", cfg.hf_dataset, _needs("datasets", "data")))
    trackers = set(cfg.report_to)
    every = "all" in trackers
    for tracker, modules, extra in (("tensorboard", ("tensorboard", "tensorboardX"), "wandb"),
                                    ("wandb", ("wandb",), "wandb")):
        if (every or tracker in trackers) and not _installed(*modules):
            fix = _needs(tracker, extra)
            if every:  # accelerate would silently log to the others only
                fix = (f"'all' asks for tensorboard and wandb; {tracker} {fix}, or name the "
                       "trackers to use, e.g. --report-to console tensorboard")
            problems.append(bad_setting("report_to", cfg.report_to, fix))
    if normal_name(cfg.optimizer) == "lora" and not _installed("peft"):
        problems.append(bad_setting("optimizer", cfg.optimizer, "the LoRA baseline "
                                    + _needs("peft", "hf")))
    deepspeed_env = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in (
        "true", "1", "yes")
    if (cfg.deepspeed or deepspeed_env) and not _installed("deepspeed"):
        if cfg.deepspeed:
            problems.append(bad_setting("deepspeed", cfg.deepspeed, _needs("deepspeed",
                                                                           "deepspeed")))
        else:
            problems.append(RecipeError("the accelerate config asks for DeepSpeed "
                                        f"(ACCELERATE_USE_DEEPSPEED) but {_needs('deepspeed')}"))
    return problems


def _file_problems(cfg: RecipeConfig) -> list[RecipeError]:
    """Files the settings name that are missing or unreadable."""
    problems = []
    if cfg.deepspeed:
        try:
            json.loads(Path(cfg.deepspeed).read_text(encoding="utf-8"))
        except OSError as e:
            problems.append(bad_setting("deepspeed", cfg.deepspeed, "cannot read this DeepSpeed "
                                        f"JSON config ({e.strerror or e}); e.g. "
                                        "recipes/accelerate/ds_zero0.json"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            problems.append(bad_setting("deepspeed", cfg.deepspeed, f"not a JSON file ({e})"))
    unmatched = [p for p in cfg.data if not any(os.path.isfile(f)
                                                 for f in glob.iglob(p, recursive=True))]
    if unmatched:
        problems.append(bad_setting("data", cfg.data, f"no file matches {unmatched} (globs "
                                    "are relative to the current directory; quote them)"))
    if cfg.tokenizer.endswith(".json") and not os.path.isfile(cfg.tokenizer):
        problems.append(bad_setting("tokenizer", cfg.tokenizer, "no such tokenizer.json file"))
    return problems


def check_prerequisites(cfg: RecipeConfig) -> None:
    """Raise :class:`RecipeError` when the settings need a package or a file that is not there.

    Packages: ``datasets`` for ``hf_dataset``, ``tensorboard`` / ``wandb`` for the trackers
    of ``report_to``, ``peft`` for the LoRA baseline, ``deepspeed`` for ``--deepspeed`` or an
    accelerate DeepSpeed config.  Files: the ``deepspeed`` JSON config, the ``data`` globs, a
    ``tokenizer.json``.  Checked when the settings are read, before any process group exists,
    so a launched run (``accelerate launch``, ``torchrun``) stops in every process at once,
    with no process waiting on another (:func:`recipes.pretrain.cli` prints the message once
    per machine and exits with status 2).  Every problem is in the one message.
    """
    problems = _package_problems(cfg) + _file_problems(cfg)
    if problems:
        raise RecipeError("; ".join(str(p) for p in problems))


def validate_config(cfg: RecipeConfig) -> None:
    """Raise :class:`RecipeError` on settings the recipe cannot run, or would silently ignore.

    Each message names the setting, its value, what is wrong and the flag that sets it.
    Packages and files the settings need are checked last (:func:`check_prerequisites`).
    """
    _check_names(cfg)
    _check_counts(cfg)
    _check_numbers(cfg)
    _check_projection(cfg)
    _check_outputs(cfg)
    check_prerequisites(cfg)


# -- the command line -------------------------------------------------------------------------
def argument_parser() -> argparse.ArgumentParser:
    """``--config FILE`` plus one flag per :class:`RecipeConfig` field (absent flags are left
    out of the result, so the file's values and the defaults apply)."""
    ap = argparse.ArgumentParser(description="LLaMA pretraining with any optimizer of "
                                 "lowrank-optim, launched with accelerate.",
                                 argument_default=argparse.SUPPRESS)
    ap.add_argument("--config", help="YAML or JSON file of settings")
    # the `deepspeed` launcher appends --local_rank=<i>; LOCAL_RANK in the environment says the same
    ap.add_argument("--local_rank", "--local-rank", dest="local_rank", help=argparse.SUPPRESS)
    for f in dataclasses.fields(RecipeConfig):
        if _field_types()[f.name] in (list, list | None):
            ap.add_argument(flag(f.name), dest=f.name, nargs="+", metavar=f.name.upper())
        else:
            ap.add_argument(flag(f.name), dest=f.name, metavar=f.name.upper())
    return ap


def parse_args(argv: list[str] | None = None) -> RecipeConfig:
    """The recipe's settings from the command line ``argv`` (default: ``sys.argv[1:]``)."""
    ns = vars(argument_parser().parse_args(argv))
    path = ns.pop("config", None)
    ns.pop("local_rank", None)
    cli = {k: (v if not isinstance(v, list) or len(v) > 1 or v[0][:1] != "[" else v[0])
           for k, v in ns.items()}
    return make_config(load_config_file(path) if path else {}, cli)
