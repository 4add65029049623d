"""Hyper-parameter and input validators shared by every optimizer.

Each check raises ``ValueError`` (bad setting) or ``RuntimeError`` (bad tensor at step time)
with a message that names the offending parameter and says how to fix it.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")


def as_real(name: str, value: object) -> float:
    """``value`` as a float, or ``ValueError`` naming ``name`` if it is not a real number (a
    string such as ``"1e-3"`` from a config file, a bool, a tensor of several elements)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        return float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        hint = (f" (a string: write {name}={value} without quotes, or convert it with float())"
                if isinstance(value, str) else "")
        raise ValueError(f"Invalid {name}={value!r}: must be a real number, got "
                         f"{type(value).__name__}{hint}.")
    return float(value)


def check_lr(lr: float | None, *, allow_none: bool = False) -> None:
    if lr is None and allow_none:
        return
    if lr is None:
        raise ValueError(f"Invalid learning rate lr={lr!r}: pass a non-negative float.")
    value = as_real("lr", lr)
    if not math.isfinite(value) or value < 0.0:
        raise ValueError(f"Invalid learning rate lr={lr!r}: must be a finite number >= 0.")


def as_tuple(value: object) -> object:
    """A list or tuple as a tuple (for ``betas`` / ``eps`` defaults); anything else as is, so
    that validation reports it instead of ``tuple()`` failing with a bare ``TypeError``."""
    return tuple(value) if isinstance(value, (tuple, list)) else value


def check_pair(name: str, value: object, n: int = 2, example: str = "") -> None:
    """``value`` must be a sequence (tuple / list) of ``n`` real numbers."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)) or len(
            value) != n:
        raise ValueError(f"Invalid {name}={value!r}: expected a tuple of {n} numbers"
                         + (f", e.g. {example}." if example else "."))
    for i, v in enumerate(value):
        as_real(f"{name}[{i}]", v)


def check_betas(betas: Sequence[float], n: int = 2) -> None:
    check_pair("betas", betas, n, "(0.9, 0.999)")
    for i, beta in enumerate(betas):
        if not 0.0 <= float(beta) < 1.0:
            raise ValueError(f"Invalid beta at index {i}: betas[{i}]={beta!r}; each beta "
                             "must be in [0, 1).")


def check_beta(name: str, beta: float | None, *, allow_none: bool = True) -> None:
    if beta is None and allow_none:
        return
    if beta is None or not 0.0 <= as_real(name, beta) < 1.0:
        tail = " or None." if allow_none else "."
        raise ValueError(f"Invalid {name}={beta!r}: must be in [0, 1){tail}")


def check_nonneg(name: str, value: float) -> None:
    if value is None or not math.isfinite(number := as_real(name, value)) or number < 0.0:
        raise ValueError(f"Invalid {name}={value!r}: must be a finite number >= 0.")


def check_positive(name: str, value: float) -> None:
    if value is None or not math.isfinite(number := as_real(name, value)) or number <= 0.0:
        raise ValueError(f"Invalid {name}={value!r}: must be a finite number > 0.")


def check_int_at_least(name: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"Invalid {name}={value!r}: must be an integer >= {low}.")


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        options = ", ".join(map(repr, choices))
        raise ValueError(f"Invalid {name}={value!r}: choose one of {options}.")


def param_label(group: dict, index: int, param: torch.Tensor) -> str:
    """Human-readable name of ``group['params'][index]`` for error messages."""
    names = group.get("param_names")
    name = names[index] if names and index < len(names) else f"param {index} of its group"
    return f"{name} (shape {tuple(param.shape)}, {_dtype(param)})"


def check_param(param: torch.Tensor, label: str) -> None:
    """Reject parameters no optimizer here can update."""
    if param.is_complex():
        raise ValueError(
            f"{label}: complex parameters are not supported; use torch.view_as_real on the "
            "parameter or keep it in a torch.optim optimizer."
        )
    if not param.is_floating_point():
        raise ValueError(f"{label}: only floating-point parameters can be optimized.")


def check_rank(rank: int, param: torch.Tensor, label: str, proj_type: str = "std") -> None:
    """A projected parameter must be 2-D and the rank must fit the matrix."""
    check_int_at_least("rank", rank, 1)
    if param.dim() != 2:
        raise ValueError(
            f"{label}: low-rank projection needs a 2-D weight but got {param.dim()}-D. Move it to "
            "a param group without 'rank' (lowrank_optim.param_groups does this for you)."
        )
    limit = min(param.shape)
    if rank > limit:
        raise ValueError(
            f"{label}: rank={rank} exceeds min(m, n)={limit}. Use rank <= {limit}, or leave this "
            "weight out of the projected group (it is small enough for plain AdamW)."
        )


def check_grad(
    grad: torch.Tensor, label: str | Callable[[], str], param: torch.Tensor | None = None
) -> None:
    """Gradients we cannot use correctly raise instead of corrupting state.

    Checks the layout (dense, strided), complex values and, with ``param``, that dtype, shape
    and device are the parameter's (a step must not mix them: a GEMM would fail half-way, a
    smaller gradient would be broadcast into a wrong update).  ``label`` may be a callable so
    the hot path does not format a string per step.
    """
    same = param is None or (grad.dtype == param.dtype and grad.shape == param.shape
                             and grad.device == param.device)
    if same and grad.layout == torch.strided and not grad.is_complex():
        return
    label = label() if callable(label) else label
    if grad.is_sparse:
        raise RuntimeError(
            f"{label}: sparse gradients are not supported; use torch.optim.SparseAdam for "
            "sparse embeddings or set sparse=False on the module."
        )
    if grad.layout != torch.strided:
        raise RuntimeError(f"{label}: gradients with layout {grad.layout} are not supported; "
                           "pass a dense (strided) gradient, e.g. grad.to_dense().")
    if grad.is_complex():
        raise RuntimeError(f"{label}: complex gradients are not supported.")
    assert param is not None
    if grad.dtype != param.dtype:
        raise RuntimeError(
            f"{label}: gradient dtype {_dtype(grad)} does not match the parameter's "
            f"{_dtype(param)}. Cast it (p.grad = p.grad.to(p.dtype)), or train with AMP "
            "(torch.autocast) instead of assigning gradients of another dtype."
        )
    if grad.shape != param.shape:
        raise RuntimeError(
            f"{label}: gradient shape {tuple(grad.shape)} does not match the parameter's "
            f"{tuple(param.shape)}; each parameter needs a gradient of its own shape."
        )
    raise RuntimeError(
        f"{label}: gradient on {grad.device} but the parameter on {param.device}; move the "
        "gradient to the parameter's device."
    )


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


# -- settings of schedules and callbacks (TypeError for a value of the wrong type) -----------
def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """`` Did you mean 'x'?`` for the closest of ``choices`` to ``value`` (empty if none is
    close), to append to an error message."""
    close = difflib.get_close_matches(str(value).lower(), list(choices), n=2, cutoff=0.6)
    return f" Did you mean {' or '.join(map(repr, close))}?" if close else ""


def check_bool(name: str, value: Any) -> None:
    """``TypeError`` unless ``value`` is ``True`` or ``False`` (a string such as ``"no"`` is
    truthy and would silently mean yes)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}.")


def check_real(name: str, value: Any) -> float:
    """``value`` as a float; ``TypeError`` for a string, a bool or anything not a real number
    (``float("0.4")`` would pass and a string would reach the training loop)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}.")
    return float(value)
