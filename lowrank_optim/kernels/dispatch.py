"""Backend choice and one dispatch function per hot operation.

Each function below runs either the pure-torch reference (:mod:`lowrank_optim.kernels.reference`,
the specification) or its Triton kernel:

- ``backend="auto"`` (default): Triton when every tensor is on a CUDA device, has a supported
  dtype (fp32, bf16, fp16) and ``triton`` is importable; the torch reference otherwise (CPU
  tensors, fp64, no triton).
- ``backend="torch"``: always the reference.
- ``backend="triton"``: always Triton; an error if ``triton`` is missing, or if a tensor is not
  on a CUDA device and the Triton CPU interpreter is off (``TRITON_INTERPRET=1``, slow: for
  tests).

The choice comes from the ``backend`` argument, else from the process-wide backend: the
environment variable ``LOWRANK_OPTIM_KERNELS`` (``auto`` | ``torch`` | ``triton``) read once when
this module is imported, changed later with :func:`set_backend`.  The implementation of an
operation's Triton module is imported and checked once and cached, so a dispatched call costs
a few attribute checks on its tensors.  ``triton`` is
imported lazily by the first call that runs on it, never at ``import lowrank_optim``.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from types import ModuleType

import torch

from lowrank_optim.kernels import blockwise, reference

#: environment variable that selects the backend when no ``backend`` argument is given
ENV_VAR = "LOWRANK_OPTIM_KERNELS"
BACKENDS = ("auto", "torch", "triton")
#: floating dtypes the Triton kernels accept (all accumulate in fp32)
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: which Triton module implements each dispatched operation
_TRITON_MODULES = {
    "project": "triton_gemm",
    "project_back": "triton_gemm",
    "project_back_update": "triton_gemm",
    "project_indexed": "triton_gemm",
    "project_back_indexed": "triton_gemm",
    "project_back_indexed_update": "triton_gemm",
    "adam_update": "triton_elementwise",
    "update_param": "triton_elementwise",
    "gather_lowrank": "triton_dct",
    "indexed_basis": "triton_dct",
    "dct_scores_matmul": "triton_dct",
    "quantize_blockwise": "triton_quant",
    "dequantize_blockwise": "triton_quant",
    "adam_update_8bit": "triton_quant",
}


def interpreter_enabled() -> bool:
    """Whether ``TRITON_INTERPRET`` asks Triton for its CPU interpreter (parsed as Triton does)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


@functools.cache
def triton_available() -> bool:
    """Whether ``triton`` can be imported (imported on the first call only)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _parse(choice: str, source: str) -> str:
    choice = choice.strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"Invalid kernel backend {choice!r} ({source}): expected one of "
                         f"{', '.join(BACKENDS)}.")
    return choice


#: the process-wide backend (see :func:`set_backend`)
_backend = _parse(os.environ.get(ENV_VAR, ""), ENV_VAR)


def current_backend() -> str:
    """The process-wide backend used when a call passes no ``backend``."""
    return _backend


def set_backend(choice: str | None = None) -> str:
    """Set the process-wide backend (``"auto"``, ``"torch"``, ``"triton"``); ``None`` re-reads
    ``$LOWRANK_OPTIM_KERNELS``.  Returns the previous choice (to restore it)."""
    global _backend
    previous = _backend
    _backend = (_parse(os.environ.get(ENV_VAR, ""), ENV_VAR) if choice is None
                else _parse(choice, "set_backend"))
    return previous


def requested_backend(backend: str | None = None) -> str:
    """The backend asked for: ``backend`` if given, else the process-wide one."""
    return _backend if backend is None else _parse(backend, "backend argument")


def use_triton(*tensors: torch.Tensor, backend: str | None = None) -> bool:
    """Whether a call on ``tensors`` runs on Triton (see the module docstring for the rules).

    Raises
    ------
    RuntimeError
        Triton is forced but not installed, or forced on non-CUDA tensors without the
        interpreter.
    TypeError
        Triton is forced on a floating dtype it does not support (e.g. fp64).
    """
    choice = requested_backend(backend)
    if choice == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    dtypes_ok = all(t.dtype in TRITON_DTYPES for t in tensors if t.is_floating_point())
    if choice == "auto":
        return on_cuda and dtypes_ok and triton_available()
    if not triton_available():
        raise RuntimeError(f"Kernel backend 'triton' was requested but triton is not installed: "
                           f"pip install 'lowrank-optim[triton]', or set {ENV_VAR}=auto.")
    if not on_cuda and not interpreter_enabled():
        devices = sorted({str(t.device) for t in tensors})
        raise RuntimeError(f"Kernel backend 'triton' needs CUDA tensors, got {devices}. Set "
                           "TRITON_INTERPRET=1 before the first kernel call to run Triton's CPU "
                           f"interpreter (slow; for tests), or set {ENV_VAR}=auto.")
    if not dtypes_ok:
        bad = sorted({str(t.dtype) for t in tensors
                      if t.is_floating_point() and t.dtype not in TRITON_DTYPES})
        raise TypeError(f"Triton kernels support {[str(d) for d in TRITON_DTYPES]}, got {bad}; "
                        f"use the torch backend for these tensors.")
    return True


@functools.cache
def _triton_module(name: str, on_cuda: bool) -> ModuleType:
    """The Triton module implementing ``name`` (imported and checked once, then cached; the
    function is looked up per call, so a patched attribute takes effect)."""
    module = importlib.import_module(f"lowrank_optim.kernels.{_TRITON_MODULES[name]}")
    common = importlib.import_module("lowrank_optim.kernels.triton_common")
    if not on_cuda and not common.INTERPRET:
        raise RuntimeError("TRITON_INTERPRET=1 was set after the Triton kernels were loaded "
                           "(compiled for a GPU): set it before the first kernel call.")
    return module


def _impl(name: str, backend: str | None, *tensors: torch.Tensor) -> Callable:
    """The implementation of operation ``name`` for this call."""
    choice = _backend if backend is None else backend
    # the common cases without a look at every tensor: forced reference, or auto off CUDA
    if choice == "torch" or (choice == "auto" and not tensors[0].is_cuda):
        return getattr(reference, name)
    if use_triton(*tensors, backend=backend):
        return getattr(_triton_module(name, all(t.is_cuda for t in tensors)), name)
    return getattr(reference, name)


# -- projection (GaLore convention: P is (r, n) on the right, (m, r) on the left) -----------------
def project(
    grad: torch.Tensor, basis: torch.Tensor, side: str, *, backend: str | None = None
) -> torch.Tensor:
    """Low-rank image of ``grad``: ``grad @ basis.T`` (right) or ``basis.T @ grad`` (left)."""
    return _impl("project", backend, grad, basis)(grad, basis, side)


def project_back(
    low: torch.Tensor, basis: torch.Tensor, side: str, *, backend: str | None = None
) -> torch.Tensor:
    """Full-size image of ``low``: ``low @ basis`` (right) or ``basis @ low`` (left)."""
    return _impl("project_back", backend, low, basis)(low, basis, side)


def project_back_update(
    param: torch.Tensor, low: torch.Tensor, basis: torch.Tensor, side: str, alpha: float,
    decay_before: float = 0.0, decay_after: float = 0.0, *, backend: str | None = None,
) -> None:
    """In place: ``param = param * (1 - decay_before) + alpha * project_back(low)``, then
    ``param -= decay_after * param``.

    Triton does it in one pass over ``param`` (the full-size update is never stored); the
    reference is ``mul_``, ``addmm_``, ``add_`` (see :func:`reference.decoupled_decay`).
    """
    _impl("project_back_update", backend, param, low, basis)(
        param, low, basis, side, alpha, decay_before, decay_after)


# -- DCT projection (full basis Q (n, n), rows as frequencies, plus selected indices) -----------
def project_indexed(
    grad: torch.Tensor, basis: torch.Tensor, idx: torch.Tensor, side: str, *,
    backend: str | None = None,
) -> torch.Tensor:
    """``project(grad, P, side)`` for ``P = indexed_basis(basis, idx, side)``; Triton gathers
    the rows ``Q[idx]`` inside the GEMM's loads."""
    return _impl("project_indexed", backend, grad, basis, idx)(grad, basis, idx, side)


def project_back_indexed(
    low: torch.Tensor, basis: torch.Tensor, idx: torch.Tensor, side: str, *,
    backend: str | None = None,
) -> torch.Tensor:
    """``project_back(low, P, side)`` for ``P = indexed_basis(basis, idx, side)``."""
    return _impl("project_back_indexed", backend, low, basis, idx)(low, basis, idx, side)


def project_back_indexed_update(
    param: torch.Tensor, low: torch.Tensor, basis: torch.Tensor, idx: torch.Tensor, side: str,
    alpha: float, decay_before: float = 0.0, decay_after: float = 0.0, *,
    backend: str | None = None,
) -> None:
    """:func:`project_back_update` with ``P = indexed_basis(basis, idx, side)``."""
    _impl("project_back_indexed_update", backend, param, low, basis, idx)(
        param, low, basis, idx, side, alpha, decay_before, decay_after)


def gather_lowrank(
    coeffs: torch.Tensor, idx: torch.Tensor, side: str, *, backend: str | None = None
) -> torch.Tensor:
    """Selected DCT coefficients: ``coeffs[:, idx]`` (right) or ``coeffs[idx]`` (left)."""
    return _impl("gather_lowrank", backend, coeffs, idx)(coeffs, idx, side)


def indexed_basis(
    basis: torch.Tensor, idx: torch.Tensor, side: str, *, backend: str | None = None
) -> torch.Tensor:
    """GaLore-convention basis of the frequencies ``idx``: ``Q[idx]`` (right) or its transpose."""
    return _impl("indexed_basis", backend, basis, idx)(basis, idx, side)


def dct_scores_matmul(
    grad: torch.Tensor, basis: torch.Tensor, side: str, norm: str = "l2", *,
    backend: str | None = None,
) -> torch.Tensor:
    """Selection scores of the DCT coefficients ``G Q^T`` (right) / ``Q G`` (left) of ``grad``.

    Equals ``dct_scores(coefficients, side, norm)``; the Triton kernel reduces each tile of
    the product to column sums in registers, so the ``m x n`` coefficients are never stored,
    and returns fp32.
    """
    return _impl("dct_scores_matmul", backend, grad, basis)(grad, basis, side, norm)


# -- the inner rule and the unprojected update --------------------------------------------------
def adam_update(
    grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
    beta1: float, beta2: float, eps: float, formula: str = "galore",
    bias_correction2: float = 1.0, *, backend: str | None = None,
) -> torch.Tensor:
    """Advance Adam's moments in place and return the normalized direction.

    ``N = M / (sqrt(V) + eps)`` (``formula="galore"``) or
    ``N = M / (sqrt(V) / sqrt(bias_correction2) + eps)`` (``formula="torch"``); see
    :func:`reference.adam_update`.  Triton reads ``G, M, V`` and writes ``M, V, N`` once each.
    """
    return _impl("adam_update", backend, grad, exp_avg, exp_avg_sq)(
        grad, exp_avg, exp_avg_sq, beta1, beta2, eps, formula, bias_correction2)


def adam_update_8bit(
    grad: torch.Tensor, exp_avg_codes: torch.Tensor, exp_avg_absmax: torch.Tensor,
    exp_avg_sq_codes: torch.Tensor, exp_avg_sq_absmax: torch.Tensor,
    beta1: float, beta2: float, eps: float, formula: str = "galore",
    bias_correction2: float = 1.0, block_size: int = 256, code: str = "dynamic", *,
    backend: str | None = None,
) -> torch.Tensor:
    """:func:`adam_update` on block-wise 8-bit moments (codes + per-block absmax, updated in
    place; the signed table for the first moment, the unsigned one for the second).

    Dequantise -> moment update -> direction (from the fp32 moments) -> requantise; see
    :func:`reference.adam_update_8bit`.  Triton fuses it in one pass per block: the fp32
    moments never exist in memory.  Returns the direction in ``grad``'s dtype.
    """
    return _impl("adam_update_8bit", backend, grad, exp_avg_codes, exp_avg_absmax,
                 exp_avg_sq_codes, exp_avg_sq_absmax)(
        grad, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax, beta1, beta2,
        eps, formula, bias_correction2, block_size, code)


# -- block-wise 8-bit quantisation (kernels.blockwise is the specification) ---------
def quantize_blockwise(
    x: torch.Tensor, block_size: int = 256, code: str = "dynamic", signed: bool = True, *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None, backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes uint8 of x.shape, absmax fp32 of ceil(numel / block_size))`` of ``x`` (written
    into ``out`` when given); see :func:`lowrank_optim.kernels.blockwise.quantize`."""
    tensors = (x,) if out is None else (x, *out)
    return _impl("quantize_blockwise", backend, *tensors)(x, block_size, code, signed, out)


def dequantize_blockwise(
    codes: torch.Tensor, absmax: torch.Tensor, block_size: int = 256, code: str = "dynamic",
    signed: bool = True, *, out: torch.Tensor | None = None, backend: str | None = None,
) -> torch.Tensor:
    """fp32 values of ``codes`` (written into ``out`` when given); see
    :func:`lowrank_optim.kernels.blockwise.dequantize`."""
    tensors = (codes, absmax) if out is None else (codes, absmax, out)
    return _impl("dequantize_blockwise", backend, *tensors)(
        codes, absmax, block_size, code, signed, out)


# -- block-wise 4-bit quantisation (torch ops on every backend) ------------------------------
def quantize_blockwise_4bit(
    x: torch.Tensor, block_size: int = 256, code: str = "dynamic", signed: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed codes uint8, absmax fp32)``: the 4-bit codes of ``x``, two per byte along the
    last axis; see :func:`lowrank_optim.kernels.blockwise.quantize_4bit`.

    No Triton kernel: this runs the torch specification on every backend (its torch ops run
    on CUDA tensors too), so ``backend`` is not taken.
    """
    return blockwise.quantize_4bit(x, block_size, code, signed)


def dequantize_blockwise_4bit(
    packed: torch.Tensor, absmax: torch.Tensor, shape: torch.Size | tuple[int, ...],
    block_size: int = 256, code: str = "dynamic", signed: bool = True,
) -> torch.Tensor:
    """fp32 tensor of ``shape`` held by :func:`quantize_blockwise_4bit`'s codes; see
    :func:`lowrank_optim.kernels.blockwise.dequantize_4bit`.  Torch ops on every backend (no
    Triton kernel)."""
    return blockwise.dequantize_4bit(packed, absmax, shape, block_size, code, signed)


def update_param(
    param: torch.Tensor, direction: torch.Tensor, alpha: float,
    decay_before: float = 0.0, decay_after: float = 0.0, *, backend: str | None = None,
) -> None:
    """In place: ``param = param * (1 - decay_before) + alpha * direction``, then
    ``param -= decay_after * param`` (a parameter without projection)."""
    _impl("update_param", backend, param, direction)(
        param, direction, alpha, decay_before, decay_after)
