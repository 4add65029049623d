"""Checkpoints that resume on another number of processes (FSDP2 2 -> 1, 1 -> 2; DDP any).

:func:`save_checkpoint` writes the model and the optimizer with ``torch.distributed.checkpoint``
(``dcp.save`` of ``get_state_dict``'s model and optimizer state: tensors only) plus a JSON
manifest (:data:`MANIFEST`: the optimizer's structure, its param groups by parameter name, the
state keys of every parameter, the world size it was written on).  :func:`load_checkpoint`
loads it into a model and optimizer laid out for *this* run, whatever the number of processes:

* FSDP2 moments of shard-local (right-side) steps are DTensors sharded on dim 0 like their
  parameter: ``torch.distributed.checkpoint`` stores them by global offsets and each rank reads
  its rows (or one process reads them all);
* replicated entries (bases, DCT indices, ``int64`` counters, moments of gathered steps, every
  entry under DDP) are plain tensors, equal on every rank: stored once, read whole by every
  rank.  :func:`save_checkpoint` checks that they really agree across ranks (a digest each)
  before anything is written, since storing one rank's copy of tensors that differ would
  resume wrong state silently.

Loading builds the template ``dcp.load`` fills from this run's optimizer:
``get_optimizer_state_dict`` initialises an empty optimizer with one step on zero gradients at
``lr=0`` (``torch.distributed.checkpoint.state_dict._init_optim_state``).  That step is
harmless here: it runs under :func:`torch.random.fork_rng`, the model is loaded after it, and
the loaded state replaces the whole optimizer state (entries the step created that the
checkpoint lacks are dropped, entries the checkpoint has that the step did not create are
allocated from the checkpoint's metadata); :func:`load_checkpoint` then checks every loaded
entry's key, shape and dtype against the manifest.  GaLore's SVD of a zero gradient and DCT's
selection from zero scores only produce values that are overwritten.

Nothing of the checkpoint is unpickled: the ``.metadata`` file is checked with
:func:`lowrank_optim.safe_load.check_dcp_directory` first, the hyper-parameters are JSON.

What is refused (``NotImplementedError`` naming the optimizer and the fix, before anything is
written or loaded): ``ZeroRedundancyOptimizer`` (its consolidated ``state_dict()`` already
holds the whole state by global parameter index: save it with ``torch.save`` on rank 0 and
``load_state_dict`` it on any number of ranks, or into the plain optimizer on one process);
optimizers whose projector times its own refreshes (SST); state entries that are not
tensors.

DDP needs no resharding at all: every rank holds the whole, identical state, so rank 0's
``optimizer.state_dict()`` saved with ``torch.save`` also loads (``weights_only=True``) on any
number of processes; this module gives the same result and also covers FSDP2.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lowrank_optim.distributed.tensors import digest, is_distributed, is_dtensor, world_size
from lowrank_optim.wrappers import innermost_optimizer

__all__ = ["MANIFEST", "check_reshardable", "load_checkpoint", "read_manifest",
           "restore_dropped_state", "save_checkpoint"]

#: the JSON file next to ``torch.distributed.checkpoint``'s files
MANIFEST = "lowrank_optim_checkpoint.json"
FORMAT = 1
_MODEL, _OPTIM, _STATE, _GROUPS = "model", "optimizer", "state", "param_groups"
#: top-level ``state_dict`` entry of :class:`~lowrank_optim.optim.base.LowRankOptimizer`
_STRUCTURE_KEY = "lowrank_optim"


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """Without torch.distributed's warning that one process saves or loads alone (intended)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


# -- checks -----------------------------------------------------------------------------------
def _unwrap(optimizer: Any) -> torch.optim.Optimizer:
    """The optimizer holding the state, behind accelerate's ``AcceleratedOptimizer`` or a
    :class:`~lowrank_optim.layerwise.LayerwiseOptimizer` (both ``torch.optim.Optimizer``
    subclasses themselves: their class name and structure are not the state's)."""
    inner = innermost_optimizer(optimizer)
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return inner


def check_reshardable(optimizer: Any) -> None:
    """Raise ``NotImplementedError`` if ``optimizer``'s state cannot go through this module.

    Raises
    ------
    NotImplementedError
        A ``ZeroRedundancyOptimizer`` or an optimizer whose projector schedules its own
        refreshes (SST); the message names the optimizer and the fix.
    TypeError
        ``optimizer`` is not a ``torch.optim.Optimizer`` (or accelerate's wrapper of one).
    """
    from torch.distributed.optim import ZeroRedundancyOptimizer

    opt = _unwrap(optimizer)
    name = type(getattr(opt, "optim", opt)).__name__
    if isinstance(opt, ZeroRedundancyOptimizer):
        raise NotImplementedError(
            f"ZeroRedundancyOptimizer over {name}: each rank holds only its share of the state, "
            "so lowrank_optim.distributed.checkpoint does not save it. Call "
            "optimizer.consolidate_state_dict(to=0), torch.save(optimizer.state_dict()) on rank "
            "0, and optimizer.load_state_dict(...) on any number of ranks (or into the plain "
            "optimizer on one process): the consolidated state is indexed by global parameter "
            "position and reshards by itself.")
    projector = getattr(opt, "projector", None)
    if projector is not None and getattr(projector, "refresh_timing", "gap") == "optimizer":
        raise NotImplementedError(
            f"{name}: its projector {projector.name!r} schedules refreshes across several "
            "tensors of a layer (SST's U, S and V), which a resharded load cannot rebuild "
            "(restoring it needs a step on zero gradients that refreshes the model's layers). "
            "Resume it on the same number of processes with torch.save(optimizer.state_dict()) "
            "and optimizer.load_state_dict(...).")


def _check_tensor_state(opt: torch.optim.Optimizer, names: dict[torch.Tensor, str]) -> None:
    for param, entries in opt.state.items():
        for key, value in entries.items():
            if not isinstance(value, torch.Tensor):
                raise NotImplementedError(
                    f"{type(opt).__name__}: state {key!r} of {names.get(param, '?')} is a "
                    f"{type(value).__name__}, not a tensor: torch.distributed.checkpoint would "
                    "pickle it. Keep optimizer state as tensors.")


def _param_names(model: torch.nn.Module) -> dict[torch.Tensor, str]:
    """Parameter -> name as ``get_state_dict`` spells it (no DDP ``module.`` or compile
    ``_orig_mod.`` prefixes)."""
    from torch.distributed.checkpoint.state_dict import _get_fqns

    return {p: next(iter(_get_fqns(model, n))) for n, p in model.named_parameters()}


def _check_replicas(model_sd: dict[str, Any], state: dict[str, dict[str, Any]]) -> None:
    """Every plain (not DTensor) tensor saved equals its copy on every other rank: DCP stores
    only one rank's copy of a replicated tensor."""
    if world_size() == 1:
        return
    names, tensors = [], []
    for name, value in model_sd.items():
        if isinstance(value, torch.Tensor) and not is_dtensor(value):
            names.append(f"model parameter {name}")
            tensors.append(value)
    for fqn, entries in state.items():
        for key, value in sorted(entries.items()):
            if isinstance(value, torch.Tensor) and not is_dtensor(value):
                names.append(f"optimizer state {key!r} of {fqn}")
                tensors.append(value)
    mine = [digest([t]) for t in tensors]
    every: list[list[str] | None] = [None] * world_size()
    dist.all_gather_object(every, (names, mine))
    for rank, (their_names, theirs) in enumerate(every):
        if their_names != names:
            raise RuntimeError(f"rank {rank} holds other replicated state entries than rank "
                               f"{dist.get_rank()}; nothing was saved.")
        bad = [n for n, a, b in zip(names, mine, theirs, strict=True) if a != b]
        if bad:
            raise RuntimeError(
                f"replicated tensors differ between rank {dist.get_rank()} and rank {rank}: "
                + ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "") + "; nothing was "
                "saved (one rank's copy would be resumed). Under DDP use "
                "lowrank_optim.distributed.broadcast_refreshes(optimizer) and "
                "check_in_sync(model, optimizer) to find where the ranks diverged.")


def _json_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Param groups as JSON data (tuples become lists; :func:`_like` turns them back)."""
    def plain(key: str, value: Any) -> Any:
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, (list, tuple)):
            return [plain(key, v) for v in value]
        raise TypeError(f"param group entry {key!r} is a {type(value).__name__}: only numbers, "
                        "strings, None and lists of them can be saved in the checkpoint's "
                        f"{MANIFEST}")

    return [{k: plain(k, v) for k, v in g.items()} for g in groups]


def _like(saved: Any, template: Any) -> Any:
    """``saved`` (from JSON) with ``template``'s tuple types restored."""
    if isinstance(template, tuple) and isinstance(saved, list):
        return tuple(_like(s, t) for s, t in zip(saved, template, strict=False))
    return saved


# -- saving -----------------------------------------------------------------------------------
def _optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer,
                     names: dict[torch.Tensor, str]) -> dict[str, Any]:
    """``get_optimizer_state_dict``'s state, keyed by parameter name; without its
    zero-gradient initialisation when ``opt`` has no state yet (a step-0 checkpoint)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    if opt.state:
        return get_optimizer_state_dict(model, opt)
    sd = opt.state_dict()
    params = [p for g in opt.param_groups for p in g["params"]]
    ids = {i: names[p] for g, saved in zip(opt.param_groups, sd[_GROUPS], strict=True)
           for i, p in zip(saved["params"], g["params"], strict=True)}
    assert len(ids) == len(params)
    return {_STATE: {}, _GROUPS: [{**g, "params": [ids[i] for i in g["params"]]}
                                  for g in sd[_GROUPS]]}


def save_checkpoint(directory: str | os.PathLike, model: torch.nn.Module, optimizer: Any, *,
                    check_replicas: bool = True) -> Path:
    """Save ``model`` and ``optimizer`` to ``directory`` so that :func:`load_checkpoint` can
    resume them on any number of processes.

    Call it on every rank (a collective when ``torch.distributed`` is initialised).

    Parameters
    ----------
    directory
        A directory on storage every rank sees (created; ``torch.distributed.checkpoint``'s
        files plus :data:`MANIFEST`).
    model
        The model as trained: plain, DDP-wrapped or FSDP2-sharded.
    optimizer
        Its optimizer (or accelerate's wrapper of it).
    check_replicas
        Check that the replicated (plain) tensors agree across ranks before writing (one
        digest per tensor, one ``all_gather_object``).

    Returns
    -------
    Path
        ``directory``.

    Raises
    ------
    NotImplementedError
        The optimizer cannot be saved this way (:func:`check_reshardable`) or holds non-tensor
        state.
    RuntimeError
        Replicated tensors differ between ranks (named); nothing was written.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    check_reshardable(optimizer)
    opt = _unwrap(optimizer)
    names = _param_names(model)
    _check_tensor_state(opt, names)
    model_sd = get_model_state_dict(model)
    osd = _optimizer_state(model, opt, names)
    if check_replicas:
        _check_replicas(model_sd, osd[_STATE])
    directory = Path(directory)
    if not is_distributed() or dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / MANIFEST).unlink(missing_ok=True)  # written last: marks it complete
    if is_distributed():
        dist.barrier()
    with _quiet_single_process():
        dcp.save({_MODEL: model_sd, _OPTIM: {_STATE: osd[_STATE]}},
                 checkpoint_id=str(directory))
    structure = opt.structure() if hasattr(opt, "structure") else None
    manifest = {
        "format": FORMAT,
        "optimizer": type(opt).__name__,
        "structure": structure,
        "world_size": world_size(),
        "sharded": any(is_dtensor(p) for p in model.parameters()),
        _GROUPS: _json_groups(osd[_GROUPS]),
        "state_keys": {fqn: sorted(entries) for fqn, entries in osd[_STATE].items()},
    }
    if not is_distributed() or dist.get_rank() == 0:
        tmp = directory / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        os.replace(tmp, directory / MANIFEST)
    if is_distributed():
        dist.barrier()
    return directory


# -- loading ----------------------------------------------------------------------------------
def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The :data:`MANIFEST` of a checkpoint (``world_size``, ``sharded``, ``structure`` ...).

    Raises
    ------
    FileNotFoundError
        Not a complete checkpoint of :func:`save_checkpoint`.
    ValueError
        An unknown format.
    """
    path = Path(directory) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: {directory} is not a complete checkpoint "
                                "of lowrank_optim.distributed.save_checkpoint")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown checkpoint format {manifest.get('format')!r}")
    return manifest


def _check_structure(opt: torch.optim.Optimizer, manifest: dict[str, Any],
                     directory: Path) -> None:
    if manifest["optimizer"] != type(opt).__name__:
        raise ValueError(f"{directory} holds the state of {manifest['optimizer']}, not of "
                         f"{type(opt).__name__}; build the optimizer the checkpoint was saved "
                         "with.")
    differences = getattr(opt, "_structure_differences", None)
    if differences is None or manifest["structure"] is None:
        return
    found = differences({_STRUCTURE_KEY: manifest["structure"], _GROUPS: manifest[_GROUPS]},
                        opt.structure())
    if found:
        raise ValueError(f"Cannot load {directory} into {type(opt).__name__}: its structure "
                         "differs (" + "; ".join(found) + "). Build the optimizer with the "
                         "saved settings.")


def _saved_entries(directory: Path) -> dict[str, Any]:
    """The checkpoint's entries (key -> DCP storage metadata), its ``.metadata`` checked by
    :func:`lowrank_optim.safe_load.check_dcp_directory` before torch unpickles it."""
    import torch.distributed.checkpoint as dcp

    from lowrank_optim import safe_load

    safe_load.check_dcp_directory(directory)
    return dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata


def _fits(value: torch.Tensor, info: Any) -> bool:
    """``value`` has the global shape and dtype of the saved entry ``info``."""
    return tuple(value.shape) == tuple(info.size) and value.dtype == info.properties.dtype


def _describe(key: str, info: Any) -> str:
    return f"{key} ({tuple(info.size)}, {info.properties.dtype})"


def _allocate(directory: Path, fqn: str, key: str, info: Any,
              param: torch.Tensor) -> torch.Tensor:
    """An empty tensor for a saved entry the initialising step did not create (a pending
    ``refresh_requested`` ...), placed like ``param`` when it is a plain tensor or a scalar."""
    if is_dtensor(param) and len(info.size) > 0:
        raise NotImplementedError(
            f"{directory}: optimizer state {key!r} of {fqn} exists in the checkpoint but not "
            "in this optimizer's initial state, and its placement on the sharded parameter is "
            "unknown; resume on the layout it was saved on.")
    return torch.empty(tuple(info.size), dtype=info.properties.dtype, device=param.device)


def _fit_template(template: dict[str, dict[str, Any]], manifest: dict[str, Any],
                  saved: dict[str, Any], params: dict[str, torch.Tensor],
                  directory: Path) -> dict[str, dict[str, Any]]:
    """The optimizer state to fill: exactly the saved entries, with this run's placements."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    out: dict[str, dict[str, Any]] = {}
    for fqn, keys in manifest["state_keys"].items():
        if fqn not in params:
            raise ValueError(f"{directory} holds optimizer state for {fqn}, which this "
                             "optimizer does not train; build it over the same parameters.")
        mine, entries = template.get(fqn, {}), {}
        for key in keys:
            info = saved.get(f"{_OPTIM}.{_STATE}.{fqn}.{key}")
            if not isinstance(info, TensorStorageMetadata):
                raise ValueError(f"{directory}: optimizer state {key!r} of {fqn} is listed in "
                                 f"{MANIFEST} but not stored as a tensor")
            value = mine.get(key)
            if value is None:  # not created by the initialising step: allocate it
                value = _allocate(directory, fqn, key, info, params[fqn])
            elif not _fits(value, info):
                raise ValueError(
                    f"{directory}: optimizer state {_describe(key, info)} of {fqn} does not fit "
                    f"this optimizer's ({tuple(value.shape)}, {value.dtype}); build the "
                    "optimizer with the saved settings.")
            entries[key] = value
        out[fqn] = entries
    return out


def _check_loaded(opt: torch.optim.Optimizer, manifest: dict[str, Any], saved: dict[str, Any],
                  names: dict[torch.Tensor, str]) -> None:
    """Every loaded entry is the saved one: keys, global shapes and dtypes."""
    by_name = {names[p]: s for p, s in opt.state.items()}
    if set(by_name) != set(manifest["state_keys"]):
        raise RuntimeError("the loaded optimizer state covers other parameters than the saved "
                           f"one: {sorted(set(by_name) ^ set(manifest['state_keys']))[:5]}")
    for fqn, keys in manifest["state_keys"].items():
        if sorted(by_name[fqn]) != keys:
            raise RuntimeError(f"loaded optimizer state of {fqn} has keys "
                               f"{sorted(by_name[fqn])}, saved {keys}")
        for key in keys:
            info, value = saved[f"{_OPTIM}.{_STATE}.{fqn}.{key}"], by_name[fqn][key]
            if not _fits(value, info):
                raise RuntimeError(f"loaded optimizer state {key!r} of {fqn} is "
                                   f"({tuple(value.shape)}, {value.dtype}), saved "
                                   f"{_describe(key, info)}")


def load_checkpoint(directory: str | os.PathLike, model: torch.nn.Module,
                    optimizer: Any) -> dict[str, Any]:
    """Load a :func:`save_checkpoint` checkpoint into ``model`` and ``optimizer``, laid out
    for this run (any number of processes; plain, DDP or FSDP2), on every rank.

    The optimizer must be built like the saved one (class, rule, projector, every group's
    ``rank`` / ``proj_type`` ..., over parameters of the same names); its state is replaced
    entirely, and its hyper-parameters (learning rate ...) are the saved ones.

    Returns
    -------
    dict
        The checkpoint's :data:`MANIFEST` (``world_size`` it was written on, ...).

    Raises
    ------
    FileNotFoundError
        No complete checkpoint in ``directory``.
    ValueError
        Another optimizer, structure or parameter set, or a state that does not fit; nothing
        was loaded.
    NotImplementedError
        :func:`check_reshardable` refuses the optimizer.
    lowrank_optim.safe_load.UnsafeFileError
        The checkpoint's ``.metadata`` names code.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_state_dict,
    )

    directory = Path(directory)
    manifest = read_manifest(directory)
    check_reshardable(optimizer)
    opt = _unwrap(optimizer)
    _check_structure(opt, manifest, directory)
    saved = _saved_entries(directory)
    names = _param_names(model)
    params = {n: p for p, n in names.items()}
    with torch.random.fork_rng(devices=[]):  # the initialising step draws nothing, but be sure
        osd = get_optimizer_state_dict(model, opt)  # initialises an empty optimizer (see above)
    model_sd = get_model_state_dict(model)  # after that step: the model is loaded below
    groups = osd[_GROUPS]
    if len(groups) != len(manifest[_GROUPS]) or any(
            list(a["params"]) != list(b["params"])
            for a, b in zip(groups, manifest[_GROUPS], strict=False)):
        raise ValueError(f"{directory}: the saved param groups hold other parameters (by name "
                         "and order) than this optimizer's; build it over the same groups.")
    state = _fit_template(osd[_STATE], manifest, saved, params, directory)
    with _quiet_single_process():
        dcp.load({_MODEL: model_sd, _OPTIM: {_STATE: state}}, checkpoint_id=str(directory))
    loaded_groups = [{k: _like(v, mine.get(k)) for k, v in g.items()}
                     for g, mine in zip(manifest[_GROUPS], groups, strict=True)]
    set_state_dict(model, opt, model_state_dict=model_sd,
                   optim_state_dict={_STATE: state, _GROUPS: loaded_groups},
                   options=StateDictOptions(strict=True))
    _check_loaded(opt, manifest, saved, names)
    return manifest


def restore_dropped_state(directory: str | os.PathLike, model: torch.nn.Module, optimizer: Any,
                          prefix: str = _OPTIM) -> list[str]:
    """Load the optimizer state entries a template-based load dropped, and name them.

    ``torch.distributed.checkpoint`` fills only the entries of the template it is given, and
    accelerate's FSDP2 ``load_state`` builds that template with one zero-gradient step
    (``get_optimizer_state_dict``): a saved entry that step does not create (a pending
    ``refresh_requested`` of a parameter that got no gradient before the save) is left out
    without a word.  This reads the checkpoint's metadata, allocates every saved
    ``<prefix>.state.<name>.<key>`` the optimizer now lacks (:func:`load_checkpoint`'s rule:
    scalars, and plain tensors of replicated parameters) and loads those.

    Parameters
    ----------
    directory
        The ``torch.distributed.checkpoint`` directory of the optimizer (accelerate's
        ``optimizer_0``).
    model, optimizer
        As loaded (FSDP2-sharded model; the optimizer or accelerate's wrapper of it).
    prefix
        The key the optimizer's state dict was saved under (accelerate and
        :func:`save_checkpoint`: ``"optimizer"``).

    Returns
    -------
    list of str
        The restored entries, as ``"<name>.<key>"`` (empty when nothing was dropped).

    Raises
    ------
    ValueError
        A saved entry belongs to a parameter this optimizer does not train.
    NotImplementedError
        A dropped entry is a non-scalar of a sharded parameter (placement unknown).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    directory = Path(directory)
    saved = _saved_entries(directory)
    opt = _unwrap(optimizer)
    names = _param_names(model)
    params = {n: p for p, n in names.items()}
    held = {names[p]: s for p, s in opt.state.items() if p in names}
    head = f"{prefix}.{_STATE}."
    dropped: dict[str, dict[str, torch.Tensor]] = {}
    for item, info in saved.items():
        if not item.startswith(head) or not isinstance(info, TensorStorageMetadata):
            continue
        fqn, _, key = item[len(head):].rpartition(".")
        if fqn not in params:
            raise ValueError(f"{directory} holds optimizer state {key!r} for {fqn}, which this "
                             "optimizer does not train; build it over the same parameters.")
        if key not in held.get(fqn, {}):
            dropped.setdefault(fqn, {})[key] = _allocate(directory, fqn, key, info,
                                                         params[fqn])
    if not dropped:
        return []
    with _quiet_single_process():
        dcp.load({prefix: {_STATE: dropped}}, checkpoint_id=str(directory))
    for fqn, entries in dropped.items():
        opt.state[params[fqn]].update(entries)
    return sorted(f"{fqn}.{key}" for fqn, entries in dropped.items() for key in entries)
