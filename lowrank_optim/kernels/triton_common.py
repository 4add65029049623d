"""Shared pieces of the Triton backend: interpreter detection, autotune configs, dtypes.

Imported only by the ``triton_*`` kernel modules, which the dispatch functions import lazily
the first time a call actually runs on Triton; importing :mod:`lowrank_optim` never imports
``triton``.  ``TRITON_INTERPRET=1`` must be set before this module is first imported: Triton
decides at decoration time whether a ``@triton.jit`` function is compiled or interpreted.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

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
    # the precision only concerns fp32 operands: half-precision dots stay "ieee" (one program)
    fp32_dot = dot_fp32 or dtypes == {torch.float32}
    tf32 = torch.backends.cuda.matmul.allow_tf32 and not INTERPRET and fp32_dot
    return dot_fp32, "tf32" if tf32 else "ieee"


#: launch options of ``kernel[grid](...)`` that are not kernel arguments
LAUNCH_OPTIONS = ("num_warps", "num_stages")


@dataclass
class Launch:
    """One kernel launch as the launcher builds it: the (autotuned) kernel, its positional
    arguments, constexpr keywords and launch options.  What :func:`launch` runs, and what
    :func:`recording` hands to ahead-of-time compilation instead
    (:mod:`lowrank_optim.kernels.aot`), so the compiled signatures are the launched ones."""

    kernel: Any
    args: tuple
    constexprs: dict[str, Any]
    options: dict[str, int] = field(default_factory=dict)


_recorder: list[Launch] | None = None


def launch(kernel: Any, grid: Callable | tuple, *args: Any, **kwargs: Any) -> None:
    """``kernel[grid](*args, **kwargs)``, or recorded without running inside
    :func:`recording`."""
    if _recorder is not None:
        options = {k: kwargs.pop(k) for k in LAUNCH_OPTIONS if k in kwargs}
        _recorder.append(Launch(kernel, args, kwargs, options))
        return
    kernel[grid](*args, **kwargs)


@contextmanager
def recording() -> Iterator[list[Launch]]:
    """Record the launches made inside the block (nothing runs: the tensors may live on the
    CPU and no driver is needed)."""
    global _recorder
    previous, _recorder = _recorder, []
    try:
        yield _recorder
    finally:
        _recorder = previous


# -- autotune pruning by shared memory -----------------------------------------------------
@functools.cache
def _shared_limit(device: int) -> int:
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024)


def device_shared_limit(tensor: torch.Tensor) -> int | None:
    """Per-block shared-memory limit (bytes, opt-in maximum) of ``tensor``'s GPU; ``None``
    for other devices."""
    return _shared_limit(tensor.device.index or 0) if tensor.is_cuda else None


def tile_shared_bytes(config: triton.Config, args: dict[str, Any]) -> int:
    """Shared memory a ``BLOCK_M x BLOCK_K`` by ``BLOCK_K x BLOCK_N`` dot tile pipeline needs:
    one A and one B tile per stage, in the loaded dtype (an upper bound of what Triton
    allocates: it keeps ``num_stages - 1`` buffers on some targets)."""
    kw = config.kwargs
    itemsize = max(args["a_ptr"].element_size(), args["b_ptr"].element_size())
    per_stage = (kw["BLOCK_M"] * kw["BLOCK_K"] + kw["BLOCK_K"] * kw["BLOCK_N"]) * itemsize
    return per_stage * max(1, config.num_stages)


def prune_shared(estimate: Callable[[triton.Config, dict[str, Any]], int]) -> Callable:
    """An ``early_config_prune`` for ``triton.autotune``: drop the configs whose ``estimate``
    exceeds the device's per-block shared-memory limit (99 KB on consumer cards, 163 / 227
    KB on A100 / H100), keeping the smallest if none fits.  ``.estimate`` stays readable for
    ahead-of-time checks (:mod:`lowrank_optim.kernels.aot`)."""
    def prune(configs: list[triton.Config], named_args: dict[str, Any],
              **kwargs: Any) -> list[triton.Config]:
        tensor = next(v for v in named_args.values() if isinstance(v, torch.Tensor))
        limit = device_shared_limit(tensor)
        if limit is None:
            return configs
        kept = [c for c in configs if estimate(c, named_args) <= limit]
        return kept or [min(configs, key=lambda c: estimate(c, named_args))]

    prune.estimate = estimate  # type: ignore[attr-defined]
    return prune
