"""Shared plumbing of the callbacks: finding our optimizer behind the Trainer's wrappers, naming
layer types, and logging through the Trainer's own ``log`` so every ``report_to`` integration
(wandb, tensorboard, ...) and the console receive the metrics."""

from __future__ import annotations

import difflib
import logging
import math
import numbers
from collections.abc import Iterable
from typing import Any

from transformers import TrainerCallback

from lowrank_optim.layerwise import LayerwiseOptimizer
from lowrank_optim.optim.base import LowRankOptimizer

logger = logging.getLogger("lowrank_optim")


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """`` Did you mean 'x'?`` for the closest of ``choices`` to ``value`` (empty if none is
    close), to append to an error message."""
    close = difflib.get_close_matches(str(value).lower(), list(choices), n=2, cutoff=0.6)
    return f" Did you mean {' or '.join(map(repr, close))}?" if close else ""


def check_bool(name: str, value: Any) -> None:
    """``TypeError`` unless ``value`` is ``True`` or ``False`` (a string such as ``"no"`` is
    truthy and would silently mean yes)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}.")


def check_every(value: Any) -> None:
    """``every`` of the logging callbacks: ``None`` or an integer >= 1."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or value < 1):
        raise ValueError(f"Invalid every={value!r}: pass an integer >= 1 (optimizer steps "
                         "between logs) or None for TrainingArguments.logging_steps.")


def check_real(name: str, value: Any) -> float:
    """``value`` as a float; ``TypeError`` for a string, a bool or anything not a real number
    (``float("0.4")`` would pass and a string would reach the training loop)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}.")
    return float(value)


def _chain(optimizer: Any) -> list[Any]:
    """``optimizer`` and what it wraps (accelerate's ``AcceleratedOptimizer.optimizer``,
    :class:`LayerwiseOptimizer.optimizer`), outermost first."""
    out, seen = [], set()
    while optimizer is not None and id(optimizer) not in seen:
        out.append(optimizer)
        seen.add(id(optimizer))
        optimizer = getattr(optimizer, "optimizer", None)
    return out


def innermost_optimizer(optimizer: Any) -> Any:
    """The optimizer holding the state, behind any wrappers (``None`` stays ``None``)."""
    chain = _chain(optimizer)
    return chain[-1] if chain else None


def lowrank_optimizer(optimizer: Any) -> LowRankOptimizer | None:
    """The :class:`LowRankOptimizer` behind the Trainer's optimizer, or ``None``."""
    return next((o for o in _chain(optimizer) if isinstance(o, LowRankOptimizer)), None)


def layerwise_optimizer(optimizer: Any) -> LayerwiseOptimizer | None:
    """The :class:`LayerwiseOptimizer` behind the Trainer's optimizer, or ``None``."""
    return next((o for o in _chain(optimizer) if isinstance(o, LayerwiseOptimizer)), None)


def layer_type(name: str) -> str:
    """Module type of a parameter name: ``model.layers.3.self_attn.q_proj.weight`` ->
    ``q_proj`` (the parameter's module, last component)."""
    parts = name.split(".")
    return parts[-2] if len(parts) >= 2 else parts[-1]


def interval(every: int | None, args: Any, state: Any) -> int:
    """``every``, or the Trainer's logging interval (``logging_steps``, a fraction of the run
    when below 1) when ``every`` is ``None``."""
    if every is not None:
        return max(1, int(every))
    steps = getattr(args, "logging_steps", 500) or 500
    if steps < 1:
        return max(1, math.ceil((getattr(state, "max_steps", 0) or 1) * steps))
    return max(1, int(steps))


class LoggingCallback(TrainerCallback):
    """Base of the callbacks that log metrics.

    Bound to a Trainer (:meth:`bind`, done by :func:`trainer_callbacks.attach`), metrics go
    through ``trainer.log``: ``state.log_history``, the console and every ``report_to``
    integration.  A callback passed as ``Trainer(callbacks=[...])`` has no handle on the
    Trainer (callbacks receive none, and run after the integrations), so unbound metrics are
    appended to ``state.log_history`` only, with a one-time warning when integrations are on.
    """

    def __init__(self) -> None:
        self.trainer: Any = None
        self._warned_unbound = False

    def bind(self, trainer: Any) -> LoggingCallback:
        """Log through ``trainer.log`` (returns ``self``)."""
        if not callable(getattr(trainer, "log", None)):
            raise TypeError(f"bind() takes the transformers.Trainer whose log() receives the "
                            f"metrics, got {type(trainer).__name__}.")
        self.trainer = trainer
        return self

    def emit(self, metrics: dict[str, float], args: Any, state: Any, control: Any) -> None:
        """Log ``metrics`` for the current step."""
        if not metrics:
            return
        if self.trainer is not None:
            # the handler's on_log clears control.should_log, which would drop the Trainer's
            # own log of this step: keep the flag as it was
            should_log = control.should_log
            self.trainer.log(dict(metrics))
            control.should_log = should_log
            return
        state.log_history.append({**metrics, "step": state.global_step})
        report_to = [r for r in (getattr(args, "report_to", None) or []) if r != "none"]
        if report_to and not self._warned_unbound:
            self._warned_unbound = True
            logger.warning(
                "%s is not bound to the Trainer, so its metrics reach state.log_history but not "
                "%s; add it with trainer_callbacks.attach(trainer, ...) or call .bind(trainer).",
                type(self).__name__, ", ".join(report_to))
