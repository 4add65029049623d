"""Dispatch functions for the hot low-rank operations.

Every optimizer calls these and nothing else for projection, back-projection, the Adam moment
update and the parameter update, so the Triton backend (CUDA tensors) and the pure-torch
reference (:mod:`lowrank_optim.kernels.reference`, the specification; everything else) share
one call site and there is no second copy of the math.  The backend is chosen by
:mod:`lowrank_optim.kernels.dispatch`: ``backend=`` argument, else the process-wide choice
(:func:`set_backend`; initially ``$LOWRANK_OPTIM_KERNELS``, read once at import: ``auto`` |
``torch`` | ``triton``), and ``auto`` means Triton for CUDA tensors, torch otherwise.

This package is a leaf: it imports nothing from the rest of ``lowrank_optim``.

Sides: ``"right"`` uses a basis ``P`` of shape ``(r, n)`` and maps ``G (m, n) -> G P^T (m, r)``;
``"left"`` uses ``P`` of shape ``(m, r)`` and maps ``G -> P^T G (r, n)``.
The DCT projector passes the full DCT basis and integer indices instead (``*_indexed``,
``dct2_fft`` and its packed FFT route ``dct2_fft_rows`` / ``dct_fft_coefficients`` /
``dct_fft_plan``, ``dct_scores``, ``dct_scores_matmul``, ``gather_lowrank``, ``rotate_lowrank``
and its index form ``selection_remap`` / ``remap_lowrank_``).
SST's sampled singular vectors use ``gather_lowrank`` (columns) and ``scatter_add_columns_``.
8-bit optimizer state (``bits=8``): ``adam_update_8bit`` (dequantise -> Adam -> requantise,
one fused kernel on CUDA), ``quantize_blockwise`` and ``dequantize_blockwise`` (the torch path
is :mod:`lowrank_optim.kernels.blockwise`, the numeric specification of the codes).
4-bit codes (two per byte; quantised projector bases and error-feedback buffers):
``quantize_blockwise_4bit`` / ``dequantize_blockwise_4bit``, torch ops on every backend.
Operations without a Triton kernel (the FFT route, ``dct_scores``, ``rotate_lowrank``,
``remap_lowrank_``, ``scatter_add_columns_``, ``decoupled_decay``) are the reference functions
themselves.
"""

from lowrank_optim.kernels.dispatch import (
    ENV_VAR,
    adam_update,
    adam_update_8bit,
    current_backend,
    dct_scores_matmul,
    dequantize_blockwise,
    dequantize_blockwise_4bit,
    gather_lowrank,
    indexed_basis,
    project,
    project_back,
    project_back_indexed,
    project_back_indexed_update,
    project_back_update,
    project_indexed,
    quantize_blockwise,
    quantize_blockwise_4bit,
    requested_backend,
    set_backend,
    update_param,
    use_triton,
)
from lowrank_optim.kernels.reference import (
    dct2_fft,
    dct2_fft_rows,
    dct_fft_coefficients,
    dct_fft_plan,
    dct_scores,
    decoupled_decay,
    remap_lowrank_,
    rotate_lowrank,
    scatter_add_columns_,
    selection_remap,
)

__all__ = [
    "ENV_VAR",
    "adam_update",
    "adam_update_8bit",
    "current_backend",
    "dct2_fft",
    "dct2_fft_rows",
    "dct_fft_coefficients",
    "dct_fft_plan",
    "dct_scores",
    "dct_scores_matmul",
    "decoupled_decay",
    "dequantize_blockwise",
    "dequantize_blockwise_4bit",
    "gather_lowrank",
    "indexed_basis",
    "project",
    "project_back",
    "project_back_indexed",
    "project_back_indexed_update",
    "project_back_update",
    "project_indexed",
    "quantize_blockwise",
    "quantize_blockwise_4bit",
    "remap_lowrank_",
    "requested_backend",
    "rotate_lowrank",
    "scatter_add_columns_",
    "selection_remap",
    "set_backend",
    "update_param",
    "use_triton",
]
