"""Model -> param groups, selecting target modules the way HF's ``optim_target_modules`` does."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

from torch import nn

from lowrank_optim.rules.lowbit import BITS
from lowrank_optim.validation import check_int_at_least

logger = logging.getLogger("lowrank_optim")

TargetModules = str | Sequence[str]


#: ``target_modules`` spellings that select every ``nn.Linear`` (normalised: lower case, ``-``)
ALL_LINEAR = "all-linear"
ALL_LINEAR_WITH_HEAD = "all-linear+head"


def _spelling(target: TargetModules) -> str | None:
    return target.replace("_", "-").lower() if isinstance(target, str) else None


def _is_all_linear(target: TargetModules) -> bool:
    return _spelling(target) in (ALL_LINEAR, ALL_LINEAR_WITH_HEAD)


def _matches(target: TargetModules, name: str) -> bool:
    """HF semantics: a string is a full-match regex; a list entry matches by exact name,
    substring or full-match regex."""
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(t == name or t in name or re.fullmatch(t, name) is not None for t in target)


def _output_head_ids(model: nn.Module) -> set[int]:
    """Parameters of the output head (``get_output_embeddings()`` and modules named
    ``lm_head``)."""
    ids: set[int] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if isinstance(head, nn.Module):
        ids.update(id(p) for p in head.parameters())
    for name, module in model.named_modules():
        if name.split(".")[-1] == "lm_head":
            ids.update(id(p) for p in module.parameters())
    return ids


def _left_out_head(model: nn.Module, target: TargetModules) -> set[int]:
    """Head parameters that ``target`` leaves out: the whole output head for ``"all-linear"``
    (peft's convention); for ``"all-linear+head"`` only a head tied to an ``nn.Embedding``
    (the HF Trainer's GaLore selects parameters by name, and a tied head's weight is named
    after the embedding, so it is not projected there either)."""
    spelling = _spelling(target)
    if spelling == ALL_LINEAR:
        return _output_head_ids(model)
    if spelling == ALL_LINEAR_WITH_HEAD:
        return _output_head_ids(model) & embedding_param_ids(model)
    return set()


def select_linear_weights(
    model: nn.Module, target_modules: TargetModules = "all-linear"
) -> tuple[list[tuple[str, nn.Parameter]], list[str]]:
    """``(name, weight)`` of every targeted ``nn.Linear`` and the names of matched modules
    that were ignored because they are not ``nn.Linear``."""
    if not _is_all_linear(target_modules) and not isinstance(target_modules, (str, list, tuple)):
        raise ValueError(
            f"target_modules={target_modules!r}: pass 'all-linear' (or 'all-linear+head' to "
            "project the output head too), a regex string, or a list of module-name substrings "
            "such as ['attn', 'mlp']."
        )
    all_linear = _is_all_linear(target_modules)
    head = _left_out_head(model, target_modules)
    selected, ignored, seen = [], [], set()
    for name, module in model.named_modules():
        if not name:
            continue
        hit = all_linear or _matches(target_modules, name)
        if not isinstance(module, nn.Linear):
            owns_params = any(True for _ in module.parameters(recurse=False))
            if hit and not all_linear and owns_params:
                ignored.append(name)
            continue
        w = module.weight
        if hit and w.requires_grad and id(w) not in head and id(w) not in seen:
            selected.append((f"{name}.weight", w))
            seen.add(id(w))
    return selected, ignored


def _min_side(p: nn.Parameter) -> int:
    """``min(m, n)`` of a weight's full shape: ZeRO-3 partitioned weights (deepspeed.zero.Init)
    are empty 1-D slices with the full shape in ``ds_shape``, so that the optimizer's layout
    check names them instead of "rank exceeds 0"."""
    return min(getattr(p, "ds_shape", p.shape))


def largest_rank(model: nn.Module, target_modules: TargetModules = "all-linear") -> int:
    """The largest rank at which some targeted ``nn.Linear`` weight can be projected: the
    biggest ``min(m, n)`` among them (0 when nothing is targeted)."""
    return max((_min_side(p) for _, p in select_linear_weights(model, target_modules)[0]),
               default=0)


def warn_nothing_projected(rank: int, largest: int) -> None:
    """The one warning for a ``rank`` above every targeted weight's ``min(m, n)``: the model
    then trains unprojected (``param_groups``, ``sst_adamw``)."""
    logger.warning(
        "lowrank_optim: rank=%d exceeds min(m, n) of every targeted weight (largest min "
        "dimension %d), so nothing is projected and every tensor trains with the plain rule "
        "(full-size state); pass rank <= %d to project.", rank, largest, largest)


def embedding_param_ids(model: nn.Module) -> set[int]:
    """``id`` of every ``nn.Embedding`` weight of ``model`` (a tied output head included)."""
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def plain_groups(
    model: nn.Module, rest: list[tuple[str, nn.Parameter]], embedding_bits: int | None = None
) -> list[dict[str, Any]]:
    """The unprojected param groups of ``rest`` (``(name, param)`` pairs).

    ``embedding_bits=32`` puts ``nn.Embedding`` weights in a group of their own with
    ``bits=32`` (32-bit moments whatever the optimizer's ``bits``): the established practice
    for 8-bit optimizers (the HF Trainer registers this override with bitsandbytes for every
    ``nn.Embedding``), because an embedding row only gets a gradient when its token is in the
    batch.  ``None`` keeps them with the other tensors.
    """
    if embedding_bits is not None:
        if isinstance(embedding_bits, bool) or embedding_bits not in BITS:
            raise ValueError(f"Invalid embedding_bits={embedding_bits!r}: choose 32 (32-bit "
                             "moments for nn.Embedding weights), 8, or None (follow `bits`).")
    emb = embedding_param_ids(model) if embedding_bits is not None else set()
    split = [[(n, p) for n, p in rest if id(p) not in emb], [(n, p) for n, p in rest
                                                               if id(p) in emb]]
    groups = []
    for pairs, extra in zip(split, ({}, {"bits": embedding_bits}), strict=True):
        if pairs:
            groups.append({"params": [p for _, p in pairs],
                           "param_names": [n for n, _ in pairs], **extra})
    return groups


def _explain_no_selection(model: nn.Module, target_modules: TargetModules) -> None:
    """Raise the precise reason when no weight was selected for a reason other than names:
    nothing trainable at all, or every targeted Linear frozen."""
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            f"{type(model).__name__} has no trainable parameters (every requires_grad is "
            "False); unfreeze the weights to train (e.g. model.requires_grad_(True)), or, for "
            "adapters, build the optimizer after peft has marked its trainable parameters.")
    head = _left_out_head(model, target_modules)
    frozen = [n for n, m in model.named_modules()
              if isinstance(m, nn.Linear) and id(m.weight) not in head and n
              and (_is_all_linear(target_modules) or _matches(target_modules, n))
              and not m.weight.requires_grad]
    if frozen:
        raise ValueError(
            f"target_modules={target_modules!r} matched {len(frozen)} nn.Linear modules, but "
            f"their weights are frozen (requires_grad=False), e.g. {frozen[0]!r}; unfreeze "
            "them, or target the trainable ones.")


def param_groups(
    model: nn.Module,
    target_modules: TargetModules = "all-linear",
    *,
    rank: int = 128,
    update_proj_gap: int | None = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    embedding_bits: int | None = None,
    **group_kwargs: Any,
) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters into a projected group and a plain group.

    Parameters
    ----------
    model
        Any ``nn.Module``; only ``nn.Linear`` weights are projected.
    target_modules
        ``"all-linear"``: every ``nn.Linear`` except the output head (``lm_head``), as peft's
        ``"all-linear"`` and the GaLore paper (which projects attention and MLP weights);
        ``"all-linear+head"``: the head too unless it is tied to the embedding, which is what
        the HF Trainer's GaLore selects for ``optim_target_modules="all-linear"``.  Otherwise
        a regex matched against full module names, or a list of names / substrings / regexes,
        with the semantics of HF's ``TrainingArguments.optim_target_modules``.
    rank, update_proj_gap, scale, proj_type
        Projection settings of the projected group (paper defaults for LLaMA pretraining:
        scale 0.25, gap 200).
    embedding_bits
        ``32``: ``nn.Embedding`` weights get a group of their own with ``bits=32`` (32-bit
        moments under an 8-bit optimizer, see :func:`plain_groups`; what
        :func:`~lowrank_optim.create_optimizer` does for 8-bit optimizers); ``None`` (default)
        leaves them in the plain group.
    **group_kwargs
        Extra keys for the projected group only (e.g. a different ``lr``).

    Linear weights whose smaller side is below ``rank`` cannot be projected at that rank; they
    go to the plain group (and the summary line says so) instead of failing the whole model.
    When that is every targeted weight, nothing is projected (a warning says so and names the
    largest rank that would project).

    Returns
    -------
    list of dict
        Param groups with ``param_names`` (used in error messages and logs).  One summary line
        is logged to the ``lowrank_optim`` logger instead of a warning per module.
    """
    groups, summary = param_groups_and_summary(
        model, target_modules, rank=rank, update_proj_gap=update_proj_gap, scale=scale,
        proj_type=proj_type, embedding_bits=embedding_bits, **group_kwargs)
    logger.info(summary)
    return groups


def param_groups_and_summary(
    model: nn.Module,
    target_modules: TargetModules = "all-linear",
    *,
    rank: int = 128,
    update_proj_gap: int | None = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    embedding_bits: int | None = None,
    **group_kwargs: Any,
) -> tuple[list[dict[str, Any]], str]:
    """:func:`param_groups` and its summary line, not logged (for callers that add to it)."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}; pass "
                         "the model itself (param groups are built from its modules).")
    check_int_at_least("rank", rank, 1)
    selected, ignored = select_linear_weights(model, target_modules)
    too_small = [(n, p) for n, p in selected if _min_side(p) < rank]
    selected = [(n, p) for n, p in selected if _min_side(p) >= rank]
    if not selected and too_small:
        warn_nothing_projected(rank, max(_min_side(p) for _, p in too_small))
    elif not selected:
        _explain_no_selection(model, target_modules)
        linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:8]
        raise ValueError(
            f"target_modules={target_modules!r} matched no nn.Linear weight. Linear modules in "
            f"this model are named like {linear}; pass substrings of those names or 'all-linear'."
        )
    chosen = {id(p) for _, p in selected}
    rest: list[tuple[str, nn.Parameter]] = []
    seen = set(chosen)
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            rest.append((name, p))
            seen.add(id(p))
    groups = [{
        "params": [p for _, p in selected],
        "param_names": [n for n, _ in selected],
        "rank": rank, "update_proj_gap": update_proj_gap, "scale": scale, "proj_type": proj_type,
        **group_kwargs,
    }] if selected else []
    groups += plain_groups(model, rest, embedding_bits)
    n_low = sum(p.numel() for _, p in selected)
    n_rest = sum(p.numel() for _, p in rest)
    summary = (f"lowrank_optim: rank-{rank} projection for {len(selected)} Linear weights "
               f"({n_low:,} params); {len(rest)} other tensors ({n_rest:,} params) unprojected")
    if too_small:
        summary += (f", {len(too_small)} of them Linear weights with min(m, n) < rank={rank} "
                    f"(e.g. {too_small[0][0]})")
    if ignored:
        summary += f"; ignored {len(ignored)} matched non-Linear modules (e.g. {ignored[0]})"
    return groups, summary

