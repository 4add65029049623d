"""``OptimizerMemoryCallback``: optimizer-state bytes and peak device memory in the Trainer logs."""

from __future__ import annotations

import resource
import sys
from typing import Any

import torch

from lowrank_optim.memory import CATEGORIES, adamw_state_bytes, state_bytes
from trainer_callbacks._common import (
    LoggingCallback,
    check_bool,
    innermost_optimizer,
)


def _params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def peak_memory(device: torch.device) -> tuple[str, int]:
    """``(metric name, bytes)`` of the process's peak memory on ``device``.

    CUDA: ``torch.cuda.max_memory_allocated`` (tensors allocated by PyTorch on that device).
    Otherwise the process's peak resident set size (``getrusage``: everything the process ever
    held in RAM, Python and libraries included), which is coarser and never decreases.
    """
    if device.type == "cuda":
        return "memory/peak_cuda_allocated_bytes", int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return "memory/peak_rss_bytes", int(rss if sys.platform == "darwin" else rss * 1024)


class OptimizerMemoryCallback(LoggingCallback):
    """Log optimizer-state bytes by category, bytes per parameter and peak memory.

    Metrics, added to the Trainer's own log rows (at ``logging_steps``; ``every``: only rows
    whose step is a multiple of it):
    ``optimizer_state/{moments,projectors,indices,other,total}_bytes``,
    ``optimizer_state/bytes_per_param``, ``optimizer_state/adamw_ratio`` (total over what
    ``torch.optim.AdamW`` would hold for the same parameters) and the peak memory of
    :func:`peak_memory` (``memory/peak_cuda_allocated_bytes`` on CUDA, else
    ``memory/peak_rss_bytes``).  Counts come from :func:`lowrank_optim.memory.state_bytes`, so
    any ``torch.optim`` optimizer is accepted.  After the first optimizer step (when the state
    exists) a table comparing with AdamW is printed once on the main process.

    Parameters
    ----------
    every
        ``None``: every training log row of the Trainer; an integer: the rows whose step is a
        multiple of it.
    print_table
        Print the one-time comparison table.
    """

    def __init__(self, every: int | None = None, print_table: bool = True) -> None:
        check_bool("print_table", print_table)
        super().__init__(every)
        self.print_table = print_table
        self._printed = False

    def metrics(self, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """The logged values for ``optimizer`` (wrappers are looked through)."""
        opt = innermost_optimizer(optimizer)
        counts = state_bytes(opt)
        params = _params(opt)
        adamw = adamw_state_bytes(params)
        out: dict[str, float] = {f"optimizer_state/{c}_bytes": getattr(counts, c)
                                 for c in CATEGORIES}
        out["optimizer_state/total_bytes"] = counts.total
        out["optimizer_state/bytes_per_param"] = counts.bytes_per_param
        out["optimizer_state/adamw_ratio"] = counts.total / adamw if adamw else 0.0
        if params:
            name, value = peak_memory(params[0].device)
            out[name] = value
        return out

    def table(self, optimizer: torch.optim.Optimizer) -> str:
        """The comparison with AdamW as text."""
        opt = innermost_optimizer(optimizer)
        counts = state_bytes(opt)
        adamw = adamw_state_bytes(_params(opt))
        n = max(counts.num_params, 1)
        lines = [f"Optimizer state of {type(opt).__name__} over {counts.num_params:,} "
                 "parameters (after the first step):",
                 f"  {'category':<12}{'bytes':>14}{'bytes/param':>13}"]
        for c in (*CATEGORIES, "total"):
            value = counts.total if c == "total" else getattr(counts, c)
            lines.append(f"  {c:<12}{value:>14,}{value / n:>13.3f}")
        ratio = counts.total / adamw if adamw else float("nan")
        lines.append(f"  {'AdamW':<12}{adamw:>14,}{adamw / n:>13.3f}   (ours: {ratio:.3f}x)")
        return "\n".join(lines)

    def collect(self, args: Any, state: Any, optimizer: Any) -> dict[str, float]:
        return self.metrics(optimizer)

    def on_step_end(self, args: Any, state: Any, control: Any, optimizer=None, **kwargs):
        if optimizer is None:
            return
        if self.print_table and not self._printed and state.is_world_process_zero:
            self._printed = True
            print(self.table(optimizer), flush=True)
