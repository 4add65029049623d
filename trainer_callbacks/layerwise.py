"""``LayerwiseCallback``: wires a :class:`~lowrank_optim.layerwise.LayerwiseOptimizer` to the
Trainer's settings and rejects the ones that cannot work in layer-wise mode."""

from __future__ import annotations

from transformers import TrainerCallback

from lowrank_optim.distributed.layerwise import is_ddp
from trainer_callbacks._common import layerwise_optimizer


class LayerwiseCallback(TrainerCallback):
    """Check and sync the Trainer's arguments with layer-wise updates at train begin.

    * ``gradient_accumulation_steps`` is copied to the :class:`LayerwiseOptimizer` (each
      parameter steps in the hook of the window's last micro-batch).
    * ``max_grad_norm > 0`` raises ``ValueError``: clipping by the global norm needs every
      gradient before the first parameter steps, but in layer-wise mode each gradient is
      consumed and freed as soon as backward produces it (the Trainer would "clip" gradients
      that no longer exist, silently).  Set ``max_grad_norm=0`` and clip per parameter with
      ``LayerwiseOptimizer(max_grad_norm=...)`` (or ``attach(..., max_grad_norm=...)``).
    * More than one process (DDP): the optimizer is attached to the Trainer's
      ``DistributedDataParallel`` module (:meth:`LayerwiseOptimizer.attach_ddp`), so each
      parameter steps once its gradient bucket is all-reduced.  This needs the Trainer behind
      the callback (:func:`trainer_callbacks.attach` binds it; without it, ``RuntimeError``);
      FSDP and DeepSpeed under the Trainer raise ``NotImplementedError`` (use FSDP2's
      ``fully_shard`` and :class:`LayerwiseOptimizer` directly).
    * ``grad_norm`` in the logs: the Trainer computes it from gradients that layer-wise mode
      has already freed (always 0); this callback replaces it with
      :attr:`LayerwiseOptimizer.last_grad_norm`, the pre-clipping norm of the gradients the
      step used.  :func:`trainer_callbacks.attach` puts the callback ahead of the ``report_to``
      integrations so they receive the corrected value; added elsewhere, only
      ``state.log_history`` is corrected.
    """

    def __init__(self) -> None:
        self._lw = None
        self._trainer = None

    def bind(self, trainer) -> LayerwiseCallback:
        """The Trainer whose DDP module the optimizer attaches to (multi-process runs)."""
        self._trainer = trainer
        return self

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        lw = layerwise_optimizer(optimizer)
        if lw is None:
            raise TypeError(
                "LayerwiseCallback found no lowrank_optim.layerwise.LayerwiseOptimizer behind "
                f"the Trainer's optimizer ({type(optimizer).__name__}); pass "
                "optimizers=(LayerwiseOptimizer(opt), None) or use attach(..., layerwise=True)."
            )
        if getattr(args, "world_size", 1) > 1:
            self._attach_ddp(lw)
        if args.max_grad_norm is not None and args.max_grad_norm > 0:
            raise ValueError(
                f"max_grad_norm={args.max_grad_norm} asks the Trainer to clip by the global "
                "gradient norm after backward, but in layer-wise mode every gradient has already "
                "been used and freed by then (that is where the memory saving comes from), so "
                "nothing would be clipped. Set TrainingArguments(max_grad_norm=0) and clip each "
                "parameter's gradient with LayerwiseOptimizer(max_grad_norm=...) instead."
            )
        lw.gradient_accumulation_steps = args.gradient_accumulation_steps
        self._lw = lw

    def on_log(self, args, state, control, logs=None, **kwargs):
        norm = None if self._lw is None else self._lw.last_grad_norm
        if logs is None or norm is None or "grad_norm" not in logs:
            return
        value = float(norm)
        logs["grad_norm"] = value
        last = state.log_history[-1] if state.log_history else {}
        if last.get("step") == state.global_step and "grad_norm" in last:
            last["grad_norm"] = value

    def _attach_ddp(self, lw) -> None:
        if self._trainer is None:
            raise RuntimeError(
                "Layer-wise updates in a multi-process Trainer step each parameter in DDP's "
                "communication hook, which this callback installs on the Trainer's DDP module: "
                "add it with trainer_callbacks.attach(trainer, ..., layerwise=True), which binds "
                "the Trainer (or call LayerwiseCallback().bind(trainer)).")
        wrapped = self._trainer.model_wrapped
        if not is_ddp(wrapped):
            raise NotImplementedError(
                f"layer-wise updates under the Trainer's {type(wrapped).__name__} wrapper: the "
                "Trainer path supports DDP. For FSDP2, shard the model with fully_shard and "
                "wrap the optimizer in lowrank_optim.layerwise.LayerwiseOptimizer in your own "
                "loop; drop layerwise=True otherwise.")
        if lw._ddp is not wrapped:
            lw.attach_ddp(wrapped)
