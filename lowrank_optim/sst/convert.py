"""Model surgery for SST: ``nn.Linear`` -> :class:`SpectralLinear` and back.

Export: :func:`merge` turns every ``SpectralLinear`` back into an ``nn.Linear`` holding
``U diag(S) V^T``, after which ``model.save_pretrained(dir)`` writes an ordinary checkpoint that
``AutoModelForCausalLM.from_pretrained(dir)`` (or the model class) loads with no SST code.  To
save *training* state instead, save the converted model as it is (``save_pretrained`` or
``state_dict``): its keys are ``<module>.U``, ``.S`` and ``.V``; reload by building the model
from its config, calling :func:`convert` with the same ``target_modules`` (this only creates the
structure) and then ``load_state_dict`` with the saved tensors.
"""

from __future__ import annotations

import logging

from torch import nn

from lowrank_optim.groups import TargetModules, select_linear_weights
from lowrank_optim.sst.layers import SpectralLinear
from lowrank_optim.validation import check_int_at_least

logger = logging.getLogger("lowrank_optim")


def spectral_modules(model: nn.Module) -> list[tuple[str, SpectralLinear]]:
    """``(name, module)`` for every :class:`SpectralLinear` in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SpectralLinear)]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _shared_weight_names(model: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def convert(
    model: nn.Module,
    *,
    rank: int | None = None,
    target_modules: TargetModules = "all-linear",
    enhanced_grad: bool = True,
    skip_below_rank: bool = False,
) -> nn.Module:
    """Replace the targeted ``nn.Linear`` layers of ``model`` by exact :class:`SpectralLinear` ones.

    Parameters
    ----------
    model
        Any module (e.g. a Hugging Face ``LlamaForCausalLM``); changed in place.
    rank
        The SST rank (number of singular-vector pairs trained per iteration).  Checked against
        every converted layer (``1 <= rank <= min(in, out)``) and stored on it as the default of
        :func:`lowrank_optim.optim.sst.sst_param_groups`.  ``None`` leaves it to the optimizer.
    target_modules
        ``"all-linear"`` (every ``nn.Linear`` except the output head), a full-match regex, or a
        list of names / substrings / regexes: the semantics of HF's ``optim_target_modules``
        (see :func:`lowrank_optim.groups.select_linear_weights`).
    enhanced_grad
        See :class:`SpectralLinear`.
    skip_below_rank
        Leave targeted layers whose ``min(in, out)`` is below ``rank`` as ``nn.Linear``
        (logged) instead of raising; what ``create_optimizer(model, "sst_adamw")`` does, as
        GaLore's groups keep such weights unprojected.

    Returns
    -------
    nn.Module
        ``model`` itself (a bare ``nn.Linear`` is returned converted).

    Raises
    ------
    ValueError
        If ``rank`` is not an integer in ``[1, min(in, out)]`` for some target, if a target is
        not an ``nn.Linear``, if a target's weight is shared with another module (tied
        weights), or if nothing matched.
    """
    if rank is not None:
        check_int_at_least("rank", rank, 1)
    if isinstance(model, nn.Linear):
        _check_rank(rank, model, "the given nn.Linear")
        return SpectralLinear.from_linear(model, rank=rank, enhanced_grad=enhanced_grad)
    selected, ignored = select_linear_weights(model, target_modules)
    if ignored:
        raise ValueError(
            f"target_modules={target_modules!r} matched modules that are not nn.Linear: "
            f"{ignored[:5]} ({type(model.get_submodule(ignored[0])).__name__}). SST converts "
            "nn.Linear layers only: narrow target_modules (e.g. ['q_proj', 'v_proj'] or "
            "'all-linear')."
        )
    if not selected:
        raise ValueError(
            f"target_modules={target_modules!r} matched no trainable nn.Linear in this model; "
            "pass substrings of its Linear module names or 'all-linear'."
        )
    small = []
    if skip_below_rank and rank is not None:
        small = [n for n, w in selected if min(w.shape) < rank]
        selected = [(n, w) for n, w in selected if min(w.shape) >= rank]
    shared = _shared_weight_names(model)
    for weight_name, weight in selected:
        if len(shared[id(weight)]) > 1:
            raise ValueError(
                f"{weight_name} is tied to {[n for n in shared[id(weight)] if n != weight_name]}; "
                "SST cannot convert a shared weight. Leave it out of target_modules."
            )
        _check_rank(rank, model.get_submodule(weight_name.removesuffix(".weight")), weight_name)
    for weight_name, _ in selected:
        name = weight_name.removesuffix(".weight")
        linear = model.get_submodule(name)
        _set_submodule(model, name, SpectralLinear.from_linear(
            linear, rank=rank, enhanced_grad=enhanced_grad))
    logger.info("lowrank_optim.sst: converted %d nn.Linear layers to SpectralLinear (rank %s)%s",
                len(selected), rank, f"; {len(small)} with min(in, out) < rank left as "
                f"nn.Linear (e.g. {small[0]})" if small else "")
    return model


def _check_rank(rank: int | None, linear: nn.Linear, label: str) -> None:
    k = min(linear.in_features, linear.out_features)
    if rank is not None and rank > k:
        raise ValueError(
            f"{label}: rank={rank} exceeds its number of singular values k=min(in, out)={k}. "
            f"Use rank <= {k} or leave this layer out of target_modules."
        )


def merge(model: nn.Module) -> nn.Module:
    """Replace every :class:`SpectralLinear` in ``model`` by the equivalent ``nn.Linear``.

    Use before inference or export (``save_pretrained``): the result has the original module
    structure and state-dict keys.  Returns ``model`` (a bare ``SpectralLinear`` is returned
    as an ``nn.Linear``).
    """
    if isinstance(model, SpectralLinear):
        return model.to_linear()
    for name, module in spectral_modules(model):
        _set_submodule(model, name, module.to_linear())
    return model
