"""The optimizers under ``torch.distributed``: DDP, FSDP2 (sharded DTensor parameters), ZeRO.

What each engine hands the optimizer, and what this module does about it:

* **DDP** (and DeepSpeed ZeRO stage 0): every rank holds the whole parameter and the
  all-reduced gradient, bit-identical on every rank, so a deterministic refresh (SVD, DCT
  selection) gives every rank the same subspace and nothing needs to be done.  Where the refresh
  may not be deterministic across ranks (mixed hardware, a nondeterministic SVD backend),
  :func:`broadcast_refreshes` makes one rank compute each refresh and send it to the others.
  :func:`check_in_sync` verifies that replicas agree.
* **FSDP2** (``torch.distributed.fsdp.fully_shard``): parameters and gradients are DTensors
  sharded on dim 0 (rows).  :meth:`LowRankOptimizer.step_param` sends them to
  :func:`sharded_step`, which runs the library's one low-rank step on the local rows:

  - a projection on the **right** (it mixes columns, which every shard holds in full: GaLore and
    DCT when ``rows >= cols``) is local to the shard: ``R_k = G_k P^T``, moments ``m_k x r``
    (stored as DTensors sharded like the parameter), update ``N_k P``.  GaLore's refresh
    needs the whole gradient: its SVD runs on the gathered gradient (``DTensor.full_tensor``,
    identical on every rank), every ``update_proj_gap`` steps.  DCT's selection does not: each
    rank scores the frequencies on its rows and the scores are all-reduced (``n`` floats per
    weight instead of an all-gather of ``m n``; :meth:`DCTProjector.refresh_rows`);
  - a projection on the **left** (it mixes rows, which are split across ranks: ``rows < cols``,
    ``proj_type="left"`` or ``"full"``) runs on the gathered gradient every step; the low-rank
    moments are replicated (the same on every rank) and each rank applies the rows of the
    back-projected update that it owns.  This costs one all-gather of that gradient per step;
  - unprojected tensors take the elementwise Adam step on their shard.

  The result equals the unsharded step to floating-point rounding.  Unsupported, with an error
  raised before anything is changed (see :func:`sharding_problem`): inner rules that are not
  elementwise (Adafactor's factored statistics and RMS scaling span the whole tensor), SST
  (its columns are renormalised and re-decomposed over whole matrices), DCT error feedback (a
  full-size residual per weight), 8-bit state (quantised in blocks of the flattened moments),
  placements other than ``Shard(0)`` on a 1-D mesh.
* **DeepSpeed ZeRO 1/2/3** hand the optimizer flattened 1-D partitions of all parameters: the
  matrix structure a projection needs is gone.  A param group that asks for projection (has a
  ``rank``) but holds only 1-D tensors, or ZeRO-3 partitioned parameters (``deepspeed.zero.Init``),
  raises :class:`ValueError` (:func:`check_group_layout`, :func:`check_zero_stage`) instead of
  silently training unprojected AdamW.  Every error of this module says which engines do run
  that optimizer (:func:`engine_support`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from lowrank_optim import kernels
from lowrank_optim.core import lowrank_step
from lowrank_optim.projectors.base import Projector
from lowrank_optim.projectors.svd import galore_sides
from lowrank_optim.validation import param_label

if TYPE_CHECKING:
    from lowrank_optim.optim.base import LowRankOptimizer
    from lowrank_optim.rules.base import Rule

try:  # DTensor exists wherever torch.distributed does
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = None
    Shard = None

#: inner rules whose update is elementwise, so a shard's step equals the unsharded one
ELEMENTWISE_RULES = ("adam",)
#: projectors that run on row shards (right side locally, left side on the gathered gradient)
SHARDABLE_PROJECTORS = ("svd", "dct")
#: why the other projectors do not
UNSHARDABLE_PROJECTORS = {
    "sampled": "Sparse Spectral Training renormalises each sampled column of U and V over the "
               "whole column and re-decomposes whole matrices by SVD, which a row shard cannot "
               "do. Train SST with DDP (or convert back with lowrank_optim.sst.merge first)",
}
#: group option -> (whether its value prevents shard-local steps, why, projected params only)
UNSHARDABLE_OPTIONS: dict[str, tuple[Callable[[Any], bool], str, bool]] = {
    "error_feedback": (bool, "DCT error feedback keeps a full-size residual per weight; turn it "
                             "off under FSDP2", True),
    "bits": (lambda bits: bits is not None and bits < 32,
             "low-bit optimizer state is quantised in blocks of the flattened moments, which row "
             "shards would cut differently; use 32-bit state (galore_adamw, dct_adamw) under "
             "FSDP2", False),
}
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


# -- tensors ----------------------------------------------------------------------------------
def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (e.g. an FSDP2 parameter)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The shard this rank holds of a DTensor; any other tensor unchanged."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def is_distributed() -> bool:
    """Whether a default process group is up."""
    return dist.is_available() and dist.is_initialized()


def digest(tensors: Iterable[torch.Tensor]) -> str:
    """SHA-256 of the bytes of ``tensors`` (local shards of DTensors), in order.

    Equal digests on two ranks mean bit-identical tensors; used to check that DDP replicas (or
    their subspaces) agree.
    """
    h = hashlib.sha256()
    for t in tensors:
        t = local_tensor(t).detach().cpu()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def subspace_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every ``proj_*`` state tensor (bases, indices), in parameter order."""
    out = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            out += [state[k] for k in sorted(state) if k.startswith("proj")
                    and isinstance(state[k], torch.Tensor)]
    return out


def check_in_sync(
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    group: dist.ProcessGroup | None = None,
) -> str:
    """Raise ``RuntimeError`` unless every rank holds bit-identical parameters / subspaces.

    For replicated training (DDP).  Returns the digest (the same on every rank).  Without a
    process group it only computes the digest.
    """
    tensors: list[torch.Tensor] = []
    if model is not None:
        tensors += [p for p in model.parameters()]
    if optimizer is not None:
        tensors += subspace_tensors(optimizer)
    mine = digest(tensors)
    if not is_distributed():
        return mine
    every: list[str] = [""] * dist.get_world_size(group)
    dist.all_gather_object(every, mine, group=group)
    if len(set(every)) != 1:
        what = " and ".join(n for n, x in (("parameters", model), ("subspaces", optimizer)) if x)
        raise RuntimeError(f"Ranks disagree on their {what}: digests {every}. With DDP this "
                           "means a nondeterministic refresh; see "
                           "lowrank_optim.distributed.broadcast_refreshes.")
    return mine


def _broadcast_(tensor: torch.Tensor, src: int, group: dist.ProcessGroup | None,
                device: torch.device) -> None:
    """In-place broadcast that also works for CPU state tensors under NCCL."""
    if tensor.device == device and tensor.is_contiguous():
        dist.broadcast(tensor, src, group=group)
        return
    buf = tensor.to(device=device, memory_format=torch.contiguous_format)
    dist.broadcast(buf, src, group=group)
    tensor.copy_(buf)


# -- refresh on one rank, broadcast to the others -----------------------------------------------
class BroadcastRefresh(Projector):
    """A projector whose refreshes are computed on rank ``src`` and broadcast to the others.

    On replicated state (DDP) the source rank runs the refresh, then sends the parameter's whole
    optimizer state (the new subspace and anything the refresh changed, such as rotated
    moments) and the low-rank gradient it may return; the other ranks skip the computation.
    Under FSDP2 :func:`sharded_step` makes every rank refresh from the same gathered gradient and
    broadcasts only the replicated entries.  Everything else is delegated to the wrapped
    projector.  Install with :func:`broadcast_refreshes`.
    """

    def __init__(self, inner: Projector, src: int = 0,
                 group: dist.ProcessGroup | None = None) -> None:
        self.inner = inner
        self.src = src
        self.group = group
        self.name = inner.name

    def __getattr__(self, name: str) -> Any:  # projector-specific API (e.g. SST's select)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def refresh(self, grad: torch.Tensor, state: dict, group: dict) -> torch.Tensor | None:
        if not is_distributed():
            return self.inner.refresh(grad, state, group)
        return self.refresh_from_src(grad, state, group, self.src, self.group)

    def refresh_from_src(self, grad: torch.Tensor, state: dict, group: dict, src: int,
                         pg: dist.ProcessGroup | None) -> torch.Tensor | None:
        """Refresh on ``src`` only; send every state tensor and the returned tensor."""
        out = None
        meta: list[Any] = [None]
        if dist.get_rank() == src:
            out = self.inner.refresh(grad, state, group)
            meta[0] = ([(k, v.dtype, tuple(v.shape)) for k, v in sorted(state.items())
                        if isinstance(v, torch.Tensor)],
                       None if out is None else (out.dtype, tuple(out.shape)))
        dist.broadcast_object_list(meta, src=src, group=pg)
        entries, out_meta = meta[0]
        keys = {k for k, _, _ in entries}
        for key in [k for k, v in state.items() if isinstance(v, torch.Tensor) and k not in keys]:
            del state[key]
        for key, dtype, shape in entries:
            have = state.get(key)
            if not (isinstance(have, torch.Tensor) and have.dtype == dtype
                    and tuple(have.shape) == shape):
                state[key] = torch.empty(shape, dtype=dtype, device=grad.device)
            _broadcast_(state[key], src, pg, grad.device)
        if out_meta is not None:
            if out is None:
                out = torch.empty(out_meta[1], dtype=out_meta[0], device=grad.device)
            _broadcast_(out, src, pg, grad.device)
        return out

    def broadcast_keys(self, state: dict, keys: Iterable[str], src: int,
                       pg: dist.ProcessGroup | None, device: torch.device) -> None:
        """Send ``state[key]`` for ``keys`` from ``src`` (every rank already holds them)."""
        for key in sorted(keys):
            _broadcast_(state[key], src, pg, device)

    def has_subspace(self, state: dict) -> bool:
        return self.inner.has_subspace(state)

    def project(self, grad: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        return self.inner.project(grad, state, group)

    def project_back(self, low: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        return self.inner.project_back(low, state, group)

    def apply(self, param: torch.Tensor, low: torch.Tensor, alpha: float, state: dict,
              group: dict) -> None:
        self.inner.apply(param, low, alpha, state, group)

    def apply_update(self, param: torch.Tensor, low: torch.Tensor, alpha: float, state: dict,
                     group: dict, decay_before: float = 0.0, decay_after: float = 0.0) -> None:
        self.inner.apply_update(param, low, alpha, state, group, decay_before, decay_after)

    def validate(self, param: torch.Tensor, group: dict, label: str) -> None:
        self.inner.validate(param, group, label)

    def shared_buffers(self) -> list[torch.Tensor]:
        return self.inner.shared_buffers()

    def captured_energy(self, grad: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        return self.inner.captured_energy(grad, state, group)

    def overlap(self, old: dict, new: dict, group: dict) -> torch.Tensor | None:
        return self.inner.overlap(old, new, group)


def broadcast_refreshes(
    optimizer: LowRankOptimizer, src: int = 0, group: dist.ProcessGroup | None = None
) -> LowRankOptimizer:
    """Make ``optimizer`` compute each subspace refresh on rank ``src`` and broadcast it.

    Not needed for correctness when the refresh is deterministic (DDP all-reduces gradients, so
    every rank refreshes from the same bits); use it when ranks may run different hardware or
    a nondeterministic SVD.  Costs one small object broadcast plus one tensor broadcast per
    state entry per refreshed parameter, at refresh steps only; other ranks skip the SVD.
    Returns ``optimizer`` (changed in place; calling twice is a no-op).
    """
    if not isinstance(optimizer.projector, BroadcastRefresh):
        optimizer.projector = BroadcastRefresh(optimizer.projector, src, group)
    return optimizer


# -- layout checks (DeepSpeed flattening, FSDP2 sharding) ---------------------------------------
def _sides(param: torch.Tensor, group: dict) -> tuple[str, ...]:
    return galore_sides(tuple(param.shape), group.get("proj_type", "std"))


def sharding_problem(optimizer: LowRankOptimizer, group: dict, param: torch.Tensor) -> str | None:
    """Why ``optimizer`` cannot step the DTensor ``param`` of ``group`` shard-locally, or None."""
    placements = tuple(param.placements)
    if param.device_mesh.ndim != 1 or placements != (Shard(0),):
        return (f"placements {placements} on a {param.device_mesh.ndim}-D mesh are not "
                "supported; only FSDP2's default layout (Shard(0) on a 1-D mesh) is")
    projects = optimizer._projects(group, param)
    problem = _fsdp2_problem(optimizer, group, projects)
    if problem is None and projects and isinstance(optimizer.projector, BroadcastRefresh) and (
            group.get("rotate_moments") and _sides(param, group) == ("right",)):
        return ("rotate_moments with broadcast_refreshes under FSDP2 would rotate each rank's "
                "moment shard by its own selection; use one of the two")
    return problem


def _fsdp2_problem(optimizer: LowRankOptimizer, group: dict, projects: bool) -> str | None:
    """Why FSDP2 shards of ``group`` (projected ones if ``projects``) cannot be stepped, or
    None; independent of the parameter's layout."""
    rule = getattr(optimizer.rule, "name", type(optimizer.rule).__name__)
    if rule not in ELEMENTWISE_RULES:
        return (f"{type(optimizer).__name__}'s inner rule {rule!r} is not elementwise (its "
                "statistics span the whole tensor), so its update on a shard would differ from "
                "the unsharded one; use an Adam-based optimizer (galore_adamw, dct_adamw, adamw) "
                "with FSDP2, or DDP")
    for key, (prevents, why, projected_only) in UNSHARDABLE_OPTIONS.items():
        if key in group and prevents(group[key]) and (projects or not projected_only):
            return f"{key}={group[key]!r} is not supported under FSDP2: {why}"
    if not projects:
        return None
    name = optimizer.projector.name
    if name not in SHARDABLE_PROJECTORS:
        why = UNSHARDABLE_PROJECTORS.get(name, "it has no shard-local implementation")
        return f"{type(optimizer).__name__} (projector {name!r}) does not support FSDP2: {why}"
    return None


def engine_support(optimizer: LowRankOptimizer) -> str:
    """Which engines run ``optimizer`` as configured, as a sentence for error messages.

    Every low-rank optimizer runs under DDP and DeepSpeed ZeRO stage 0 (whole parameters,
    all-reduced gradients); FSDP2 only where :func:`sharding_problem` finds nothing
    to object to (Adam rule, SVD or DCT projector, 32-bit state, no error feedback: galore_adamw
    and dct_adamw); DeepSpeed ZeRO stages 1-3 never (they flatten the parameters).

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
                    if (why := _fsdp2_problem(optimizer, g, g.get("rank") is not None))), None)
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
    without projection (``torch.optim.AdamW``) and stage 0 pass.

    Parameters
    ----------
    optimizer
        The client optimizer about to be handed to ``deepspeed.initialize``.
    stage
        ``zero_optimization.stage`` of the DeepSpeed config.
    """
    from lowrank_optim.optim.base import LowRankOptimizer

    if stage < 1 or not isinstance(optimizer, LowRankOptimizer):
        return
    ranks = [g["rank"] for g in optimizer.param_groups if g.get("rank") is not None]
    if ranks:
        raise ValueError(FLATTENED_MESSAGE.format(
            rank=ranks[0], what=f"DeepSpeed ZeRO stage {stage} would flatten its matrices",
            support=engine_support(optimizer)))


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


def all_ranks_true(flag: bool, params: Iterable[torch.Tensor]) -> bool:
    """``flag`` AND-ed over the ranks when some of ``params`` are DTensors (sharded gradients
    are checked shard by shard); ``flag`` itself otherwise (replicated gradients agree)."""
    sharded = next((p for p in params if is_dtensor(p)), None)
    if sharded is None:
        return flag
    t = torch.tensor(int(flag), device=local_tensor(sharded).device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=sharded.device_mesh.get_group())
    return bool(t)


# -- FSDP2: one step on the local rows ----------------------------------------------------------
class _RowShard(Projector):
    """Runs a projector for a row-sharded weight; see the module docstring.

    ``gathered=False`` (right side): ``grad`` given to the core is the local shard; the refresh
    gathers the whole gradient.  ``gathered=True`` (left / both sides): ``grad`` is the gathered
    gradient; the update is back-projected in full and this rank's rows are applied.
    """

    def __init__(self, inner: Projector, dgrad: torch.Tensor, rows: slice, gathered: bool,
                 src: int, pg: dist.ProcessGroup) -> None:
        self.bcast = inner if isinstance(inner, BroadcastRefresh) else None
        self.inner = inner.inner if self.bcast is not None else inner
        self.name = self.inner.name
        self.dgrad, self.rows, self.gathered, self.src, self.pg = dgrad, rows, gathered, src, pg

    def has_subspace(self, state: dict) -> bool:
        return self.inner.has_subspace(state)

    def refresh(self, grad: torch.Tensor, state: dict, group: dict) -> torch.Tensor | None:
        if self.gathered:  # the whole state is replicated: refresh as unsharded
            if self.bcast is not None:
                return self.bcast.refresh_from_src(grad, state, group, self.src, self.pg)
            return self.inner.refresh(grad, state, group)
        refresh_rows = getattr(self.inner, "refresh_rows", None)
        if refresh_rows is not None and self.bcast is None:  # DCT: scores summed, no gather
            return refresh_rows(grad, state, group, tuple(self.dgrad.shape),
                                lambda t: dist.all_reduce(t, group=self.pg))
        full = self.dgrad.full_tensor()  # the same bits on every rank
        low = self.inner.refresh(full, state, group)
        if self.bcast is not None:  # moments are shards: send only the replicated entries
            keys = [k for k, v in state.items()
                    if isinstance(v, torch.Tensor) and not _row_sharded(k, self.gathered)]
            self.bcast.broadcast_keys(state, keys, self.src, self.pg, grad.device)
            if low is not None:
                _broadcast_(low, self.src, self.pg, low.device)
        # a right-side low-rank gradient (m x r) has the weight's rows: keep this rank's
        return None if low is None else low[self.rows]

    def project(self, grad: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        return self.inner.project(grad, state, group)

    def project_back(self, low: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        full = self.inner.project_back(low, state, group)
        return full[self.rows] if self.gathered else full

    def apply_update(self, param: torch.Tensor, low: torch.Tensor, alpha: float, state: dict,
                     group: dict, decay_before: float = 0.0, decay_after: float = 0.0) -> None:
        if not self.gathered:
            self.inner.apply_update(param, low, alpha, state, group, decay_before, decay_after)
            return
        rows = self.inner.project_back(low, state, group)[self.rows]
        kernels.update_param(param, rows, alpha, decay_before, decay_after)


def _row_sharded(key: str, gathered: bool) -> bool:
    """State entries split by rows like the parameter: the moments of a shard-local step."""
    return not gathered and key.startswith("exp_")


def _as_row_dtensor(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    shape = (param.shape[0], *local.shape[1:])
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                              shape=torch.Size(shape), stride=stride)


def sharded_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict,
    group: dict,
    rule: Rule,
    projector: Projector | None,
) -> None:
    """One optimizer step for a DTensor parameter sharded on dim 0 (FSDP2), on this rank's rows.

    ``state`` keeps the moments of shard-local steps as DTensors sharded like ``param`` (so
    ``torch.distributed.checkpoint`` saves and reshards them); replicated entries (bases,
    indices, counters, the moments of gathered steps) are plain tensors, equal on every rank.
    """
    mesh = param.device_mesh
    pg = mesh.get_group()
    if not is_dtensor(grad):
        raise RuntimeError(f"parameter is a DTensor but its gradient is a {type(grad).__name__}")
    if tuple(grad.placements) != tuple(param.placements):
        grad = grad.redistribute(mesh, param.placements)
    sides = _sides(param, group) if projector is not None else ()
    gathered = bool(sides) and sides != ("right",)
    originals = {k: v.to_local() for k, v in state.items() if is_dtensor(v)}
    local_state = {k: originals.get(k, v) for k, v in state.items()}
    step_grad = grad.to_local()
    if projector is not None:
        size, offset = Shard.local_shard_size_and_offset(param.shape[0], mesh.size(),
                                                         mesh.get_local_rank())
        src = dist.get_global_rank(pg, 0)
        projector = _RowShard(projector, grad, slice(offset, offset + size), gathered, src, pg)
        group = {**group, "proj_type": sides[0] if len(sides) == 1 else "full"}
        if gathered:
            step_grad = grad.full_tensor()
    lowrank_step(param.to_local(), step_grad, local_state, group, rule, projector)
    for key in [k for k in state if k not in local_state]:
        del state[key]
    for key, value in local_state.items():
        if key in originals and originals[key] is value:
            continue  # updated in place
        if isinstance(value, torch.Tensor) and value.dim() and _row_sharded(key, gathered):
            value = _as_row_dtensor(value, param)
        state[key] = value
