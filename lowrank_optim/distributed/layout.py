"""What each engine hands the optimizer, checked before a step runs on it.

* DDP and DeepSpeed ZeRO stage 0 hand whole parameters: every optimizer runs.
* FSDP2 hands DTensors sharded on dim 0: an optimizer runs where the rule is elementwise
  (:attr:`Rule.elementwise`), the state is 32-bit and the projector can work on row shards
  (:attr:`Projector.row_shardable`, :meth:`Projector.fsdp2_problem`); see
  :mod:`lowrank_optim.distributed.fsdp2`.
* DeepSpeed ZeRO 1/2/3 hand flattened 1-D partitions: the matrix structure a projection needs
  is gone.  A param group that asks for projection (has a ``rank``) but holds only 1-D tensors,
  or ZeRO-3 partitioned parameters (``deepspeed.zero.Init``), raises :class:`ValueError`
  (:func:`check_group_layout`, :func:`check_zero_stage`) instead of silently training
  unprojected AdamW.

Every error here says which engines do run that optimizer (:func:`engine_support`).  The
checks read the rule's and projector's declared capabilities, never their names.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from lowrank_optim.distributed.ddp import BroadcastRefresh
from lowrank_optim.distributed.tensors import Shard, is_dtensor
from lowrank_optim.rules import lowbit
from lowrank_optim.validation import param_label

if TYPE_CHECKING:
    from lowrank_optim.optim.base import LowRankOptimizer

#: param-group key recording how many >= 2-D tensors the group held when it was added (kept
#: through ``state_dict``), so tensors flattened afterwards by an engine are noticed
MATRICES_KEY = "_matrices"
FLATTENED_MESSAGE = (
    "this param group asks for low-rank projection (rank={rank}) but {what}. DeepSpeed ZeRO "
    "(stages 1-3) and other engines that flatten parameters hand the optimizer 1-D partitions, "
    "where no projection is possible, and training would silently fall back to plain full-rank "
    "updates. {support}."
)
#: what :func:`engine_support` says for every low-rank optimizer
REPLICATED_ENGINES = ("DDP and DeepSpeed ZeRO stage 0 (whole parameters; with bf16 or fp16 "
                      "DeepSpeed steps whole fp32 copies of them)")


def fsdp2_problem(optimizer: LowRankOptimizer, group: dict, projects: bool) -> str | None:
    """Why FSDP2 shards of ``group`` (projected ones if ``projects``) cannot be stepped, or
    None; independent of the parameter's layout."""
    name, rule = type(optimizer).__name__, optimizer.rule
    if not rule.elementwise:
        return (f"{name}'s inner rule {rule.name!r} is not elementwise (its statistics span "
                "the whole tensor), so its update on a shard would differ from the unsharded "
                "one; use an Adam-based optimizer (galore_adamw, dct_adamw, adamw) with FSDP2, "
                "or DDP")
    bits = group.get("bits")
    if bits is not None and bits < 32:
        return f"bits={bits!r} is not supported under FSDP2: {lowbit.FSDP2_REASON}"
    if not projects:
        return None
    projector = optimizer.projector
    if not projector.row_shardable:
        return (f"{name} (projector {projector.name!r}) does not support FSDP2: "
                f"{projector.unshardable_reason}")
    return projector.fsdp2_problem(group)


def sharding_problem(optimizer: LowRankOptimizer, group: dict, param: torch.Tensor) -> str | None:
    """Why ``optimizer`` cannot step the DTensor ``param`` of ``group`` shard-locally, or None."""
    placements = tuple(param.placements)
    if param.device_mesh.ndim != 1 or placements != (Shard(0),):
        return (f"placements {placements} on a {param.device_mesh.ndim}-D mesh are not "
                "supported; only FSDP2's default layout (Shard(0) on a 1-D mesh) is")
    projects = optimizer.projects(group, param)
    problem = fsdp2_problem(optimizer, group, projects)
    sides = optimizer.projector.sides(tuple(param.shape), group) if projects else ()
    if problem is None and isinstance(optimizer.refresher, BroadcastRefresh) and (
            group.get("rotate_moments") and sides == ("right",)):
        return ("rotate_moments with broadcast_refreshes under FSDP2 would rotate each rank's "
                "moment shard by its own selection; use one of the two")
    return problem


def engine_support(optimizer: LowRankOptimizer) -> str:
    """Which engines run ``optimizer`` as configured, as a sentence for error messages.

    Every low-rank optimizer runs under DDP and DeepSpeed ZeRO stage 0 (whole parameters,
    all-reduced gradients); FSDP2 only where :func:`fsdp2_problem` finds nothing to object to
    (an elementwise rule, a row-shardable projector, 32-bit state, no error feedback:
    galore_adamw and dct_adamw); DeepSpeed ZeRO stages 1-3 never (they flatten the
    parameters).

    Parameters
    ----------
    optimizer
        A low-rank optimizer with its param groups.

    Returns
    -------
    str
        E.g. ``"GaLoreAdafactor runs under DDP and DeepSpeed ZeRO stage 0 ...; not under FSDP2
        (...)"``.
    """
    name = type(optimizer).__name__
    problem = next((why for g in optimizer.param_groups
                    if (why := fsdp2_problem(optimizer, g, g.get("rank") is not None))), None)
    fsdp2 = "and also under FSDP2" if problem is None else f"but not under FSDP2 ({problem})"
    return (f"{name}, as configured, runs under {REPLICATED_ENGINES}, {fsdp2}; under DeepSpeed "
            "ZeRO stages 1-3 only the baselines without projection (adamw, lora) train")


def _partitioned_names(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    names = [f"{n} {tuple(p.ds_shape)}" for n, p in named if hasattr(p, "ds_shape")]
    more = f" and {len(names) - 2} more" if len(names) > 2 else ""
    return f"{', '.join(names[:2])}{more}"


def check_model_not_partitioned(model: torch.nn.Module, name: str) -> None:
    """Raise ``ValueError`` if ``model`` holds DeepSpeed ZeRO-3 partitioned parameters, which
    optimizer ``name`` (one that converts the model: SST) cannot decompose.

    Parameters
    ----------
    model
        The model about to be converted.
    name
        The optimizer's registry name, for the message.
    """
    named = [(n, p) for n, p in model.named_parameters() if hasattr(p, "ds_shape")]
    if named:
        raise ValueError(
            f"{name}: the model holds DeepSpeed ZeRO-3 partitioned parameters "
            f"({_partitioned_names(named)}, created under deepspeed.zero.Init: each rank holds a "
            "flat 1-D slice), but Sparse Spectral Training converts each targeted Linear weight "
            f"by an SVD of the whole matrix. {name} runs under {REPLICATED_ENGINES}; not under "
            "FSDP2 or DeepSpeed ZeRO stages 1-3.")


def check_zero_stage(optimizer: torch.optim.Optimizer, stage: int) -> None:
    """Raise ``ValueError`` before DeepSpeed is set up if ZeRO ``stage`` cannot run ``optimizer``.

    Stages 1-3 hand the optimizer flattened 1-D partitions, which :func:`check_group_layout`
    would reject at the first step; this says so before the engine is built.  Baselines
    without projection (``torch.optim.AdamW``: no group has a ``rank``) and stage 0 pass.

    Parameters
    ----------
    optimizer
        The client optimizer about to be handed to ``deepspeed.initialize``.
    stage
        ``zero_optimization.stage`` of the DeepSpeed config.
    """
    ranks = [g["rank"] for g in optimizer.param_groups if g.get("rank") is not None]
    if stage >= 1 and ranks:
        raise ValueError(FLATTENED_MESSAGE.format(
            rank=ranks[0], what=f"DeepSpeed ZeRO stage {stage} would flatten its matrices",
            support=engine_support(optimizer)))


def layout_fingerprint(group: dict) -> tuple:
    """What :func:`check_group_layout`'s verdict depends on: the group's tensors (identity,
    type, dimensions) and its scalar settings; a step re-checks only when this changes."""
    params = tuple((id(p), type(p), p.dim()) for p in group["params"])
    settings = tuple((k, v) for k, v in group.items()
                     if k != "params" and isinstance(v, (bool, int, float, str, type(None))))
    return params, settings


def check_group_layout(optimizer: LowRankOptimizer, group: dict) -> None:
    """Raise if ``group``'s tensors cannot be stepped as configured.

    The first call (from ``add_param_group``) records in ``group[MATRICES_KEY]`` how many
    tensors of 2 or more dimensions the group holds.  Then:

    * ``ValueError`` for a group with ``rank`` that held matrices and now holds only 1-D tensors
      (DeepSpeed ZeRO 1/2/3 swap a client optimizer's tensors for flat 1-D partitions), or
      that holds DeepSpeed ZeRO-3 partitioned parameters (``ds_shape``): the projection would
      silently not happen.  A group built with only 1-D tensors is legitimate (galore-torch:
      they are updated unprojected).
    * ``NotImplementedError`` for a DTensor parameter that :func:`sharding_problem` rejects.
    """
    params = group["params"]
    matrices = sum(p.dim() >= 2 for p in params)
    group.setdefault(MATRICES_KEY, matrices)
    if group.get("rank") is not None:
        what = None
        if group[MATRICES_KEY] and not matrices:
            what = (f"its {group[MATRICES_KEY]} matrices were replaced by {len(params)} 1-D "
                    f"tensor(s) of shape {tuple(params[0].shape) if params else ()}")
        elif any(hasattr(p, "ds_shape") for p in params):
            known = group.get("param_names") or []
            named = [(known[i] if i < len(known) else f"param {i}", p)
                     for i, p in enumerate(params)]
            what = (f"holds DeepSpeed ZeRO-3 partitioned parameters ({_partitioned_names(named)}"
                    ", created under deepspeed.zero.Init: each rank holds a flat 1-D slice)")
        if what:
            raise ValueError(FLATTENED_MESSAGE.format(rank=group["rank"], what=what,
                                                      support=engine_support(optimizer)))
    for i, p in enumerate(params):
        if is_dtensor(p):
            problem = sharding_problem(optimizer, group, p)
            if problem:
                raise NotImplementedError(
                    f"{param_label(group, i, p)}: {problem}. {type(optimizer).__name__} runs as "
                    f"configured under {REPLICATED_ENGINES}.")
