"""``SubspaceStatsCallback``: captured gradient energy and subspace overlap, per layer type."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from trainer_callbacks._common import (
    LoggingCallback,
    layer_type,
    layerwise_optimizer,
    logger,
    lowrank_optimizer,
    will_log,
)

#: per-parameter fields of ``LowRankOptimizer.subspace_stats`` that are logged (averaged)
FIELDS = ("captured_energy", "overlap", "steps_since_refresh")


def aggregate(rows: list[dict[str, Any]], prefix: str = "subspace/") -> dict[str, float]:
    """Mean of each field of :data:`FIELDS` per layer type (``q_proj``, ``up_proj``, ...) and
    over all layers (``.../all``); fields that are ``None`` everywhere are left out."""
    sums: dict[tuple[str, str], list[float]] = defaultdict(list)
    for row in rows:
        kind = layer_type(row["name"])
        for field in FIELDS:
            if row.get(field) is not None:
                sums[(field, kind)].append(float(row[field]))
                sums[(field, "all")].append(float(row[field]))
    return {f"{prefix}{field}/{kind}": sum(v) / len(v) for (field, kind), v in sorted(sums.items())}


class SubspaceStatsCallback(LoggingCallback):
    """Log how well the subspaces fit the gradients, averaged per layer type.

    Added to the Trainer's own log rows (at ``logging_steps``; ``every``: only rows whose step
    is a multiple of it):

    * ``subspace/captured_energy/<type>``: share of the step's gradient energy inside the
      subspace it is projected into, ``||P(G)||^2 / ||G||^2``, measured in
      ``on_pre_optimizer_step`` before any refresh of that step (so it shows how stale the
      subspaces have become; 1 means nothing of the gradient is lost).  One projection and
      back-projection per layer, on the steps the Trainer will log (step-based logging and
      ``logging_first_step``; rows logged at epoch ends lack it); absent in layer-wise mode,
      whose gradients are freed during backward.
    * ``subspace/overlap/<type>``: overlap between the last two subspaces of each layer,
      recorded at its latest refresh (:meth:`LowRankOptimizer.track_subspace_overlap`, turned
      on by this callback); 1 means the refresh found the same subspace.
    * ``subspace/steps_since_refresh/<type>``: age of the subspaces.

    ``<type>`` is the module name's last part (``q_proj``, ``k_proj``, ``gate_proj``, ...) and
    ``all`` averages every layer.
    """

    def __init__(self, every: int | None = None, prefix: str = "subspace/") -> None:
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a string such as 'subspace/', got "
                            f"{type(prefix).__name__} {prefix!r}.")
        super().__init__(every)
        self.prefix = prefix
        self._optimizer = None
        self._layerwise = False
        #: ``(step, rows)`` of the captured energy measured before that step's update
        self._energy: tuple[int, list[dict[str, Any]]] | None = None

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self._optimizer = lowrank_optimizer(optimizer)
        if self._optimizer is None:
            logger.warning("SubspaceStatsCallback: %s is no LowRankOptimizer; nothing to log.",
                           type(optimizer).__name__)
            return
        self._optimizer.track_subspace_overlap(True)
        self._layerwise = layerwise_optimizer(optimizer) is not None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # the step being taken is global_step + 1 once it completes
        step = state.global_step + 1
        if (self._optimizer is None or self._layerwise or not self.due(step)
                or not will_log(args, state, step)):
            return
        energy = self._optimizer.subspace_stats(energy=True)
        self._energy = (step, [{"name": r["name"], "captured_energy": r["captured_energy"]}
                               for r in energy])

    def collect(self, args: Any, state: Any, optimizer: Any) -> dict[str, float]:
        if self._optimizer is None:
            return {}
        rows = self._optimizer.subspace_stats(energy=False)
        if self._energy is not None and self._energy[0] == state.global_step:
            for row, measured in zip(rows, self._energy[1], strict=True):
                row["captured_energy"] = measured["captured_energy"]
        self._energy = None
        return aggregate(rows, self.prefix)
