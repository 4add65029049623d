"""Layer-wise updates under data parallelism: DDP's communication hook, FSDP2 shard norms.

:class:`~lowrank_optim.layerwise.LayerwiseOptimizer` steps each parameter as soon as its
gradient is final.  Under DDP that is when its gradient bucket has been all-reduced, so the
step runs in a DDP communication hook (:func:`register_bucket_step`, after torch's
optimizer-overlap hooks): the hook all-reduces the bucket with torch's default
``allreduce_hook`` (divide by the world size, then sum: the same bits as DDP without a hook),
waits for it, and hands the bucket's parameters and reduced gradients to the optimizer.  DDP's
reducer is told that the optimizer ran in backward, so it does not copy the buckets back into
``param.grad``: each gradient is freed right after its step.  Buckets are reduced in the same
order on every rank, so collectives made inside the hook (low-rank accumulators,
refresh broadcasts) line up across ranks.

Under FSDP2 the post-accumulate-grad hooks of the sharded parameters run after each
reduce-scatter (torch calls them on the sharded gradient), so nothing needs installing; the
per-parameter norm of a shard is summed over the ranks (:func:`global_sq_norm`).

This package never imports :mod:`lowrank_optim.optim`; the optimizer arrives as a callback.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from lowrank_optim.distributed.tensors import is_dtensor, local_tensor, world_size

#: ``on_bucket(params, reduced_grads)``: called inside backward once a bucket is reduced
BucketStep = Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor]], None]


def is_ddp(module: Any) -> bool:
    """``module`` is a ``torch.nn.parallel.DistributedDataParallel``."""
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(module, DistributedDataParallel)


def multi_process() -> bool:
    """An initialised process group of more than one rank."""
    return world_size() > 1


def ddp_managed(ddp: Any) -> set[torch.Tensor]:
    """The parameters whose gradients ``ddp`` all-reduces (not ignored, requiring grad)."""
    ignored = set(getattr(ddp, "parameters_to_ignore", ()) or ())
    return {p for n, p in ddp.module.named_parameters() if p.requires_grad and n not in ignored}


def check_ddp(ddp: Any, params: Sequence[torch.Tensor], label: Callable[[torch.Tensor], str]
              ) -> None:
    """Raise ``TypeError`` / ``ValueError`` unless layer-wise steps can run in ``ddp``'s hook."""
    if not is_ddp(ddp):
        raise TypeError(f"attach_ddp expects a torch.nn.parallel.DistributedDataParallel, got "
                        f"{type(ddp).__name__}")
    if ddp.find_unused_parameters:
        raise ValueError(
            "Layer-wise updates under DDP need find_unused_parameters=False: a parameter steps "
            "when its bucket is reduced, before DDP knows which parameters were unused on every "
            "rank. Build DDP with find_unused_parameters=False (in the Trainer: "
            "TrainingArguments(ddp_find_unused_parameters=False)).")
    if not hasattr(ddp.reducer, "_set_optimizer_in_backward"):
        raise NotImplementedError("this torch's DDP reducer cannot run the optimizer in backward "
                                  "(no _set_optimizer_in_backward); use torch >= 2.1")
    managed = ddp_managed(ddp)
    outside = [label(p) for p in params if p not in managed]
    if outside:
        raise ValueError(
            f"{', '.join(outside[:3])}{' ...' if len(outside) > 3 else ''}: not all-reduced by "
            "this DDP module (ignored, or not in ddp.module), so a layer-wise step would use "
            "this rank's gradient alone. Build the optimizer from ddp.module's parameters.")


def register_bucket_step(ddp: Any, on_bucket: BucketStep) -> None:
    """Install the communication hook that steps each reduced bucket (module notes)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    # no annotations: DDP compares them with dist.GradBucket, and this module's are strings
    def hook(state, bucket):  # (weakref to ddp, dist.GradBucket) -> Future[Tensor]
        module = state()
        allreduce_hook(module.process_group, bucket).wait()
        with torch.no_grad():
            on_bucket(bucket.parameters(), bucket.gradients())
        done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        done.set_result(bucket.buffer())
        return done

    try:
        ddp.register_comm_hook(weakref.ref(ddp), hook)
    except RuntimeError as e:
        raise RuntimeError(f"could not install the layer-wise step as DDP's communication hook "
                           f"({e}); layer-wise DDP needs DDP's default all-reduce, without "
                           "another comm hook, registered before the first backward") from e
    ddp.reducer._set_optimizer_in_backward()


def all_reduce_mean_(tensors: Sequence[torch.Tensor], group: dist.ProcessGroup | None = None
                     ) -> None:
    """Average ``tensors`` over the ranks in place, as one flat all-reduce."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    flat.div_(dist.get_world_size(group))
    dist.all_reduce(flat, group=group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def global_sq_norm(grad: torch.Tensor) -> torch.Tensor:
    """Squared l2 norm (fp32, 0-d) of a whole gradient: a sharded one's is summed over the
    ranks of its mesh."""
    sq = torch.linalg.vector_norm(local_tensor(grad), dtype=torch.float32).square()
    if is_dtensor(grad):
        dist.all_reduce(sq, group=grad.device_mesh.get_group())
    return sq
