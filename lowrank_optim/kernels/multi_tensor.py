"""Adam on many unprojected tensors at once, through torch's fused AdamW kernel.

Embeddings, heads and norms are most of a small LLaMA's parameters and get no projection; one
dispatched chain of elementwise ops per tensor (:func:`reference.adam_update` then
:func:`reference.update_param`) reads and writes each of them about eight times and allocates
full-size temporaries (on CPU a fresh block above glibc's mmap threshold, 32 MB, costs a page
fault per 4 KB: a 16M-element ``sqrt()`` takes five times its in-place time).  torch's fused
AdamW (``torch._fused_adamw_``, the kernel behind ``torch.optim.AdamW(fused=True)``) does the
whole update in one vectorised pass with no temporaries, over a list of tensors.

Both of this library's formulas map onto it exactly (in real arithmetic):

* ``"torch"`` is the kernel's own formula (decay first, eps after the bias correction);
* ``"galore"`` (``N = M / (sqrt(V) + eps)``, step ``lr sqrt(b2t) / b1t``, decay after) is the
  kernel with ``eps / sqrt(b2t)`` and no decay, followed by galore-torch's
  ``param.add_(param, alpha=-lr * weight_decay)``.

Rounding differs from the op-by-op reference by an ulp here and there (the kernel computes
``M`` as a lerp); each tensor's result does not depend on which other tensors share the call,
nor on the thread count, so stepping one parameter (layer-wise updates) or all of a group
gives the same bits.  :func:`supports` says which tensors it takes.
"""

from __future__ import annotations

import math

import torch

from lowrank_optim.kernels import dispatch

#: parameter dtypes the CPU kernel takes (moments and gradients must share the dtype)
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def supports(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor | None,
             exp_avg_sq: torch.Tensor | None, step: torch.Tensor) -> bool:
    """Whether :func:`adamw_` can step ``param``: a dense, contiguous CPU tensor whose
    gradient and 32-bit moments share its dtype and shape, with a float32 step count.

    CUDA tensors keep the per-tensor Triton kernels for now (torch's CUDA kernel wants the step
    counts on the device, and no GPU check of this path has run yet), and so does a forced
    Triton backend (the interpreter on CPU tensors, in tests).
    """
    if exp_avg is None or exp_avg_sq is None or dispatch.requested_backend() == "triton":
        return False
    tensors = (param, grad, exp_avg, exp_avg_sq)
    return (param.device.type == "cpu" and param.dtype in DTYPES
            and step.dtype == torch.float32 and step.device.type == "cpu"
            and all(t.device == param.device and t.dtype == param.dtype
                    and t.shape == param.shape and t.layout == torch.strided
                    and t.is_contiguous() for t in tensors))


def adamw_(
    params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor], *, lr: float, beta1: float,
    beta2: float, eps: float, weight_decay: float, formula: str,
) -> None:
    """One bias-corrected Adam step on every tensor of the lists, in place.

    ``steps`` are the step counts after this step's increment (one float32 tensor per
    parameter, as :func:`torch.optim.AdamW` keeps them).  ``formula="torch"`` is
    ``torch.optim.AdamW``'s update; ``"galore"`` galore-torch's (see the module docstring).
    For ``"galore"`` all tensors must be at the same step (the eps rescaling depends on it).
    """
    if not params:
        return
    if formula == "torch":
        torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=lr,
                            beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps,
                            amsgrad=False, maximize=False, grad_scale=None, found_inf=None)
        return
    step = float(steps[0])
    if any(float(s) != step for s in steps):
        raise ValueError("formula='galore': all parameters of one call must be at the same "
                         "step (group them by step count)")
    eps_scaled = eps / math.sqrt(1.0 - beta2**step)
    torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=lr, beta1=beta1,
                        beta2=beta2, weight_decay=0.0, eps=eps_scaled, amsgrad=False,
                        maximize=False, grad_scale=None, found_inf=None)
    if weight_decay:  # galore-torch's decay after the update (reference.decoupled_decay)
        torch._foreach_add_(params, params, alpha=-lr * weight_decay)
