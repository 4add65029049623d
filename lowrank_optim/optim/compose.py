"""``compose(rule, projector)``: an optimizer class for any inner rule and subspace source.

The hand-written classes (:class:`GaLoreAdamW`, :class:`DCTAdamW` ...) are drop-ins with
explicit, peer-compatible signatures.  A new rule or projector does not need one to be usable:
``compose`` builds a :class:`LowRankOptimizer` subclass whose keyword-only hyper-parameters are
the rule's and projector's declared ones (:attr:`Rule.hyperparameters` with
:attr:`Rule.defaults`, :attr:`Projector.hyperparameters`), and
:func:`lowrank_optim.registry.register_rule` makes it a ``create_optimizer`` name.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import torch

from lowrank_optim.optim._hyperparameters import group_defaults
from lowrank_optim.optim.base import PROJECTION_DEFAULTS, LowRankOptimizer
from lowrank_optim.projectors.base import Projector
from lowrank_optim.rules.base import Rule


def compose(rule: type[Rule], projector: type[Projector], name: str | None = None,
            **defaults: Any) -> type[LowRankOptimizer]:
    """A :class:`LowRankOptimizer` class stepping ``rule`` in ``projector``'s subspaces.

    Parameters
    ----------
    rule, projector
        The inner rule and the projector classes (instantiated without arguments).
    name
        Class name (default: ``projector`` name + ``rule`` name, e.g. ``"SVDLion"``).
    **defaults
        Overrides of the hyper-parameter defaults (the rule's :attr:`Rule.defaults`, the
        projection keys' :data:`PROJECTION_DEFAULTS`, the projector's ``defaults``).

    Returns
    -------
    type
        The class; its signature is ``(params, *, <hyper-parameters>, nonfinite="raise")``.
    """
    declared = {*rule.hyperparameters, *projector.hyperparameters}
    unknown = sorted(set(defaults) - declared)
    if unknown:
        raise ValueError(f"compose({rule.__name__}, {projector.__name__}): {unknown} are not "
                         f"hyper-parameters of the rule or the projector ({sorted(declared)}).")
    table = {**PROJECTION_DEFAULTS,
             **projector.defaults, **rule.defaults, **defaults}
    missing = sorted(declared - set(table))
    if missing:
        raise ValueError(f"compose({rule.__name__}, {projector.__name__}): no default for "
                         f"{missing}; declare them in {rule.__name__}.defaults or pass them.")
    values = group_defaults(table, rule, projector)  # declaration order, pairs as tuples

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], *,
                 nonfinite: str = "raise", **kwargs: Any) -> None:
        bad = sorted(set(kwargs) - set(values))
        if bad:
            raise TypeError(f"{type(self).__name__} got unexpected keyword(s) {bad}; it takes "
                            f"{', '.join(values)} and nonfinite.")
        chosen = group_defaults({**values, **kwargs}, rule, projector)
        LowRankOptimizer.__init__(self, params, chosen, rule(), projector(), nonfinite)

    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD)
              for n in ("self", "params")]
    params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v)
               for k, v in values.items()]
    params.append(inspect.Parameter("nonfinite", inspect.Parameter.KEYWORD_ONLY,
                                    default="raise"))
    __init__.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    cls_name = name or f"{projector.__name__.removesuffix('Projector')}{rule.__name__}"
    doc = (f"{rule.__name__} in {projector.__name__}'s subspaces (built by "
           "lowrank_optim.optim.compose).\n\nHyper-parameters (keyword-only, defaults): "
           + ", ".join(f"{k}={v!r}" for k, v in values.items()) + ".")
    return type(cls_name, (LowRankOptimizer,), {
        "__init__": __init__, "__doc__": doc, "projector_type": projector,
        "__module__": rule.__module__})
