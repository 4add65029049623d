"""One-line ways to put a lowrank-optim optimizer and its callbacks into a Hugging Face Trainer.

Three routes, from the least to the most wiring:

* ``Trainer(..., optimizers=(create_optimizer(model, name, ...), None))`` -- plain torch swap.
* ``Trainer(..., optimizer_cls_and_kwargs=(LowRankOptimizerFactory, {"name": ..., ...}))`` --
  the Trainer builds the optimizer from its model when it needs it.
* :func:`lowrank_trainer_kwargs` (splat into ``Trainer(...)``) or :func:`attach` (on an
  existing Trainer, before ``train()``) -- optimizer plus callbacks, optionally layer-wise.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from lowrank_optim.layerwise import LayerwiseOptimizer
from lowrank_optim.optim.base import LowRankOptimizer
from lowrank_optim.optim.sst import SSTAdamW
from lowrank_optim.registry import (
    BASELINES,
    MODEL_BUILDERS,
    OPTIMIZERS,
    available,
    create_optimizer,
    create_optimizer_and_summary,
)
from trainer_callbacks._common import (
    LoggingCallback,
    check_bool,
    check_real,
    did_you_mean,
    innermost_optimizer,
    logger,
    lowrank_optimizer,
)
from trainer_callbacks.layerwise import LayerwiseCallback
from trainer_callbacks.memory import OptimizerMemoryCallback
from trainer_callbacks.refresh import Schedule, SubspaceRefreshCallback, check_schedulable
from trainer_callbacks.stats import SubspaceStatsCallback

#: arguments of :func:`attach` / :func:`lowrank_trainer_kwargs` that are not optimizer
#: arguments (passed to the factory or as optimizer keywords they would be rejected late)
CALLBACK_ARGUMENTS = ("refresh", "memory", "stats", "layerwise", "max_grad_norm")


def resolve_name(name: Any) -> str:
    """Registry key of optimizer ``name`` (case and ``-``/``_`` insensitive).

    Raises
    ------
    TypeError
        ``name`` is not a string.
    ValueError
        Unknown name; the message suggests the closest registered names.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be an optimizer name such as 'galore_adamw', got "
                        f"{type(name).__name__} {name!r}.")
    key = name.lower().replace("-", "_")
    names = available()
    if key not in names:
        raise ValueError(f"Unknown optimizer name={name!r}.{did_you_mean(key, names)} "
                         f"Choose one of {names}.")
    return key


def optimizer_class(key: str) -> type:
    """The optimizer class :func:`create_optimizer` builds for registry key ``key``."""
    if key in MODEL_BUILDERS:
        return SSTAdamW
    return {**OPTIMIZERS, **BASELINES}[key]


def _keywords(fn: Any, skip: tuple[str, ...]) -> tuple[set[str], bool]:
    """Keyword names ``fn`` accepts (minus ``skip``), and whether it takes ``**kwargs``."""
    params = inspect.signature(fn).parameters.values()
    names = {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return names - set(skip), any(p.kind is p.VAR_KEYWORD for p in params)


def check_optimizer_kwargs(key: str, kwargs: dict[str, Any], *, where: str) -> None:
    """``ValueError`` for a keyword that optimizer ``key`` does not take, with the closest
    accepted names, before anything is built (``sst_*`` would convert the model first).

    ``where`` names the entry point in the message (``"attach()"``, ...).
    """
    for arg in kwargs:
        if arg in CALLBACK_ARGUMENTS:
            raise ValueError(f"{arg}= is an argument of trainer_callbacks.attach() and "
                            f"lowrank_trainer_kwargs(), not an optimizer argument: {where} "
                            "only builds the optimizer.")
    cls = optimizer_class(key)
    accepted, open_ended = _keywords(cls.__init__, ("self", "params"))
    if key in MODEL_BUILDERS:
        builder, _ = _keywords(MODEL_BUILDERS[key], ("model",))
        accepted |= builder
    if open_ended:
        return
    accepted |= _keywords(create_optimizer, ("model", "name"))[0]  # projection settings
    for arg in kwargs:
        if arg not in accepted:
            raise ValueError(f"{where}: optimizer {key!r} ({cls.__name__}) takes no argument "
                            f"{arg!r}.{did_you_mean(arg, accepted)} It takes "
                            f"{sorted(accepted)}.")


def takes_relative_step(key: str) -> bool:
    """Whether optimizer ``key`` has Adafactor's ``relative_step`` (its own step size)."""
    return "relative_step" in _keywords(optimizer_class(key).__init__, ("self", "params"))[0]


def trainer_style(key: str, kwargs: dict[str, Any],
                  learning_rate: float | None) -> tuple[dict[str, Any], str]:
    """Optimizer keywords as the Trainer gives its own optimizers, and a note on them for the
    summary line.

    ``lr`` defaults to ``learning_rate`` (``TrainingArguments.learning_rate``; ``None``: no
    default).  Adafactor-type optimizers (``galore_adafactor``, ``dct_adafactor``) given a
    learning rate get ``relative_step=False, scale_parameter=False`` unless set, as the
    Trainer's ``optim="adafactor"`` / ``"galore_adafactor"`` do; ``relative_step=True`` keeps
    Adafactor's own step size and then no ``lr`` is added.
    """
    out = dict(kwargs)
    adafactor = takes_relative_step(key)
    if adafactor and out.get("relative_step") is True:
        return out, "lr from Adafactor's relative step (relative_step=True)"
    note = "lr given"
    if "lr" not in out and learning_rate is not None:
        out["lr"] = learning_rate
        note = "lr from TrainingArguments.learning_rate"
    if adafactor and out.get("lr") is not None:
        added = [k for k in ("relative_step", "scale_parameter") if k not in out]
        for k in added:
            out[k] = False
        if added:
            note += f"; {', '.join(f'{k}=False' for k in added)} as the Trainer's own Adafactor"
    return out, note


def build_optimizer(model: nn.Module, key: str, kwargs: dict[str, Any], note: str) -> Any:
    """``create_optimizer(model, key, **kwargs)``, its summary line logged with ``note``."""
    opt, summary = create_optimizer_and_summary(model, key, **kwargs)
    logger.info("%s (%s)", summary, note)
    return opt


def _check_model(model: Any, where: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where} needs the torch.nn.Module to optimize, got "
                        f"{type(model).__name__}.")


class LowRankOptimizerFactory:
    """Optimizer factory for ``Trainer(optimizer_cls_and_kwargs=(LowRankOptimizerFactory, {...}))``.

    The Trainer treats a first element that is not a ``torch.optim.Optimizer`` subclass as a
    factory: it instantiates it without arguments and calls it with ``(model, **kwargs)``.
    ``kwargs`` are those of :func:`lowrank_optim.create_optimizer` (``name`` included); the
    Trainer adds nothing, so ``lr`` is required (the optimizer's own default would silently
    replace ``TrainingArguments.learning_rate``), except for Adafactor-type optimizers given
    ``relative_step=True`` (Adafactor's own step size).  With an ``lr``, Adafactor-type
    optimizers get ``relative_step=False, scale_parameter=False`` unless set, as the Trainer's
    ``optim="galore_adafactor"``.

    Raises
    ------
    TypeError
        ``model`` is not an ``nn.Module`` or ``name`` is not a string.
    ValueError
        Unknown ``name`` (closest names suggested), an argument the optimizer does not take
        (callback arguments such as ``refresh`` included; closest names suggested), or ``lr``
        missing.

    Examples
    --------
    >>> Trainer(model=model, args=args, train_dataset=ds, optimizer_cls_and_kwargs=(
    ...     LowRankOptimizerFactory, {"name": "galore_adamw", "rank": 128, "lr": 1e-2}))
    """

    def __call__(self, model: nn.Module, name: str = "galore_adamw",
                 **kwargs: Any) -> Any:
        _check_model(model, "LowRankOptimizerFactory")
        key = self.check(name, kwargs)
        kwargs, note = trainer_style(key, kwargs, None)
        return build_optimizer(model, key, kwargs, note)

    @staticmethod
    def check(name: Any, kwargs: dict[str, Any]) -> str:
        """Validate ``name`` and ``kwargs`` as the factory receives them; returns the registry
        key.  :func:`attach` calls this on ``optimizer_cls_and_kwargs`` so that a mistake shows
        at attach time rather than inside ``train()``."""
        key = resolve_name(name)
        check_optimizer_kwargs(key, kwargs, where="LowRankOptimizerFactory")
        own_step = takes_relative_step(key) and kwargs.get("relative_step") is True
        if "lr" not in kwargs and not own_step:
            extra = (" (or 'relative_step': True for Adafactor's own step size)"
                     if takes_relative_step(key) else "")
            raise ValueError(
                "LowRankOptimizerFactory needs lr in its kwargs: the Trainer passes "
                "TrainingArguments.learning_rate only to its own optimizers, so without it "
                f"{optimizer_class(key).__name__}'s default would be used silently. Add "
                f"'lr': args.learning_rate to the dict{extra}.")
        return key


def _callbacks(
    refresh: SubspaceRefreshCallback | Schedule | dict | str | int | None,
    memory: bool,
    stats: bool,
    layerwise: bool,
) -> list[TrainerCallback]:
    out: list[TrainerCallback] = []
    if refresh is not None:
        out.append(refresh if isinstance(refresh, SubspaceRefreshCallback)
                   else SubspaceRefreshCallback(refresh))
    if memory:
        out.append(OptimizerMemoryCallback())
    if stats:
        out.append(SubspaceStatsCallback())
    if layerwise:
        out.append(LayerwiseCallback())
    return out


def _check_settings(memory: Any, stats: Any, layerwise: Any, max_grad_norm: Any) -> None:
    """Types of the callback switches, and ``max_grad_norm`` (layer-wise only)."""
    for flag, value in (("memory", memory), ("stats", stats), ("layerwise", layerwise)):
        check_bool(flag, value)
    if max_grad_norm is None:
        return
    if not layerwise:
        raise ValueError("max_grad_norm here is the per-parameter clipping of layer-wise mode; "
                         "without layerwise=True use TrainingArguments(max_grad_norm=...).")
    value = check_real("max_grad_norm", max_grad_norm)
    if not value > 0 or value == float("inf"):
        raise ValueError(f"Invalid max_grad_norm={max_grad_norm!r}: must be a finite number "
                         "> 0 (None: no clipping).")


def _check_combination(cls: type, label: str, callbacks: list[TrainerCallback],
                       stats: bool, layerwise: bool, optimizer_kwargs: dict[str, Any]) -> None:
    """Optimizer class ``cls`` (``label``: how the user named it) against the callbacks."""
    refresh = next((c for c in callbacks if isinstance(c, SubspaceRefreshCallback)), None)
    lowrank = issubclass(cls, LowRankOptimizer)
    if refresh is not None:
        if not lowrank:
            raise ValueError(
                f"refresh={refresh.schedule!r} schedules subspace refreshes, but {label} "
                f"({cls.__name__}) has no subspaces: drop refresh, or use a low-rank optimizer "
                "(galore_*, dct_*).")
        check_schedulable(cls, who=f"refresh={type(refresh.schedule).__name__}(...)")
        gap = optimizer_kwargs.get("update_proj_gap")
        if gap is not None and gap != refresh.schedule.initial_gap():
            # a warning, not an error: configurations shared between runs with and without a
            # schedule pass both, and the schedule's documented precedence is well defined
            logger.warning(
                "update_proj_gap=%r is ignored: refresh=%r owns the refresh timing (the "
                "optimizer's own gap is switched off at train begin). Drop update_proj_gap, "
                "or set the gap in the schedule.", gap, refresh.schedule)
    if stats and not lowrank:
        raise ValueError(f"stats=True logs subspace statistics, but {label} ({cls.__name__}) "
                         "projects nothing: drop stats=True or use a low-rank optimizer.")
    if layerwise and (not lowrank or not cls.projector_type.layerwise):
        raise ValueError(
            f"layerwise=True steps each parameter during backward, which {label} "
            f"({cls.__name__}) cannot do (layer-wise mode needs a LowRankOptimizer whose "
            "parameters step independently: galore_*, dct_*); drop layerwise=True.")


def _optimizer(model: nn.Module, key: str, note: str, layerwise: bool,
               max_grad_norm: float | None, kwargs: dict[str, Any],
               accumulation: int = 1) -> Any:
    opt = build_optimizer(model, key, kwargs, note)
    if layerwise:
        return LayerwiseOptimizer(opt, max_grad_norm=max_grad_norm,
                                  gradient_accumulation_steps=accumulation)
    return opt


def lowrank_trainer_kwargs(
    model: nn.Module,
    name: str,
    *,
    args: Any = None,
    refresh: SubspaceRefreshCallback | Schedule | dict | str | int | None = None,
    memory: bool = True,
    stats: bool = False,
    layerwise: bool = False,
    max_grad_norm: float | None = None,
    **optimizer_kwargs: Any,
) -> dict[str, Any]:
    """``{"optimizers": (optimizer, None), "callbacks": [...]}`` to splat into ``Trainer``.

    Parameters
    ----------
    model, name, optimizer_kwargs
        As for :func:`lowrank_optim.create_optimizer` (``rank``, ``target_modules``, ``lr``,
        ...), completed as the Trainer completes its own optimizers' (:func:`trainer_style`):
        ``lr`` defaults to ``args.learning_rate`` when ``args`` is given, and Adafactor-type
        optimizers with an ``lr`` get ``relative_step=False, scale_parameter=False``.
    args
        The ``TrainingArguments`` (optional; only read for the default ``lr``).
    refresh
        A refresh schedule (see :mod:`trainer_callbacks.refresh`) or a ready
        :class:`SubspaceRefreshCallback`; ``None`` keeps the optimizer's ``update_proj_gap``.
    memory, stats
        Add :class:`OptimizerMemoryCallback` / :class:`SubspaceStatsCallback`.  Passed this
        way they are not bound to the Trainer, so their metrics reach ``log_history`` but not
        the ``report_to`` integrations; use :func:`attach` for those.
    layerwise, max_grad_norm
        Wrap the optimizer in :class:`LayerwiseOptimizer` (per-parameter clipping at
        ``max_grad_norm``) and add :class:`LayerwiseCallback`.

    Raises
    ------
    TypeError, ValueError
        As :func:`attach` for the same arguments (``model`` must be an ``nn.Module``, ``args``
        a ``TrainingArguments``), before the optimizer is built.  A conflict with
        ``TrainingArguments.max_grad_norm`` in layer-wise mode is raised by
        :class:`LayerwiseCallback` at train begin.

    Examples
    --------
    >>> trainer = Trainer(model=model, args=args, train_dataset=ds,
    ...                   **lowrank_trainer_kwargs(model, "galore_adamw", args=args, rank=128))
    """
    _check_model(model, "lowrank_trainer_kwargs")
    key = resolve_name(name)
    _check_settings(memory, stats, layerwise, max_grad_norm)
    if args is not None and not hasattr(args, "learning_rate"):
        raise TypeError(f"args must be the transformers.TrainingArguments, got "
                        f"{type(args).__name__}.")
    check_optimizer_kwargs(key, optimizer_kwargs, where="lowrank_trainer_kwargs()")
    optimizer_kwargs, note = trainer_style(key, optimizer_kwargs,
                                           getattr(args, "learning_rate", None))
    callbacks = _callbacks(refresh, memory, stats, layerwise)  # checks the schedule
    _check_combination(optimizer_class(key), repr(name), callbacks, stats, layerwise,
                       optimizer_kwargs)
    accumulation = getattr(args, "gradient_accumulation_steps", 1) if layerwise else 1
    opt = _optimizer(model, key, note, layerwise, max_grad_norm, optimizer_kwargs, accumulation)
    return {"optimizers": (opt, None), "callbacks": callbacks}


#: set on a Trainer by :func:`attach` (a second call would stack callbacks and hooks)
_ATTACHED = "_lowrank_optim_attached"


def _planned_optimizer(trainer: Trainer) -> tuple[type | None, str]:
    """Class of the optimizer ``trainer`` has or will build, and how to name it in messages;
    ``(None, ...)`` when it cannot be known before ``train()`` (a subclass's own
    ``create_optimizer``)."""
    if trainer.optimizer is not None:
        inner = lowrank_optimizer(trainer.optimizer) or innermost_optimizer(trainer.optimizer)
        return type(inner), "the Trainer's optimizer"
    spec = getattr(trainer, "optimizer_cls_and_kwargs", None)
    if spec is not None:
        cls, kwargs = spec
        if cls is LowRankOptimizerFactory:
            key = LowRankOptimizerFactory.check(dict(kwargs).get("name", "galore_adamw"),
                                                {k: v for k, v in kwargs.items() if k != "name"})
            return optimizer_class(key), repr(key)
        return (cls if isinstance(cls, type) else None), "optimizer_cls_and_kwargs"
    if type(trainer).create_optimizer is not Trainer.create_optimizer:
        return None, "the Trainer subclass's optimizer"
    optim = getattr(trainer.args.optim, "value", trainer.args.optim)
    return torch.optim.Optimizer, f"the optimizer the Trainer builds (optim={optim!r})"


def _check_trainer(trainer: Any, name: str | None, callbacks: list[TrainerCallback]) -> None:
    """What :func:`attach` refuses about the Trainer itself."""
    if not isinstance(trainer, Trainer):
        hint = (" For a model, use Trainer(..., **lowrank_trainer_kwargs(model, name, ...))."
                if isinstance(trainer, nn.Module) else "")
        raise TypeError(f"attach() takes a transformers.Trainer, got "
                        f"{type(trainer).__name__}.{hint}")
    if getattr(trainer, _ATTACHED, False):
        raise ValueError("attach() was already called on this Trainer: a second call would add "
                         "its callbacks twice (and, layer-wise, a second set of per-parameter "
                         "hooks). Call attach() once with every setting, on a new Trainer.")
    present = {type(c) for c in trainer.callback_handler.callbacks}
    twice = [type(c).__name__ for c in callbacks if type(c) in present]
    if twice:
        flags = {"SubspaceRefreshCallback": "refresh=None", "OptimizerMemoryCallback":
                 "memory=False", "SubspaceStatsCallback": "stats=False",
                 "LayerwiseCallback": "drop layerwise=True"}
        raise ValueError(f"The Trainer already has a {twice[0]} (from Trainer(callbacks=...) "
                         f"or lowrank_trainer_kwargs); pass {flags[twice[0]]} to attach().")
    if name is None:
        return
    if trainer.optimizer is not None:
        raise ValueError(
            f"attach(trainer, {name!r}) would replace the optimizer the Trainer already has "
            f"({type(innermost_optimizer(trainer.optimizer)).__name__}, from "
            "Trainer(optimizers=...) or a create_optimizer()/train() call; an LR scheduler "
            "built on it would keep driving the old one). Call attach(trainer) without a name "
            "to keep it, or attach to a Trainer that has no optimizer yet.")
    if getattr(trainer, "optimizer_cls_and_kwargs", None) is not None:
        raise ValueError(f"attach(trainer, {name!r}) conflicts with "
                         "Trainer(optimizer_cls_and_kwargs=...): pick one way to build the "
                         "optimizer.")
    if getattr(trainer.args, "optim_target_modules", None) is not None:
        raise ValueError(f"attach(trainer, {name!r}) conflicts with TrainingArguments("
                         "optim_target_modules=...), which configures transformers' own GaLore "
                         "(that attach() would replace): drop one of the two.")


def _trainer_optimizer(trainer: Any, callbacks: list[TrainerCallback], stats: bool,
                       layerwise: bool, max_grad_norm: float | None) -> Any:
    """The optimizer given as ``Trainer(optimizers=(opt, None))`` (or the one the Trainer will
    build), checked against the callbacks; wrapped for layer-wise mode.  Changes nothing."""
    optimizer = trainer.optimizer
    if layerwise and optimizer is None:
        raise ValueError("attach(trainer, layerwise=True) needs an optimizer name or a "
                         "Trainer created with optimizers=(opt, None).")
    cls, label = _planned_optimizer(trainer)
    if cls is not None:
        _check_combination(cls, label, callbacks, stats, layerwise, {})
    if not layerwise:
        return optimizer
    if isinstance(optimizer, LayerwiseOptimizer):
        if max_grad_norm is not None:
            raise ValueError("The Trainer's optimizer is already a LayerwiseOptimizer: "
                             "set its max_grad_norm there, not in attach().")
        return optimizer
    if not isinstance(optimizer, LowRankOptimizer):
        raise ValueError(
            f"attach(trainer, layerwise=True): the Trainer's optimizer is wrapped "
            f"({type(optimizer).__name__}), as after train(); call attach() before "
            "train(), on the optimizer given as Trainer(optimizers=(opt, None)).")
    return LayerwiseOptimizer(optimizer, max_grad_norm=max_grad_norm,
                              gradient_accumulation_steps=trainer.args.gradient_accumulation_steps)


def _ddp_without_unused_search(trainer: Any) -> None:
    """Layer-wise DDP needs ``find_unused_parameters=False``.  The Trainer turns it on by
    default for a model without activation checkpointing (a guess, not the user's choice): turn
    it off then; refuse an explicit ``ddp_find_unused_parameters=True``."""
    if getattr(trainer.args, "world_size", 1) <= 1:
        return
    handler = getattr(getattr(trainer, "accelerator", None), "ddp_handler", None)
    if trainer.args.ddp_find_unused_parameters:
        raise ValueError(
            "layerwise=True with TrainingArguments(ddp_find_unused_parameters=True): a "
            "parameter steps as soon as its gradient bucket is all-reduced, before DDP could "
            "know which parameters went unused; set ddp_find_unused_parameters=False.")
    if handler is not None:
        handler.find_unused_parameters = False


def attach(
    trainer: Any,
    name: str | None = None,
    *,
    refresh: SubspaceRefreshCallback | Schedule | dict | str | int | None = None,
    memory: bool = True,
    stats: bool = False,
    layerwise: bool = False,
    max_grad_norm: float | None = None,
    **optimizer_kwargs: Any,
) -> list[TrainerCallback]:
    """Give an existing Trainer a lowrank-optim optimizer and callbacks (call before ``train``).

    With ``name``, builds ``create_optimizer(trainer.model, name, **optimizer_kwargs)`` the
    way the Trainer builds its own optimizers (:func:`trainer_style`: ``lr`` defaults to
    ``trainer.args.learning_rate``; Adafactor-type optimizers get ``relative_step=False,
    scale_parameter=False`` unless set) and installs it as the Trainer's optimizer (the
    summary line on the ``lowrank_optim`` logger names the learning rate and its source);
    without, keeps the optimizer given as ``Trainer(optimizers=(opt, None))``.  Logging
    callbacks are bound to the Trainer (placed before its integrations), so their keys join
    the Trainer's own log rows for every ``report_to`` integration and the console.  Other
    arguments as in :func:`lowrank_trainer_kwargs`.

    Returns
    -------
    list of TrainerCallback
        The callbacks added.

    Raises
    ------
    TypeError
        ``trainer`` is not a ``transformers.Trainer``; a switch (``memory``, ``stats``,
        ``layerwise``) is not a bool.
    ValueError
        Unknown ``name`` or an optimizer argument the optimizer does not take (closest names
        suggested); attach() already called on this Trainer,
        or a callback it would add already present; ``name`` given to a Trainer that already
        has an optimizer (``optimizers=``, ``optimizer_cls_and_kwargs=``, a previous
        ``create_optimizer()``) or ``optim_target_modules``; ``layerwise=True`` with
        ``TrainingArguments.max_grad_norm > 0``; ``max_grad_norm`` without layer-wise mode;
        ``refresh``/``stats``/``layerwise`` with an optimizer that cannot serve them.  Every
        check runs before the Trainer (or the model) is changed.  An ``update_proj_gap``
        differing from the ``refresh`` schedule's gap is logged as a warning (the schedule
        wins).

    Examples
    --------
    >>> trainer = Trainer(model=model, args=args, train_dataset=ds)
    >>> attach(trainer, "galore_adamw", rank=128, refresh=AdaptiveGap(gap=200), stats=True)
    >>> trainer.train()
    """
    _check_settings(memory, stats, layerwise, max_grad_norm)
    callbacks = _callbacks(refresh, memory, stats, layerwise)  # checks the schedule
    _check_trainer(trainer, name, callbacks)
    args = trainer.args
    if layerwise and args.max_grad_norm is not None and args.max_grad_norm > 0:
        raise ValueError(
            f"layerwise=True with TrainingArguments(max_grad_norm={args.max_grad_norm}): the "
            "Trainer would clip by the global norm after backward, when layer-wise mode has "
            "already used and freed every gradient. Set TrainingArguments(max_grad_norm=0) and "
            "pass attach(..., layerwise=True, max_grad_norm=...) for per-parameter clipping.")
    if name is not None:
        key = resolve_name(name)
        check_optimizer_kwargs(key, optimizer_kwargs, where="attach()")
        optimizer_kwargs, note = trainer_style(key, optimizer_kwargs, args.learning_rate)
        _check_combination(optimizer_class(key), repr(name), callbacks, stats, layerwise,
                           optimizer_kwargs)
        optimizer = _optimizer(trainer.model, key, note, layerwise, max_grad_norm,
                               optimizer_kwargs, args.gradient_accumulation_steps)
    else:
        if optimizer_kwargs:
            raise ValueError(f"Optimizer arguments {sorted(optimizer_kwargs)} need a name: "
                             "attach(trainer, 'galore_adamw', ...).")
        optimizer = _trainer_optimizer(trainer, callbacks, stats, layerwise, max_grad_norm)
    if layerwise:
        _ddp_without_unused_search(trainer)
    # nothing was changed above: from here on the Trainer is modified
    trainer.optimizer = optimizer
    setattr(trainer, _ATTACHED, True)
    callbacks = _callbacks(refresh, memory, stats, layerwise)
    for cb in callbacks:
        if isinstance(cb, LayerwiseCallback):  # before the integrations: it fixes grad_norm
            trainer.callback_handler.callbacks.insert(0, cb)
        else:
            trainer.add_callback(cb)
        if isinstance(cb, (LoggingCallback, LayerwiseCallback)):  # they read the Trainer
            cb.bind(trainer)
    return callbacks
