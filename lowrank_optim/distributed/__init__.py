"""The optimizers under ``torch.distributed``: DDP, FSDP2 (sharded DTensor parameters), ZeRO.

One module per concern:

* :mod:`~lowrank_optim.distributed.checkpoint` -- checkpoints that resume on another number of
  processes (FSDP2 <-> one process, DDP any): :func:`save_checkpoint`, :func:`load_checkpoint`.
* :mod:`~lowrank_optim.distributed.ddp` -- replicated training (DDP, DeepSpeed ZeRO stage 0):
  :func:`check_in_sync`, :func:`broadcast_refreshes` (a refresh computed on one rank and sent).
* :mod:`~lowrank_optim.distributed.layout` -- what each engine hands the optimizer, checked
  when a group's tensors change (flattened ZeRO partitions, FSDP2 shards) and
  :func:`engine_support` for the messages.
* :mod:`~lowrank_optim.distributed.fsdp2` -- the sharded step on this rank's rows.
* :mod:`~lowrank_optim.distributed.tensors` -- DTensor helpers and digests.
* :mod:`~lowrank_optim.distributed.zero` -- ZeRO-1 by whole parameters
  (``ZeroRedundancyOptimizer`` over a low-rank optimizer): :func:`zero1`.

This package reads the optimizer's rule and projector through their declared capabilities and
never imports :mod:`lowrank_optim.optim`.
"""

from lowrank_optim.distributed.checkpoint import (
    check_reshardable,
    load_checkpoint,
    read_manifest,
    restore_dropped_state,
    save_checkpoint,
)
from lowrank_optim.distributed.ddp import (
    BroadcastRefresh,
    broadcast_refreshes,
    check_in_sync,
    subspace_tensors,
)
from lowrank_optim.distributed.fsdp2 import all_ranks_true, sharded_step
from lowrank_optim.distributed.layout import (
    FLATTENED_MESSAGE,
    MATRICES_KEY,
    REPLICATED_ENGINES,
    check_group_layout,
    check_model_not_partitioned,
    check_zero_stage,
    engine_support,
    layout_fingerprint,
    sharding_problem,
)
from lowrank_optim.distributed.tensors import (
    digest,
    is_distributed,
    is_dtensor,
    local_tensor,
)
from lowrank_optim.distributed.zero import (
    check_zero1,
    local_optimizer,
    partition_by_size,
    zero1,
)

__all__ = [
    "FLATTENED_MESSAGE",
    "MATRICES_KEY",
    "REPLICATED_ENGINES",
    "BroadcastRefresh",
    "all_ranks_true",
    "broadcast_refreshes",
    "check_group_layout",
    "check_in_sync",
    "check_reshardable",
    "check_model_not_partitioned",
    "check_zero1",
    "check_zero_stage",
    "digest",
    "engine_support",
    "is_distributed",
    "is_dtensor",
    "layout_fingerprint",
    "load_checkpoint",
    "local_optimizer",
    "local_tensor",
    "partition_by_size",
    "read_manifest",
    "restore_dropped_state",
    "save_checkpoint",
    "sharded_step",
    "sharding_problem",
    "zero1",
    "subspace_tensors",
]
