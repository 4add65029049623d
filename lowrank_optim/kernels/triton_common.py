"""Shared pieces of the Triton backend: interpreter detection, autotune configs, dtypes.

Imported only by the ``triton_*`` kernel modules, which the dispatch functions import lazily
the first time a call actually runs on Triton; importing :mod:`lowrank_optim` never imports
``triton``.  ``TRITON_INTERPRET=1`` must be set before this module is first imported: Triton
decides at decoration time whether a ``@triton.jit`` function is compiled or interpreted.
"""

from __future__ import annotations

import torch
import triton

from lowrank_optim.kernels.dispatch import interpreter_enabled

#: fixed at import, like Triton's own choice between compiling and interpreting
INTERPRET = interpreter_enabled()


def configs(gpu: list[dict], interpreted: dict, **launch) -> list[triton.Config]:
    """Autotune candidates: ``gpu`` on a GPU, the single small ``interpreted`` config under the
    interpreter (one config means no benchmarking, which would take minutes there).

    ``gpu`` entries may carry ``num_warps`` / ``num_stages``; ``launch`` gives their defaults.
    """
    chosen = [interpreted] if INTERPRET else gpu
    out = []
    for entry in chosen:
        kwargs = dict(entry)
        num_warps = kwargs.pop("num_warps", launch.get("num_warps", 4))
        num_stages = kwargs.pop("num_stages", launch.get("num_stages", 3))
        out.append(triton.Config(kwargs, num_warps=num_warps, num_stages=num_stages))
    return out


def dot_options(*tensors: torch.Tensor) -> tuple[bool, str]:
    """``(DOT_FP32, INPUT_PRECISION)`` constexprs for a ``tl.dot`` over ``tensors``' dtypes.

    Tiles are cast to fp32 before ``tl.dot`` under the interpreter (its bf16 dot is broken)
    and when the operands' dtypes differ.  fp32 dots follow torch's TF32 switch for matmuls,
    so the Triton path rounds like ``torch.matmul`` does on the same machine.
    """
    dtypes = {t.dtype for t in tensors}
    dot_fp32 = INTERPRET or len(dtypes) > 1
    tf32 = torch.backends.cuda.matmul.allow_tf32 and not INTERPRET
    return dot_fp32, "tf32" if tf32 else "ieee"
