"""One-line ways to put a lowrank-optim optimizer and its callbacks into a Hugging Face Trainer.

Three routes, from the least to the most wiring:

* ``Trainer(..., optimizers=(create_optimizer(model, name, ...), None))`` -- plain torch swap.
* ``Trainer(..., optimizer_cls_and_kwargs=(LowRankOptimizerFactory, {"name": ..., ...}))`` --
  the Trainer builds the optimizer from its model when it needs it.
* :func:`lowrank_trainer_kwargs` (splat into ``Trainer(...)``) or :func:`attach` (on an
  existing Trainer, before ``train()``) -- optimizer plus callbacks, optionally layer-wise.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import TrainerCallback

from lowrank_optim.layerwise import LayerwiseOptimizer
from lowrank_optim.registry import create_optimizer
from trainer_callbacks._common import LoggingCallback
from trainer_callbacks.layerwise import LayerwiseCallback
from trainer_callbacks.memory import OptimizerMemoryCallback
from trainer_callbacks.refresh import Schedule, SubspaceRefreshCallback
from trainer_callbacks.stats import SubspaceStatsCallback


class LowRankOptimizerFactory:
    """Optimizer factory for ``Trainer(optimizer_cls_and_kwargs=(LowRankOptimizerFactory, {...}))``.

    The Trainer treats a first element that is not a ``torch.optim.Optimizer`` subclass as a
    factory: it instantiates it without arguments and calls it with ``(model, **kwargs)``.
    ``kwargs`` are those of :func:`lowrank_optim.create_optimizer` (``name`` included); the
    Trainer adds nothing, so pass ``lr`` too.

    Examples
    --------
    >>> Trainer(model=model, args=args, train_dataset=ds, optimizer_cls_and_kwargs=(
    ...     LowRankOptimizerFactory, {"name": "galore_adamw", "rank": 128, "lr": 1e-2}))
    """

    def __call__(self, model: nn.Module, name: str = "galore_adamw", **kwargs: Any):
        return create_optimizer(model, name, **kwargs)


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


def _optimizer(model: nn.Module, name: str, layerwise: bool, max_grad_norm: float | None,
               kwargs: dict[str, Any]):
    opt = create_optimizer(model, name, **kwargs)
    if layerwise:
        return LayerwiseOptimizer(opt, max_grad_norm=max_grad_norm)
    if max_grad_norm is not None:
        raise ValueError("max_grad_norm here is the per-parameter clipping of layer-wise mode; "
                         "without layerwise=True use TrainingArguments(max_grad_norm=...).")
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
        ...).  ``lr`` defaults to ``args.learning_rate`` when ``args`` is given.
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

    Examples
    --------
    >>> trainer = Trainer(model=model, args=args, train_dataset=ds,
    ...                   **lowrank_trainer_kwargs(model, "galore_adamw", args=args, rank=128))
    """
    if args is not None:
        optimizer_kwargs.setdefault("lr", args.learning_rate)
    opt = _optimizer(model, name, layerwise, max_grad_norm, optimizer_kwargs)
    return {"optimizers": (opt, None), "callbacks": _callbacks(refresh, memory, stats, layerwise)}


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

    With ``name``, builds ``create_optimizer(trainer.model, name, **optimizer_kwargs)``
    (``lr`` defaults to ``trainer.args.learning_rate``) and installs it as the Trainer's
    optimizer; without, keeps the optimizer given as ``Trainer(optimizers=(opt, None))``.
    Logging callbacks are bound to the Trainer, so their metrics go through ``trainer.log``
    to every ``report_to`` integration.  Other arguments as in :func:`lowrank_trainer_kwargs`.

    Returns
    -------
    list of TrainerCallback
        The callbacks added.

    Examples
    --------
    >>> trainer = Trainer(model=model, args=args, train_dataset=ds)
    >>> attach(trainer, "galore_adamw", rank=128, refresh=AdaptiveGap(gap=200), stats=True)
    >>> trainer.train()
    """
    if name is not None:
        optimizer_kwargs.setdefault("lr", trainer.args.learning_rate)
        trainer.optimizer = _optimizer(trainer.model, name, layerwise, max_grad_norm,
                                       optimizer_kwargs)
    elif optimizer_kwargs:
        raise ValueError(f"Optimizer arguments {sorted(optimizer_kwargs)} need a name.")
    elif layerwise:
        if trainer.optimizer is None:
            raise ValueError("attach(trainer, layerwise=True) needs an optimizer name or a "
                             "Trainer created with optimizers=(opt, None).")
        if not isinstance(trainer.optimizer, LayerwiseOptimizer):
            trainer.optimizer = LayerwiseOptimizer(trainer.optimizer, max_grad_norm=max_grad_norm)
    callbacks = _callbacks(refresh, memory, stats, layerwise)
    for cb in callbacks:
        if isinstance(cb, LoggingCallback):
            cb.bind(trainer)
        if isinstance(cb, LayerwiseCallback):  # before the integrations: it fixes grad_norm
            trainer.callback_handler.callbacks.insert(0, cb)
        else:
            trainer.add_callback(cb)
    return callbacks
