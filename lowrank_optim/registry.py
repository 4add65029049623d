"""``create_optimizer(model, name, ...)``: one call from a model to a configured optimizer."""

from __future__ import annotations

import difflib
import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lowrank_optim import distributed
from lowrank_optim.distributed import check_model_not_partitioned
from lowrank_optim.groups import TargetModules, param_groups_and_summary
from lowrank_optim.optim.apollo import APOLLO_MINI_SCALE, ApolloAdamW, ApolloMini
from lowrank_optim.optim.compose import compose
from lowrank_optim.optim.dct import DCTAdafactor, DCTAdamW
from lowrank_optim.optim.fira import DCTFiraAdamW, FiraAdamW
from lowrank_optim.optim.galore import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit
from lowrank_optim.optim.sst import SSTAdamW, create_sst_adamw
from lowrank_optim.projectors import DCTProjector, Projector, SVDProjector
from lowrank_optim.rules.base import Rule
from lowrank_optim.sst.convert import spectral_modules

logger = logging.getLogger("lowrank_optim")

#: name -> optimizer class taking param groups with projection keys
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "galore_adamw": GaLoreAdamW,
    "galore_adafactor": GaLoreAdafactor,
    "dct_adamw": DCTAdamW,
    "dct_adafactor": DCTAdafactor,
    "galore_adamw8bit": GaLoreAdamW8bit,
    "dct_adamw8bit": DCTAdamW,
    "apollo_adamw": ApolloAdamW,
    "apollo_mini": ApolloMini,
    "fira_adamw": FiraAdamW,
    "dct_fira_adamw": DCTFiraAdamW,
}
#: optimizer keyword defaults per name (the caller's keywords win): ``dct_adamw8bit`` is
#: ``DCTAdamW`` with 8-bit moments
OPTIMIZER_DEFAULTS_BY_NAME: dict[str, dict[str, Any]] = {
    "dct_adamw8bit": {"bits": 8},
}
#: projection defaults of :func:`create_optimizer` when the caller passes none: GaLore's paper
#: settings, overridden per optimizer name (the DCT reference refreshes every step, no scale)
GALORE_PROJECTION_DEFAULTS: dict[str, Any] = {"update_proj_gap": 200, "scale": 0.25}
#: name prefix -> projector of :func:`register_rule`'s names, with its projection defaults
PROJECTOR_PREFIXES: dict[str, tuple[type[Projector], dict[str, Any]]] = {
    "galore": (SVDProjector, {}),
    "dct": (DCTProjector, {"update_proj_gap": 1, "scale": 1.0}),
}
PROJECTION_DEFAULTS_BY_NAME: dict[str, dict[str, Any]] = {
    **{name: PROJECTOR_PREFIXES["dct"][1]
       for name in ("dct_adamw", "dct_adafactor", "dct_adamw8bit", "dct_fira_adamw")},
    # APOLLO's paper settings: a draw every 200 steps, alpha 1 (APOLLO) or sqrt(128) (Mini)
    "apollo_adamw": {"update_proj_gap": 200, "scale": 1.0},
    "apollo_mini": {"update_proj_gap": 200, "scale": APOLLO_MINI_SCALE},
}
#: ``rank`` of :func:`create_optimizer` when the caller passes none (else 128)
RANK_BY_NAME: dict[str, int] = {"apollo_mini": 1}
DEFAULT_RANK = 128


def register_rule(rule: type[Rule], **defaults: Any) -> list[str]:
    """Make ``create_optimizer`` names of a new inner rule: ``galore_<rule.name>`` (SVD
    projector) and ``dct_<rule.name>`` (DCT projector), classes built by
    :func:`lowrank_optim.optim.compose` (``defaults`` override the rule's).  Names already
    taken are left alone.  Returns the names added."""
    added = []
    for prefix, (projector, projection) in PROJECTOR_PREFIXES.items():
        name = f"{prefix}_{rule.name}"
        if name in OPTIMIZERS:
            continue
        OPTIMIZERS[name] = compose(rule, projector, **defaults)
        if projection:
            PROJECTION_DEFAULTS_BY_NAME[name] = projection
        added.append(name)
    return added


class _Unset:
    """Marks an argument the caller left out (``None`` is a valid ``update_proj_gap``)."""

    def __repr__(self) -> str:
        return "<per-optimizer default>"


UNSET: Any = _Unset()

#: name -> baseline without projection (same call shape, for benchmarks and recipes)
BASELINES: dict[str, type[torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW,
}
#: name -> builder called with the model itself, for optimizers that change the model: SST
#: converts the targeted nn.Linear layers to SpectralLinear before building its groups
MODEL_BUILDERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sst_adamw": create_sst_adamw,
    "sst_adamw8bit": functools.partial(create_sst_adamw, bits=8),
}
#: the optimizer class each model builder makes (engine checks read its capabilities)
OPTIMIZER_CLASSES_OF_BUILDERS: dict[str, type[torch.optim.Optimizer]] = {
    "sst_adamw": SSTAdamW, "sst_adamw8bit": SSTAdamW}


def _check_keywords(name: str, cls: type, kwargs: dict[str, Any]) -> None:
    """Unknown optimizer keywords raise ``ValueError`` listing the accepted ones (before the
    model is touched), instead of the class's bare ``TypeError``."""
    accepted = [p for p in inspect.signature(cls).parameters if p != "params"]
    for key in kwargs:
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            extra = (" (8-bit state is for the Adam-based optimizers)" if key == "bits" else "")
            raise ValueError(f"{name!r} ({cls.__name__}) takes no argument {key!r}{extra}; "
                             f"it takes {', '.join(accepted)}.{hint}")


def _uses_8bit(key: str, optimizer_kwargs: dict[str, Any]) -> bool:
    """Whether optimizer ``key`` built with ``optimizer_kwargs`` keeps 8-bit moments."""
    return optimizer_kwargs.get("bits", 8 if key.endswith("8bit") else 32) == 8


def available() -> list[str]:
    """Names accepted by :func:`create_optimizer`."""
    return sorted({**OPTIMIZERS, **BASELINES, **MODEL_BUILDERS})


def create_optimizer(
    model: nn.Module,
    name: str,
    *,
    target_modules: TargetModules = "all-linear",
    rank: int = UNSET,
    update_proj_gap: int | None = UNSET,
    scale: float = UNSET,
    proj_type: str = "std",
    embedding_bits: int | None = UNSET,
    zero1: bool = False,
    **optimizer_kwargs: Any,
) -> torch.optim.Optimizer:
    """Build optimizer ``name`` for ``model``; one summary line (what is projected, the class
    and its learning rate) goes to the ``lowrank_optim`` logger.

    Projection settings go to the group of targeted ``nn.Linear`` weights (see
    :func:`lowrank_optim.param_groups`); ``optimizer_kwargs`` (``lr``, ``betas``,
    ``weight_decay`` ...) go to the optimizer.  Baselines (``"adamw"``) ignore projection keys.
    ``update_proj_gap`` and ``scale`` default per optimizer: 200 and 0.25 (GaLore's paper
    settings), 1 and 1.0 for ``dct_*``, 200 and 1.0 for ``apollo_adamw``, 200 and sqrt(128)
    for ``apollo_mini`` (see :data:`PROJECTION_DEFAULTS_BY_NAME`); ``rank`` defaults to 128
    (1 for ``apollo_mini``, :data:`RANK_BY_NAME`).
    ``"galore_adamw8bit"``, ``"dct_adamw8bit"`` and ``"sst_adamw8bit"`` keep 8-bit moments
    (``bits=8``; any Adam-based name takes ``bits=8`` as a keyword too).
    With 8-bit moments, ``nn.Embedding`` weights keep 32-bit moments (``embedding_bits``
    defaults to 32 then, as the HF Trainer does for bitsandbytes' 8-bit optimizers: a row
    only gets a gradient when its token is in the batch); pass ``embedding_bits=8`` to
    quantise them too.
    ``zero1=True`` returns ``torch.distributed.optim.ZeroRedundancyOptimizer`` over the
    optimizer (ZeRO-1 by whole parameters: each rank keeps the state of its share of the
    tensors; needs an initialised process group; :func:`lowrank_optim.distributed.zero1`).
    Save with ``opt.consolidate_state_dict(to=0)`` on every rank, then ``opt.state_dict()`` on
    rank 0; load the whole dict on every rank.
    ``"sst_adamw"`` / ``"sst_adamw8bit"`` convert ``model``'s targeted layers to
    ``SpectralLinear`` in place (unless it already has some) and take SST arguments
    (``iteration_length`` ...) as optimizer kwargs.

    Examples
    --------
    >>> opt = create_optimizer(model, "galore_adamw", lr=1e-2, rank=128, scale=0.25)
    >>> trainer = Trainer(model=model, args=args, optimizers=(opt, None), ...)
    """
    opt, summary = create_optimizer_and_summary(
        model, name, target_modules=target_modules, rank=rank,
        update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type,
        embedding_bits=embedding_bits, zero1=zero1, **optimizer_kwargs)
    logger.info(summary)
    return opt


def create_optimizer_and_summary(
    model: nn.Module,
    name: str,
    *,
    target_modules: TargetModules = "all-linear",
    rank: int = UNSET,
    update_proj_gap: int | None = UNSET,
    scale: float = UNSET,
    proj_type: str = "std",
    embedding_bits: int | None = UNSET,
    zero1: bool = False,
    **optimizer_kwargs: Any,
) -> tuple[torch.optim.Optimizer, str]:
    """:func:`create_optimizer` and its summary line, not logged (for callers that add to
    it, such as :func:`trainer_callbacks.attach`, which names where ``lr`` came from)."""
    if not isinstance(name, str):
        raise ValueError(f"Invalid optimizer name={name!r}: pass one of {available()} as a "
                         "string.")
    if not isinstance(model, nn.Module):
        raise ValueError(f"create_optimizer needs the model (a torch.nn.Module), got "
                         f"{type(model).__name__}; for a list of parameters or param groups, "
                         "use the optimizer class directly, e.g. lowrank_optim.GaLoreAdamW.")
    key = name.lower().replace("-", "_")
    if key not in OPTIMIZERS and key not in BASELINES and key not in MODEL_BUILDERS:
        close = difflib.get_close_matches(key, available(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown optimizer name={name!r}; choose one of {available()}.{hint}")
    if not isinstance(zero1, bool):
        raise ValueError(f"Invalid zero1={zero1!r}: pass True (ZeRO-1: state split across "
                         "ranks by whole parameters) or False.")
    if key in BASELINES:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = (distributed.zero1(params, BASELINES[key], name=key, **optimizer_kwargs) if zero1
               else BASELINES[key](params, **optimizer_kwargs))
        summary = (f"lowrank_optim: no projection, {len(params)} tensors "
                   f"({sum(p.numel() for p in params):,} params)")
        return opt, _with_optimizer(summary, key, opt)
    if rank is UNSET:
        rank = RANK_BY_NAME.get(key, DEFAULT_RANK)
    if embedding_bits is UNSET:
        embedding_bits = 32 if _uses_8bit(key, optimizer_kwargs) else None
    if key in MODEL_BUILDERS:
        if zero1:
            distributed.check_zero1(OPTIMIZER_CLASSES_OF_BUILDERS[key], key)
        if update_proj_gap is not UNSET or scale is not UNSET:
            raise ValueError(f"{name!r} takes no update_proj_gap or scale: SST redraws its "
                             "vectors every iteration_length steps (an optimizer argument).")
        check_model_not_partitioned(model, key)  # DeepSpeed ZeRO-3 (zero.Init) slices
        opt = MODEL_BUILDERS[key](model, target_modules=target_modules, rank=rank,
                                  embedding_bits=embedding_bits, **optimizer_kwargs)
        summary = (f"lowrank_optim: SST for {len(spectral_modules(model))} SpectralLinear "
                   f"layers (rank {rank})")
        return opt, _with_optimizer(summary, key, opt)
    proj = {**GALORE_PROJECTION_DEFAULTS, **PROJECTION_DEFAULTS_BY_NAME.get(key, {})}
    if update_proj_gap is not UNSET:
        proj["update_proj_gap"] = update_proj_gap
    if scale is not UNSET:
        proj["scale"] = scale
    _check_keywords(name, OPTIMIZERS[key], optimizer_kwargs)
    groups, summary = param_groups_and_summary(
        model, target_modules, rank=rank, proj_type=proj_type, embedding_bits=embedding_bits,
        **proj)
    kwargs = {**OPTIMIZER_DEFAULTS_BY_NAME.get(key, {}), **optimizer_kwargs}
    opt = (distributed.zero1(groups, OPTIMIZERS[key], name=key, **kwargs) if zero1
           else OPTIMIZERS[key](groups, **kwargs))
    return opt, _with_optimizer(summary, key, opt)


def _with_optimizer(summary: str, key: str, opt: torch.optim.Optimizer) -> str:
    """``summary`` plus the registry name, the class and its learning rate."""
    return f"{summary}; {key} ({type(opt).__name__}) lr={opt.defaults.get('lr')!r}"
