"""The recipe's checkpoints: what is saved, how a checkpoint is known complete, and the checks
that run before a resume loads anything.

A checkpoint ``checkpoints/step_<n>`` holds accelerate's files (model as safetensors, the
optimizer) and, written by the recipe as JSON, the learning-rate scheduler, every process's
random generators, the settings and the data position (``train_state.json``, written last: it
marks the checkpoint complete).  Nothing of what the recipe saves itself is unpickled.

Where a run writes: ``output_dir`` when it is set (exactly that directory), else a directory of
its own, ``<runs_dir>/<optimizer>-<YYYYmmdd-HHMMSS>`` (:func:`new_run_directory`), so that runs
of the same config never share one; ``--resume-from latest`` then continues the newest such run
of the optimizer that holds a complete checkpoint (:func:`choose_output_dir`).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import os
import random
import re
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lowrank_optim import safe_load
from recipes.config import RecipeConfig, RecipeError, flat_config, normal_name
from recipes.files import atomic_write, fault_point, fsync_dir
from recipes.launch import engine_name


class CheckpointError(RecipeError):
    """A checkpoint that is incomplete, unreadable, unsafe to load, or saved with other
    settings."""


STATE_FILE = "train_state.json"  # written last: marks a checkpoint complete
SETTINGS_FILE = "recipe_settings.json"  # the settings the checkpoint was trained with
SCHEDULER_FILE = "scheduler.json"  # the learning-rate schedule's state_dict
RNG_FILE = "rng_state_{}.json"  # per process: python, numpy, torch (CPU, CUDA) generators
REFRESH_FILE = "refresh_schedule.json"  # with --refresh-schedule: the RefreshScheduler's state
#: files accelerate writes for objects the recipe no longer hands it: accelerate unpickles
#: ``custom_checkpoint_<i>.pkl`` with weights_only=False, and drops an unreadable
#: ``random_states_<i>.pkl`` silently; the recipe never lets accelerate read either
ACCELERATE_PICKLES = re.compile(r"(custom_checkpoint|random_states)_\d+\.pkl")

#: settings that may change between a checkpoint and its resume: they do not change what is
#: trained (outputs, logging, evaluation, launch); every other one is checked at resume
RESUME_FREE_SETTINGS = frozenset({
    "optimizer_overrides",  # already merged into the fields it overrides
    "refresh_sync", "cache_dir", "hf_val_split", "eval_every", "eval_samples", "log_every",
    "report_to", "project", "run_name", "output_dir", "runs_dir", "save_every",
    "keep_checkpoints",
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


# -- which checkpoints are complete -----------------------------------------------------------
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
    fsync_dir(directory.parent)
    fault_point("checkpoint-prune")
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
        fsync_dir(sub)
    return files


# -- settings saved with a checkpoint ---------------------------------------------------------
def run_settings(cfg: RecipeConfig, accelerator: Any) -> dict[str, Any]:
    """The settings that define what a run trains: every setting except
    :data:`RESUME_FREE_SETTINGS`, plus the precision, engine and number of processes."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in RESUME_FREE_SETTINGS}
    settings["optimizer"] = normal_name(cfg.optimizer)
    if cfg.betas is not None:
        settings["betas"] = [float(b) for b in cfg.betas]
    settings["mixed_precision"] = str(accelerator.mixed_precision)
    settings["engine"] = engine_name(accelerator)
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


#: engines whose accelerate checkpoints have the same files (model.safetensors, optimizer.bin
#: with the whole state): a resume may switch between them (another number of processes)
_REPLICATED_FILES = frozenset({"single", "ddp"})


def _refuse_engine_change(directory: Path, changes: dict[str, dict[str, Any]]) -> None:
    """A checkpoint of FSDP2 (sharded ``torch.distributed.checkpoint`` directories) or
    DeepSpeed (its own files) loads only under the engine that wrote it; refused even with
    ``allow_config_change``, since accelerate would fail on missing files or load nothing."""
    engine = changes.get("engine")
    if engine is None or {engine["saved"], engine["now"]} <= _REPLICATED_FILES:
        return
    raise CheckpointError(
        f"resume_from: {directory} cannot resume under another engine (engine: saved "
        f"{engine['saved']!r}, now {engine['now']!r}): the checkpoint files of one cannot be "
        "loaded by the other (--allow-config-change does not cover this). Resume with the "
        "engine it was saved with (single <-> ddp may change: same files); "
        "lowrank_optim.distributed.save_checkpoint / load_checkpoint move a model and its "
        "optimizer between FSDP2, DDP and one process.")


def check_resume_settings(directory: Path, cfg: RecipeConfig,
                          accelerator: Any) -> dict[str, dict[str, Any]]:
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
    _refuse_engine_change(directory, changes)
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
def rng_state(accelerator: Any) -> dict[str, Any]:
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


def _decode_generators(data: dict[str, Any]) -> dict[str, Any]:
    """The generator states in :func:`rng_state`'s data, each tried on a scratch generator."""
    import numpy as np

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
    return {"python": python, "numpy": numpy_state, "cpu": cpu, "cuda": cuda,
            "step": int(data["accelerate_step"])}


def _decode_rng(data: Any) -> dict[str, Any]:
    """:func:`rng_state`'s data as generator states, each checked on a scratch generator (the
    global ones are untouched).

    Raises
    ------
    ValueError
        Missing keys, wrong types or sizes; the message says which.
    """
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object")
    missing = sorted({"python", "numpy", "torch", "cuda", "accelerate_step"} - set(data))
    if missing:
        raise ValueError(f"no {', '.join(missing)}")
    try:
        states = _decode_generators(data)
    except (TypeError, ValueError, RuntimeError, OverflowError, IndexError, KeyError) as e:
        raise ValueError(f"not a valid generator state ({str(e).splitlines()[0][:200]})"
                         ) from None
    cuda = states["cuda"]
    if torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            raise ValueError(f"{len(cuda)} CUDA generator states for "
                             f"{torch.cuda.device_count()} devices")
        sizes = [t.numel() for t in torch.cuda.get_rng_state_all()]
        if [t.numel() for t in cuda] != sizes:
            raise ValueError("CUDA generator states of the wrong size")
    return states


@dataclass
class ResumeParts:
    """What :func:`verify_checkpoint` read from a checkpoint for this process, before anything
    was loaded: the scheduler's state, this process's generator states (``None`` when they
    could not be read and ``allow_inexact_resume`` accepted that), what was accepted, and the
    refresh schedule's state (``None`` without ``refresh_schedule`` or a saved state)."""

    scheduler: dict[str, Any]
    rng: dict[str, Any] | None
    inexact: list[str]
    refresh: dict[str, Any] | None = None


def _refuse_accelerate_pickles(directory: Path) -> None:
    for path in sorted(directory.rglob("*.pkl")):
        if ACCELERATE_PICKLES.fullmatch(path.name):
            raise CheckpointError(
                f"{path}: refused: accelerate would unpickle this file (custom_checkpoint_*.pkl "
                "with weights_only=False), or drop it silently when unreadable "
                "(random_states_*.pkl); this recipe saves the scheduler and the RNG states as "
                f"{SCHEDULER_FILE} and {RNG_FILE.format('<i>')} instead, so the checkpoint was "
                "written by an older recipe version or the file was planted")


def _check_engine_files(directory: Path, accelerator: Any) -> None:
    engine_files = {"deepspeed": safe_load.DEEPSPEED_GLOBALS}.get(
        engine_name(accelerator).partition("-")[0], ())
    try:
        safe_load.check_directory(directory, torch_globals=engine_files, skip={
            p.name for p in directory.glob(RNG_FILE.format("*"))})  # read below, allowance
    except safe_load.UnsafeFileError as e:
        raise CheckpointError(f"cannot resume from {directory}: {e}") from None


def _read_scheduler(directory: Path) -> dict[str, Any]:
    path = directory / SCHEDULER_FILE
    scheduler = read_checkpoint_json(path, "the learning-rate schedule cannot be restored")
    if not isinstance(scheduler, dict) or not isinstance(scheduler.get("last_epoch"), int):
        raise CheckpointError(f"{path} is unreadable: expected a scheduler state_dict with "
                              "'last_epoch'")
    return scheduler


def _read_refresh_state(directory: Path, cfg: RecipeConfig) -> dict[str, Any] | None:
    """The saved :class:`~lowrank_optim.schedules.RefreshScheduler` state, if the run has a
    schedule and the checkpoint one (else the schedule is rebuilt from the optimizer)."""
    path = directory / REFRESH_FILE
    if not cfg.refresh_schedule or not path.exists():
        return None
    data = read_checkpoint_json(path, "the refresh schedule cannot be restored")
    if not isinstance(data, dict) or not isinstance(data.get("layers"), list):
        raise CheckpointError(f"{path} is unreadable: expected a refresh schedule state with "
                              "'layers'")
    return data


def _read_rng_states(directory: Path, accelerator: Any) -> tuple[dict[str, Any] | None,
                                                                   list[str]]:
    """This process's generator states and the problems with every process's file."""
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
    return mine, inexact


def verify_checkpoint(directory: Path, cfg: RecipeConfig, accelerator: Any) -> ResumeParts:
    """Check every file of ``directory`` before accelerate or an engine loads any of it.

    * Pickle-based files (``optimizer.bin``, DeepSpeed's ``*_states.pt``, FSDP2's ``.metadata``
      and non-tensor items) must load with ``torch.load(weights_only=True)`` or a restricted
      unpickler (:mod:`lowrank_optim.safe_load`); ``model.safetensors`` must read as
      safetensors, the JSON files as JSON.
    * ``custom_checkpoint_<i>.pkl`` / ``random_states_<i>.pkl`` (accelerate's pickles, written
      by recipe versions before issue 19) are refused: the recipe never lets accelerate read
      them.
    * ``scheduler.json``, ``refresh_schedule.json`` (with ``refresh_schedule``) and every
      process's ``rng_state_<i>.json`` are read and checked here.
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
    _refuse_accelerate_pickles(directory)
    _check_engine_files(directory, accelerator)
    scheduler = _read_scheduler(directory)
    refresh = _read_refresh_state(directory, cfg)
    mine, inexact = _read_rng_states(directory, accelerator)
    if inexact and not cfg.allow_inexact_resume:
        raise CheckpointError(
            f"cannot resume exactly from {directory}:\n  " + "\n  ".join(inexact) + "\n"
            "Pass --allow-inexact-resume true to continue with freshly seeded generators (the "
            "run is then no longer bit-exact; logged to metrics.jsonl and summary.json).")
    if inexact and accelerator.is_main_process:
        print(f"[pretrain] warning: inexact resume from {directory} (--allow-inexact-resume "
              "true), the run is no longer bit-exact:\n  " + "\n  ".join(inexact),
              file=sys.stderr, flush=True)
    return ResumeParts(scheduler, mine, inexact, refresh)


def restore_parts(parts: ResumeParts, scheduler: Any, accelerator: Any) -> None:
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


# -- saving -----------------------------------------------------------------------------------
def _save_parts(directory: Path, scheduler: Any, accelerator: Any, refresh: Any) -> None:
    """Each process: its generators as ``rng_state_<i>.json`` (accelerate's pickle of them is
    removed); the main process: ``scheduler.json`` and, with a refresh schedule (``refresh``,
    the same on every process), ``refresh_schedule.json``.

    Plain writes, like accelerate's files: they are fsynced with the others before
    ``train_state.json``, which marks the checkpoint complete, is written.
    """
    (directory / f"random_states_{accelerator.process_index}.pkl").unlink(missing_ok=True)
    (directory / RNG_FILE.format(accelerator.process_index)).write_text(
        json.dumps(rng_state(accelerator)), encoding="utf-8")
    if accelerator.is_main_process:
        (directory / SCHEDULER_FILE).write_text(json.dumps(scheduler.state_dict()),
                                                encoding="utf-8")
        if refresh is not None:
            (directory / REFRESH_FILE).write_text(json.dumps(refresh.state_dict()),
                                                  encoding="utf-8")


def _consolidate_zero1(accelerator: Any) -> list:
    """A ``ZeroRedundancyOptimizer`` holds each rank's share of the state on that rank, and its
    ``state_dict()`` works only where the whole state was gathered; accelerate's ``save_state``
    calls it on every rank (and writes rank 0's), so gather it on every rank first (a
    transient copy of the whole state, dropped after the save)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    found = []
    for opt in getattr(accelerator, "_optimizers", []):
        inner = getattr(opt, "optimizer", opt)
        if isinstance(inner, ZeroRedundancyOptimizer):
            mine = []
            for rank in range(accelerator.num_processes):  # each call gathers on one rank
                inner.consolidate_state_dict(to=rank)
                if rank == accelerator.process_index:
                    mine = inner._all_state_dicts
            inner._all_state_dicts = mine  # this rank's gathered copy, for state_dict()
            found.append(inner)
    return found


def save_checkpoint(accelerator: Any, state: TrainState, cfg: RecipeConfig,
                    scheduler: Any, refresh: Any = None) -> Path:
    """``accelerator.save_state`` (model as safetensors, optimizer) plus, written by the recipe
    as JSON, the scheduler, the refresh schedule (``refresh``, a ``RefreshScheduler`` or
    None), the RNG states of every process, the settings and the data position; older
    checkpoints beyond ``keep_checkpoints`` are removed.

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
    zero1 = _consolidate_zero1(accelerator)
    accelerator.save_state(str(directory))
    for inner in zero1:  # drop the gathered copies
        inner._all_state_dicts = []
    _save_parts(directory, scheduler, accelerator, refresh)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        fault_point("checkpoint-state")
        state.files = _sync_files(directory)
        atomic_write(directory / SETTINGS_FILE, json.dumps(
            {"settings": run_settings(cfg, accelerator), "config": flat_config(cfg)}, indent=1))
        state.save(directory)  # written last: marks the checkpoint complete
        prune(cfg, state.step)
    accelerator.wait_for_everyone()
    return directory


def prune(cfg: RecipeConfig, step: int) -> None:
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


# -- the run's directory ----------------------------------------------------------------------
#: the time stamp in the names of run directories (local time, sorts as it reads)
RUN_STAMP = "%Y%m%d-%H%M%S"


def new_run_directory(parent: str | os.PathLike, prefix: str = "",
                      now: float | None = None) -> Path:
    """Create and return a directory of its own under ``parent``: ``<prefix>-<stamp>``
    (``<stamp>`` alone without a prefix), ``RUN_STAMP`` of ``now`` (default: the current
    time), with ``-2``, ``-3``, ... appended when runs start in the same second.

    The directory is claimed by creating it (``mkdir`` fails for an existing one), so two runs
    started at once on a shared file system never get the same one.

    Parameters
    ----------
    parent
        Where run directories go (created if missing), e.g. ``runs/tiny``.
    prefix
        The first part of the name, e.g. the optimizer's name.
    now
        Seconds since the epoch (tests); default ``time.time()``.
    """
    stamp = time.strftime(RUN_STAMP, time.localtime(time.time() if now is None else now))
    base = f"{prefix}-{stamp}" if prefix else stamp
    Path(parent).mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        path = Path(parent) / (base if n == 1 else f"{base}-{n}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise RecipeError(f"runs_dir={str(parent)!r}: no free run directory named {base}-<n>; "
                      "set --output-dir or clean up the directory")


def run_directories(parent: str | os.PathLike, prefix: str = "") -> list[Path]:
    """The directories :func:`new_run_directory` made under ``parent`` for ``prefix``, oldest
    first (by their time stamp, then their ``-<n>`` suffix)."""
    pattern = re.compile((re.escape(prefix) + "-" if prefix else "")
                         + r"(\d{8}-\d{6})(?:-(\d+))?")
    found = []
    for path in Path(parent).glob(f"{prefix}-*" if prefix else "*"):
        match = pattern.fullmatch(path.name)
        if match and path.is_dir():
            found.append(((match[1], int(match[2] or 1)), path))
    return [path for _, path in sorted(found)]


def choose_output_dir(cfg: RecipeConfig, verbose: bool = True) -> tuple[Path, str]:
    """The directory this run writes to, and why (for the console).

    * ``output_dir`` set: that directory, as given.
    * ``resume_from`` a checkpoint ``<run>/checkpoints/step_<n>``: that run's directory, which
      the resumed run continues.
    * ``resume_from: latest``: the newest run directory of this optimizer under ``runs_dir``
      (see :func:`run_directories`) that holds a complete checkpoint; newer runs whose
      checkpoints are all incomplete are skipped with a warning (when ``verbose``), as
      ``latest`` skips incomplete checkpoints within a run.  With none, a new run.
    * Otherwise a new directory, ``<runs_dir>/<optimizer>-<stamp>`` (created here: call this
      on one process and hand the result to the others).

    Raises
    ------
    RecipeError
        No run directory could be created under ``runs_dir``.
    """
    if cfg.output_dir:
        return Path(cfg.output_dir), "as given by output_dir"
    name = normal_name(cfg.optimizer)
    if cfg.resume_from not in (None, "", "latest"):
        resume = Path(cfg.resume_from)
        if resume.parent.name == "checkpoints":
            return resume.parent.parent, f"the run of resume_from={cfg.resume_from!r}"
    if cfg.resume_from == "latest":
        for run in reversed(run_directories(cfg.runs_dir, name)):
            steps = _step_directories(run)
            if any(checkpoint_problem(p) is None for p in steps):
                return run, "the newest run with a complete checkpoint (resume_from=latest)"
            if steps and verbose:
                warnings.warn(f"resume_from=latest: skipping run {run}: none of its "
                              f"checkpoints is complete ({checkpoint_problem(steps[-1])})",
                              RuntimeWarning, stacklevel=2)
        if verbose:
            old = checkpoints(cfg.runs_dir)  # written before runs had directories of their own
            hint = (f"; {old[-1]} was written by a run without a directory of its own: pass "
                    f"--output-dir {cfg.runs_dir} to resume it" if old else "")
            print(f"[pretrain] resume_from=latest: no complete checkpoint in "
                  f"{Path(cfg.runs_dir) / (name + '-*')}: starting a new run{hint}",
                  file=sys.stderr, flush=True)
    try:
        return new_run_directory(cfg.runs_dir, name), f"a new run under runs_dir={cfg.runs_dir}"
    except OSError as e:
        raise RecipeError(f"runs_dir={cfg.runs_dir!r}: cannot create a run directory there "
                          f"({e.strerror or e}); set --runs-dir or --output-dir to a writable "
                          "place") from None


# -- choosing the checkpoint to resume --------------------------------------------------------
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


def set_aside_later_checkpoints(output_dir: str | os.PathLike, step: int) -> None:
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
        fsync_dir(path.parent)
        warnings.warn(f"{path} is later than the step this run starts from ({step}): moved to "
                      f"{target} so that --resume-from latest cannot pick it", RuntimeWarning,
                      stacklevel=2)
