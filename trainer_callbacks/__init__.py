"""Hugging Face ``transformers.Trainer`` integration of lowrank-optim.

Callbacks: :class:`SubspaceRefreshCallback` (when subspaces refresh, with fixed, warm-up,
growing and adaptive schedules), :class:`OptimizerMemoryCallback` (state bytes and peak
memory), :class:`SubspaceStatsCallback` (captured gradient energy and overlap per layer type),
:class:`LayerwiseCallback` (layer-wise updates).  Helpers: :func:`attach`,
:func:`lowrank_trainer_kwargs` and :class:`LowRankOptimizerFactory` for
``optimizer_cls_and_kwargs``; :func:`verify_checkpoint` checks a checkpoint's files before a
resume loads them.
"""

from trainer_callbacks.helpers import LowRankOptimizerFactory, attach, lowrank_trainer_kwargs
from trainer_callbacks.layerwise import LayerwiseCallback
from trainer_callbacks.memory import OptimizerMemoryCallback, peak_memory
from trainer_callbacks.refresh import (
    AdaptiveGap,
    FixedGap,
    GrowingGap,
    SubspaceRefreshCallback,
    WarmupGap,
    make_schedule,
)
from trainer_callbacks.safety import verify_checkpoint
from trainer_callbacks.stats import SubspaceStatsCallback

__all__ = [
    "AdaptiveGap",
    "FixedGap",
    "GrowingGap",
    "LayerwiseCallback",
    "LowRankOptimizerFactory",
    "OptimizerMemoryCallback",
    "SubspaceRefreshCallback",
    "SubspaceStatsCallback",
    "WarmupGap",
    "attach",
    "lowrank_trainer_kwargs",
    "make_schedule",
    "peak_memory",
    "verify_checkpoint",
]
