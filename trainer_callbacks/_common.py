"""Shared plumbing of the callbacks: finding our optimizer behind the Trainer's wrappers, naming
layer types, and logging through the Trainer's own ``log`` so every ``report_to`` integration
(wandb, tensorboard, ...) and the console receive the metrics."""

from __future__ import annotations

import logging
import math
from typing import Any

from transformers import TrainerCallback

# the validators and the optimizer lookup are transformers-free: defined once, in the library
from lowrank_optim.schedules import (  # noqa: F401  (re-exported)
    innermost_optimizer,
    layerwise_optimizer,
    lowrank_optimizer,
)
from lowrank_optim.validation import check_bool, check_real, did_you_mean  # noqa: F401

logger = logging.getLogger("lowrank_optim")


def check_every(value: Any) -> None:
    """``every`` of the logging callbacks: ``None`` or an integer >= 1."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or value < 1):
        raise ValueError(f"Invalid every={value!r}: pass an integer >= 1 (optimizer steps "
                         "between logs) or None for TrainingArguments.logging_steps.")


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


def will_log(args: Any, state: Any, step: int) -> bool:
    """Whether the Trainer's ``DefaultFlowCallback`` will log at optimizer step ``step``
    (step-based logging or ``logging_first_step``), predicted before the step completes."""
    if step == 1 and getattr(args, "logging_first_step", False):
        return True
    strategy = getattr(args, "logging_strategy", "steps")
    strategy = getattr(strategy, "value", strategy)  # an IntervalStrategy or its string
    return strategy == "steps" and step % interval(None, args, state) == 0


def is_training_row(logs: dict[str, Any]) -> bool:
    """A row the Trainer logs during training (``loss`` / ``learning_rate`` / ``grad_norm``),
    as opposed to evaluation rows and the end-of-training summary."""
    return any(k in logs for k in ("loss", "learning_rate", "grad_norm"))


def _first_reader_index(callbacks: list[Any]) -> int:
    """Where a callback goes to add keys to the rows before anything reads them: right after
    the Trainer's ``DefaultFlowCallback`` (which decides when to log), so before the
    ``report_to`` integrations, the console printer / progress bar and user callbacks."""
    for i, cb in enumerate(callbacks):
        if type(cb).__name__ == "DefaultFlowCallback":
            return i + 1
    return 0


class LoggingCallback(TrainerCallback):
    """Base of the callbacks that log metrics: their keys join the Trainer's own log rows.

    At each training log of the Trainer (``on_log``, at ``logging_steps``), :meth:`collect`
    gives the metrics, which are added to that same row: ``state.log_history`` keeps one row
    per logging step (HF's practice of reading ``log_history[i]["learning_rate"]`` keeps
    working), and the ``report_to`` integrations that run after this callback (wandb,
    tensorboard, ...) and the console see them in the same row.  ``every`` (``None``: every
    row) restricts them to rows whose step is a multiple of it.

    :func:`trainer_callbacks.attach` (or :meth:`bind`) places the callback before the
    integrations.  Passed as ``Trainer(callbacks=[...])`` it runs after them (the Trainer adds
    integrations first): the keys then reach ``state.log_history`` only, with a one-time
    warning when integrations are on.
    """

    def __init__(self, every: int | None = None) -> None:
        check_every(every)
        self.every = every
        self.trainer: Any = None
        self._warned_unbound = False

    def bind(self, trainer: Any) -> LoggingCallback:
        """Run before ``trainer``'s ``report_to`` integrations and console printer, so they
        receive the metrics (moves the callback if the Trainer already has it; returns
        ``self``)."""
        handler = getattr(trainer, "callback_handler", None)
        if not callable(getattr(trainer, "log", None)) or handler is None:
            raise TypeError(f"bind() takes the transformers.Trainer whose log rows receive the "
                            f"metrics, got {type(trainer).__name__}.")
        self.trainer = trainer
        if self in handler.callbacks:
            handler.callbacks.remove(self)
            handler.callbacks.insert(_first_reader_index(handler.callbacks), self)
        return self

    def due(self, step: int) -> bool:
        """Whether the metrics belong in a training row logged at ``step``."""
        return self.every is None or step % self.every == 0

    def collect(self, args: Any, state: Any, optimizer: Any) -> dict[str, float]:
        """The metrics of the row being logged (subclasses)."""
        raise NotImplementedError

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        if logs is None or optimizer is None or not is_training_row(logs):
            return
        if not self.due(state.global_step):
            return
        metrics = self.collect(args, state, optimizer)
        if not metrics:
            return
        logs.update(metrics)
        # Trainer.log appended a copy of this row before calling on_log: update it too
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("step") == state.global_step and is_training_row(last):
            last.update(metrics)
        report_to = [r for r in (getattr(args, "report_to", None) or []) if r != "none"]
        if self.trainer is None and report_to and not self._warned_unbound:
            self._warned_unbound = True
            logger.warning(
                "%s runs after the report_to integrations (it was passed as "
                "Trainer(callbacks=...)), so its metrics reach state.log_history but not %s; "
                "add it with trainer_callbacks.attach(trainer, ...) or call .bind(trainer).",
                type(self).__name__, ", ".join(report_to))
