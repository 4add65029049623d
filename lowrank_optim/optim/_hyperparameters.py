"""What the optimizer classes share about their hyper-parameters: the docstring paragraphs that
describe them (:data:`FRAGMENTS`, filled in by :func:`fill_doc`) and the ``defaults`` dict built
from the constructor's arguments (:func:`group_defaults`).

The constructors keep explicit signatures (they are the drop-in API); which of their arguments
are group defaults is declared once, by the rule and the projector (their ``hyperparameters``).
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Mapping
from typing import Any, TypeVar

from lowrank_optim.validation import as_tuple

#: hyper-parameters that are pairs: stored as tuples, as ``torch.optim`` stores ``betas``
PAIR_KEYS = ("betas", "eps")


def group_defaults(arguments: Mapping[str, Any], *declarers: object) -> dict[str, Any]:
    """The ``defaults`` of a :class:`~lowrank_optim.LowRankOptimizer`, picked from its
    constructor's ``arguments`` (its ``locals()``).

    Parameters
    ----------
    arguments
        The constructor's arguments by name.
    declarers
        Rule and projector classes (or instances); each names its group keys in
        ``hyperparameters``.

    Returns
    -------
    dict
        Every declared key that ``arguments`` holds, in declaration order; ``betas`` / ``eps``
        given as lists become tuples (:func:`lowrank_optim.validation.as_tuple`).  Keys the
        constructor does not take (GaLore's ``update_proj_gap``, ``scale``, ``proj_type``)
        keep the base class's defaults
        (:data:`~lowrank_optim.optim.base.PROJECTION_DEFAULTS`).
    """
    defaults: dict[str, Any] = {}
    for declarer in declarers:
        for key in declarer.hyperparameters:
            if key in arguments and key not in defaults:
                value = arguments[key]
                defaults[key] = as_tuple(value) if key in PAIR_KEYS else value
    return defaults


#: shared ``Parameters`` entries (numpy style, unindented), by placeholder name
FRAGMENTS: dict[str, str] = {
    "params": """\
params
    Parameters or param groups; groups opt in to the low-rank projection with ``rank``
    (e.g. from :func:`lowrank_optim.param_groups`).  Group keys override the keyword
    defaults below.""",
    "adam": """\
lr, betas, eps, weight_decay, correct_bias
    Adam hyper-parameters (group keys, see :class:`lowrank_optim.rules.Adam`): learning
    rate, moment decay rates, the denominator's epsilon, decoupled weight decay, and whether
    the step size is bias-corrected.""",
    "lowbit": """\
bits, block_size, code, min_8bit_size
    Optimizer-state precision (group keys, see :class:`lowrank_optim.rules.Adam`):
    ``bits=8`` stores the moments (for projected weights, their low-rank moments) as
    block-wise 8-bit codes (``block_size`` elements per fp32 absmax, ``"dynamic"`` or
    ``"linear"`` table); tensors smaller than ``min_8bit_size`` keep 32-bit moments.
    Default ``bits=32``.""",
    "adafactor": """\
lr, eps, clip_threshold, decay_rate, beta1, weight_decay
    Adafactor hyper-parameters (group keys, see :class:`lowrank_optim.rules.Adafactor`) with
    the defaults of ``transformers.Adafactor``: ``lr=None`` takes the relative step;
    ``eps`` is the pair (squared-gradient regulariser, floor of the parameter scale);
    ``clip_threshold`` bounds the RMS of the update; ``decay_rate`` sets the second
    moment's coefficient ``1 - step ** decay_rate``; ``beta1`` is the first moment's
    (``None``: no first moment).  The factored second moment is kept for the low-rank
    gradient.
scale_parameter, relative_step, warmup_init
    Scale the step by the parameter's RMS; derive the step size from the step count
    (needs ``lr=None``); with ``relative_step``, warm that step size up linearly.""",
    "svd": """\
svd_method, svd_oversample, svd_power_iters, svd_seed
    How a refresh computes the basis (group keys, see
    :class:`lowrank_optim.projectors.SVDProjector`): ``"exact"`` (default,
    ``torch.linalg.svd``, galore-torch's refresh), ``"randomized"`` (seeded range finder with
    ``svd_oversample`` extra samples and ``svd_power_iters`` power iterations, default 1) or
    ``"warm"`` (``svd_power_iters`` subspace iterations from the current basis, default 2;
    the first refresh is exact).  Several times to twenty times cheaper than exact on large
    weights; see ``benchmarks/results/refresh_cost_cpu.md``.
proj_bits, proj_block_size
    Precision of the stored basis (group keys, see
    :class:`lowrank_optim.projectors.SVDProjector`): 32 (default), or 8 / 4 for block-wise
    quantised codes (``proj_block_size`` elements per fp32 scale, default 256; Q-GaLore's
    idea), about a quarter / an eighth of the fp32 basis's bytes, dequantised on the fly; see
    ``benchmarks/results/quant_projector_cpu.md``.""",
    "projection": """\
rank, update_proj_gap, scale, proj_type
    Defaults of the projection group keys (a group's own keys win): ``rank=None`` (default)
    projects only groups that set ``rank``; with a ``rank`` here every 2-D parameter of a
    group without its own is projected, which is how engines that build the optimizer from
    keyword arguments alone configure it (``torch.distributed.optim.ZeroRedundancyOptimizer(
    params, optimizer_class=GaLoreAdamW, rank=128, ...)``).  ``update_proj_gap`` 200,
    ``scale`` 1.0 (the paper uses 0.25), ``proj_type`` ``"std"``.""",
    "dct": """\
rank
    Default projection rank of groups without their own (default ``None``: only groups that
    set ``rank`` are projected; see the GaLore classes).
update_proj_gap
    Steps between subspace re-selections (default 1: every step; ``None`` leaves the timing
    to :meth:`request_refresh`).
scale
    Factor on the back-projected update (default 1.0: the reference has none).
proj_type
    Side rule: ``"std"`` (default; right side when ``rows >= cols``, else left: the smaller
    dimension is transformed), ``"reverse_std"``, ``"left"`` or ``"right"``.
score_norm
    ``"l2"`` (default, optimal energy capture) or ``"l1"`` (the reference's default).
score_route
    ``"auto"`` (default), ``"matmul"`` or ``"fft"``.
rotate_moments
    Re-express the moments in the new subspace on each refresh (default ``True``; the
    reference's default is ``False``, which scrambles the moments when the selection
    changes: see :class:`~lowrank_optim.projectors.dct.DCTProjector`).
error_feedback
    Feed the projection residual back into the next gradient (full-size buffer per layer;
    default ``False``).
error_feedback_bits
    Precision of that buffer: 32 (default: the parameter's dtype), or 8 / 4 for block-wise
    quantised codes (blocks of 256, fp32 scales), about a quarter / an eighth of its fp32
    bytes, as the reference DCT-AdamW offers.""",
    "apollo": """\
scale_type, norm_growth_limit
    How the rule scales its full-size term (group keys, see
    :class:`lowrank_optim.rules.Apollo` / :class:`~lowrank_optim.rules.Fira`): one factor
    per channel (``"channel"``) or per tensor (``"tensor"``, APOLLO-Mini), each the ratio of
    the low-rank Adam output's norm to the projected gradient's; the full-size term's norm
    may grow by at most ``norm_growth_limit`` (default 1.01, the papers' value) per step
    (``None``: no limiter).""",
    "nonfinite": """\
nonfinite
    What a NaN/Inf gradient does: ``"raise"`` (default; raises before anything changes),
    ``"skip"`` (warns and skips the whole step) or ``"ignore"`` (no check): see
    :class:`~lowrank_optim.LowRankOptimizer`.""",
}

_PLACEHOLDER = re.compile(r"^([ \t]*)\{(\w+)\}[ \t]*$", re.MULTILINE)

T = TypeVar("T", bound=type)


def fill_doc(cls: T) -> T:
    """Class decorator: each line of ``cls``'s docstring that is only ``{name}`` becomes
    :data:`FRAGMENTS` ``[name]``, indented like that line (as ``torch.optim`` formats its
    shared ``_foreach_doc`` into each optimizer's docstring)."""

    def fragment(match: re.Match[str]) -> str:
        indent, name = match.groups()
        if name not in FRAGMENTS:
            raise KeyError(f"{cls.__name__}'s docstring names an unknown fragment {{{name}}}; "
                           f"known: {sorted(FRAGMENTS)}")
        return textwrap.indent(FRAGMENTS[name], indent)

    if cls.__doc__:  # None under python -OO
        cls.__doc__ = _PLACEHOLDER.sub(fragment, cls.__doc__)
    return cls
