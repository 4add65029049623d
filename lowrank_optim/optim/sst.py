"""``SSTAdamW``: Sparse Spectral Training (Zhao et al., ICML 2025, arXiv:2405.15481).

SST is the library's low-rank step with a different subspace source: for each
:class:`~lowrank_optim.sst.SpectralLinear` (``W = U diag(S) V^T``) the "subspace" of ``U`` and
``V`` is a set of ``r`` sampled singular-vector indices (:class:`SampledColumnsProjector`), the
inner rule is the same :class:`~lowrank_optim.rules.Adam`, and ``S`` takes the unprojected path
(every singular value is updated every step, then clamped at 0).  What is specific to SST is the
per-layer schedule around that step, kept here:

* every *iteration* (``iteration_length`` steps) the indices are redrawn from the singular values
  (:func:`lowrank_optim.sst.sample_indices`) and the vectors' optimizer state starts afresh;
* every *round* (``iterations_per_round`` iterations) the layer is re-decomposed,
  ``U, S, V <- SVD(U diag(S) V^T)``, restoring orthogonality; ``S``'s state restarts too, since
  its entries now belong to new singular vectors.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from lowrank_optim.groups import (
    TargetModules,
    largest_rank,
    plain_groups,
    warn_nothing_projected,
)
from lowrank_optim.optim._hyperparameters import fill_doc, group_defaults
from lowrank_optim.optim.base import LowRankOptimizer
from lowrank_optim.projectors.sampled import SampledColumnsProjector
from lowrank_optim.rules.adam import Adam
from lowrank_optim.sst.convert import convert, spectral_modules
from lowrank_optim.sst.groups import sst_param_groups
from lowrank_optim.sst.layers import spectral_product, svd_factors
from lowrank_optim.sst.sampling import sample_indices, seeded_generator
from lowrank_optim.validation import check_int_at_least, param_label

#: per-layer schedule counters, kept in the state of the layer's ``S`` (int64 scalars)
LAYER_KEYS = ("sst_layer", "sst_step", "sst_draws", "sst_resvds")

Triple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@fill_doc
class SSTAdamW(LowRankOptimizer):
    """AdamW with Sparse Spectral Training for the ``SpectralLinear`` layers of a model.

    Groups with a ``rank`` list ``(U, S, V)`` triples of converted layers (build them with
    :func:`lowrank_optim.sst.sst_param_groups`); groups without ``rank`` are plain AdamW.  Per
    step: all singular values ``S`` get an AdamW step and are clamped to ``S >= 0``; only the
    ``rank`` sampled columns of ``U`` and ``V`` are updated, with the enhanced gradients
    ``G v_i`` / ``G^T u_i`` provided by ``SpectralLinear``, and renormalised to unit length.
    Optimizer state exists for ``S`` and the sampled vectors only.

    Weight decay acts on ``S`` alone: since ``W = U diag(S) V^T``, decaying ``S`` by
    ``(1 - lr * wd)`` decays ``W`` by exactly that factor, while decaying unit vectors would be
    undone (or, for unsampled ones, distort ``W``).

    Parameters
    ----------
    params
        Param groups from :func:`lowrank_optim.sst.sst_param_groups`.
    {adam}
        The defaults are ``torch.optim.AdamW``'s, so ``SSTAdamW`` swaps in for it.
    formula
        ``"torch"`` (default): ``torch.optim.AdamW``'s update.  ``"galore"``: the older
        ``transformers.AdamW`` form (see :class:`lowrank_optim.rules.Adam`).
    iteration_length
        Steps between two draws of the sampled vectors (paper: 200).  ``None``: no automatic
        draws or re-SVDs; drive them with :meth:`resample` / :meth:`resvd` (e.g. from a
        Trainer callback).
    iterations_per_round
        Iterations between two re-SVDs.  ``None`` (default) uses the paper's ``d / r`` per
        layer, ``max(1, k // rank)``: over a round about ``k`` draws are made, each vector being
        sampled about once on average.
    iteration_warmup
        Steps of linear learning-rate warm-up for a parameter whose optimizer state was just
        reset: the newly sampled vectors at every draw, ``S`` at the start and after a re-SVD.
        ``None`` (default) uses the paper's ratio, a tenth of ``iteration_length`` (20 of 200
        steps; none when ``iteration_length`` is ``None``).  ``0`` disables it.  An explicit
        value must be smaller than ``iteration_length``.
    seed
        Seed of the sampling; draw ``t`` of layer ``l`` uses a generator seeded from
        ``(seed, l, t)``, so runs (and resumed runs) are reproducible without generator state.
    {lowbit}
    {nonfinite}

    Notes
    -----
    Call :meth:`step` (not per-parameter ``step_param`` hooks): a layer's schedule advances after
    its ``V`` is stepped, and a re-SVD must happen between two forward passes.  For the same
    reason the sampled projector is not layer-wise capable (``projector_type.layerwise`` is
    false): :class:`~lowrank_optim.LayerwiseOptimizer` refuses ``SSTAdamW``, and
    :meth:`step_param` refuses pre-projected gradients.

    Examples
    --------
    >>> sst.convert(model, rank=64)
    >>> opt = SSTAdamW(sst.sst_param_groups(model), lr=1e-3, iteration_length=200)
    """

    projector_type = SampledColumnsProjector

    def __init__(
        self,
        params: Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        formula: str = "torch",
        correct_bias: bool = True,
        *,
        iteration_length: int | None = 200,
        iterations_per_round: int | None = None,
        iteration_warmup: int | None = None,
        seed: int = 0,
        bits: int = 32,
        block_size: int = 256,
        code: str = "dynamic",
        min_8bit_size: int = 4096,
        nonfinite: str = "raise",
    ) -> None:
        self._num_layers = 0
        defaults = dict(group_defaults(locals(), Adam, self.projector_type),
                        iteration_length=iteration_length,
                        iterations_per_round=iterations_per_round,
                        iteration_warmup=iteration_warmup, seed=seed, update_proj_gap=None)
        super().__init__(params, defaults, Adam(), self.projector_type(), nonfinite=nonfinite)

    # -- construction ---------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for key in ("iteration_length", "iterations_per_round"):
            if group[key] is not None:
                check_int_at_least(key, group[key], 1)
        check_int_at_least("seed", group["seed"], 0)
        length = group["iteration_length"]
        if group["iteration_warmup"] is None:
            group["iteration_warmup"] = length // 10 if length is not None else 0
        check_int_at_least("iteration_warmup", group["iteration_warmup"], 0)
        if length is not None and group["iteration_warmup"] >= length:
            raise ValueError(
                f"iteration_warmup={group['iteration_warmup']!r} must be smaller than "
                f"iteration_length={length!r} (paper: 20 of 200 steps)."
            )
        if group["rank"] is None:
            return
        if group["update_proj_gap"] is not None:
            raise ValueError(
                f"update_proj_gap={group['update_proj_gap']!r} does not apply to SST groups: "
                "the sampled vectors change every iteration_length steps."
            )
        for u, s, v in _triples(group):
            if "sst_layer" not in self.state[s]:
                self.state[s].update(
                    sst_layer=torch.tensor(self._num_layers), sst_step=torch.tensor(0),
                    sst_draws=torch.tensor(0), sst_resvds=torch.tensor(0))
                self._resample_layer(group, u, s, v)
            self._num_layers += 1

    # -- stepping -------------------------------------------------------------------------
    def step_param(self, param: torch.Tensor, group: dict, index: int = 0,
                   grad: torch.Tensor | None = None, *, projected: bool = False) -> None:
        """Step one parameter; after a layer's ``V`` its iteration / round schedule advances.

        Same parameters as :meth:`LowRankOptimizer.step_param`.  In an SST group (one with
        ``rank``) ``projected=True`` raises ``NotImplementedError``: the schedule this step
        advances redraws the sampled vectors and re-decomposes the layer, so a gradient
        projected ahead of it (layer-wise accumulation) could refer to vectors no longer
        sampled.
        """
        if group["rank"] is None:
            super().step_param(param, group, index, grad, projected=projected)
            return
        if projected:
            raise NotImplementedError(
                f"{param_label(group, index, param)}: projected=True (a pre-projected, "
                "layer-wise gradient) is not supported by SSTAdamW: its sampled projector is "
                "not layer-wise capable; call step() instead.")
        role = index % 3  # U, S, V
        lr = group["lr"] * self._warmup_factor(group, self.state[param])
        if role == 1:
            super().step_param(param, {**group, "lr": lr}, index, grad)
            param.clamp_(min=0.0)
            return
        super().step_param(param, {**group, "lr": lr, "weight_decay": 0.0}, index, grad)
        if role == 2:
            self._end_layer_step(group, *group["params"][index - 2:index + 1])

    def _steps_plain(self, group: dict, param: torch.Tensor) -> bool:
        """SST groups step parameter by parameter (each role has its own learning rate and
        the layer's schedule advances after its ``V``); other groups batch as usual."""
        return group["rank"] is None and super()._steps_plain(group, param)

    @staticmethod
    def _warmup_factor(group: dict, state: dict) -> float:
        """Linear warm-up of a parameter whose state was reset (``iteration_warmup`` steps)."""
        warmup = group["iteration_warmup"]
        steps = int(state["step"]) if "step" in state else 0
        return min(1.0, (steps + 1) / warmup) if warmup else 1.0

    def _end_layer_step(self, group: dict, u: torch.Tensor, s: torch.Tensor,
                        v: torch.Tensor) -> None:
        layer = self.state[s]
        layer["sst_step"] += 1
        length = group["iteration_length"]
        step = int(layer["sst_step"])
        if length is None or step % length:
            return
        if step % (length * self.iterations_per_round(group, s)) == 0:
            self._resvd_layer(group, u, s, v)
        else:
            self._resample_layer(group, u, s, v)

    @staticmethod
    def iterations_per_round(group: dict, s: torch.Tensor) -> int:
        """The group's ``iterations_per_round``, or ``max(1, k // rank)`` for a layer with ``k``
        singular values when it is ``None``."""
        per_round = group["iterations_per_round"]
        return per_round if per_round is not None else max(1, s.shape[0] // group["rank"])

    @torch.no_grad()
    def _resample_layer(self, group: dict, u: torch.Tensor, s: torch.Tensor,
                        v: torch.Tensor) -> None:
        layer = self.state[s]
        draw = int(layer["sst_draws"])
        if s.is_meta:  # no values to sample from (analytic memory profiling): any r indices
            idx = torch.arange(group["rank"], device=u.device)
        else:
            generator = seeded_generator(group["seed"], int(layer["sst_layer"]), draw)
            idx = sample_indices(s, group["rank"], generator).to(u.device)
        for p in (u, v):  # the newly sampled vectors start with fresh optimizer state
            self.state[p] = {}
            self.projector.select(self.state[p], idx.clone(), p.shape[1])
        layer["sst_draws"] = torch.tensor(draw + 1)

    @torch.no_grad()
    def _resvd_layer(self, group: dict, u: torch.Tensor, s: torch.Tensor,
                     v: torch.Tensor) -> None:
        new_u, new_s, new_v = svd_factors(spectral_product(u, s, v))
        u.copy_(new_u)
        s.copy_(new_s)
        v.copy_(new_v)
        layer = {key: self.state[s][key] for key in LAYER_KEYS}
        layer["sst_resvds"] = layer["sst_resvds"] + 1
        self.state[s] = layer  # S's moments belonged to the old singular vectors
        self._resample_layer(group, u, s, v)

    # -- public API for schedules and callbacks --------------------------------------------
    def spectral_layers(self) -> list[tuple[str, dict, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(name, group, U, S, V)`` for every layer this optimizer trains with SST."""
        out = []
        for group in self.param_groups:
            if group["rank"] is None:
                continue
            names = group.get("param_names")
            for j, (u, s, v) in enumerate(_triples(group)):
                name = names[3 * j].removesuffix(".U") if names else f"layer{j}"
                out.append((name, group, u, s, v))
        return out

    def _selected(self, params: Iterable[torch.Tensor] | None) -> Iterator[tuple]:
        wanted = None if params is None else {id(p) for p in params}
        for _, group, u, s, v in self.spectral_layers():
            if wanted is None or wanted & {id(u), id(s), id(v)}:
                yield group, u, s, v

    def resample(self, params: Iterable[torch.Tensor] | None = None) -> None:
        """Draw new sampled vectors now for the layers owning ``params`` (default: all).

        Their optimizer state restarts.  Call between steps (e.g. in a Trainer callback's
        ``on_step_end``); the automatic schedule does the same every ``iteration_length`` steps.
        """
        for group, u, s, v in self._selected(params):
            self._resample_layer(group, u, s, v)

    def resvd(self, params: Iterable[torch.Tensor] | None = None) -> None:
        """Re-decompose the layers owning ``params`` (default: all) now, then resample them.

        ``U, S, V <- SVD(U diag(S) V^T)``: the product is unchanged (to fp32 rounding) and
        ``U``, ``V`` are orthonormal again.  Call between an optimizer step and the next
        forward pass (gradients computed before a re-SVD refer to the old vectors).
        """
        for group, u, s, v in self._selected(params):
            self._resvd_layer(group, u, s, v)

    def request_refresh(self, params: Iterable[torch.Tensor] | None = None) -> None:
        """SST's subspace refresh is a new draw: same as :meth:`resample`."""
        self.resample(params)

    def schedule_state(self) -> dict[str, int]:
        """Counters of the first SST layer (all layers advance together under :meth:`step`).

        ``step``: steps taken; ``draws``: samples drawn (including the one at construction);
        ``resvds``: re-SVDs done.
        """
        layers = self.spectral_layers()
        if not layers:
            return {"step": 0, "draws": 0, "resvds": 0}
        layer = self.state[layers[0][3]]
        return {"step": int(layer["sst_step"]), "draws": int(layer["sst_draws"]),
                "resvds": int(layer["sst_resvds"])}


def _triples(group: dict) -> list[Triple]:
    """The ``(U, S, V)`` triples of an SST group, checked for shape."""
    params = group["params"]
    if len(params) % 3:
        raise ValueError(
            f"An SST param group (one with 'rank') lists (U, S, V) triples of SpectralLinear "
            f"layers, but this one has {len(params)} parameters. Build the groups with "
            "lowrank_optim.sst.sst_param_groups(model)."
        )
    triples = []
    for j in range(0, len(params), 3):
        u, s, v = params[j:j + 3]
        if not (u.dim() == 2 and s.dim() == 1 and v.dim() == 2
                and u.shape[1] == s.shape[0] == v.shape[1]):
            raise ValueError(
                f"{param_label(group, j, u)}: expected a (U (m, k), S (k,), V (n, k)) triple, got "
                f"shapes {tuple(u.shape)}, {tuple(s.shape)}, {tuple(v.shape)}. Build the groups "
                "with lowrank_optim.sst.sst_param_groups(model)."
            )
        triples.append((u, s, v))
    return triples


def create_sst_adamw(
    model: nn.Module,
    *,
    target_modules: TargetModules = "all-linear",
    rank: int = 128,
    embedding_bits: int | None = None,
    **optimizer_kwargs: Any,
) -> SSTAdamW:
    """``SSTAdamW`` for ``model``, converting its targeted ``nn.Linear`` layers first if it has
    no ``SpectralLinear`` yet (in place; see :func:`lowrank_optim.sst.convert`).

    Used by ``create_optimizer(model, "sst_adamw", rank=..., target_modules=...)``; an already
    converted model keeps its layers and ``target_modules`` is not used.  ``embedding_bits``:
    see :func:`lowrank_optim.groups.plain_groups`.
    """
    if not spectral_modules(model):
        convert(model, rank=rank, target_modules=target_modules, skip_below_rank=True)
    if spectral_modules(model):
        groups = sst_param_groups(model, rank=rank, embedding_bits=embedding_bits)
    else:  # every targeted layer is narrower than rank: as GaLore, nothing projected
        warn_nothing_projected(rank, largest_rank(model, target_modules))
        groups = plain_groups(model, [(n, p) for n, p in model.named_parameters()
                                      if p.requires_grad], embedding_bits)
    return SSTAdamW(groups, **optimizer_kwargs)
