"""GaLore's projector: the top singular vectors of the gradient (fp32 SVD: exact, randomized or
warm-started)."""

from __future__ import annotations

from typing import Any

import torch

from lowrank_optim import kernels
from lowrank_optim.projectors import fast_svd, quantized
from lowrank_optim.projectors.base import Projector
from lowrank_optim.rules.base import Rule
from lowrank_optim.validation import PROJ_TYPES, check_choice, check_int_at_least, check_rank

SVD_METHODS = ("exact", "randomized", "warm")
#: the SVD projector's group keys beyond rank / update_proj_gap / scale / proj_type
SVD_DEFAULTS: dict[str, Any] = {
    "svd_method": "exact",
    "svd_oversample": 10,
    "svd_power_iters": None,
    "svd_seed": 0,
    "proj_bits": 32,
    "proj_block_size": 256,
}
#: the two sides a basis may be kept for, in projection order
SIDES = ("left", "right")
#: power iterations when ``svd_power_iters`` is None
DEFAULT_POWER_ITERS = {"randomized": 1, "warm": 2}


def _opt(group: dict, key: str) -> Any:
    return group.get(key, SVD_DEFAULTS[key])


def precision(group: dict) -> quantized.Precision:
    """How the group's bases are stored (``proj_bits``, ``proj_block_size``)."""
    return quantized.Precision(_opt(group, "proj_bits"), _opt(group, "proj_block_size"),
                               "proj_bits", "proj_block_size")


def power_iterations(group: dict) -> int:
    """The group's ``svd_power_iters``, or its method's default (:data:`DEFAULT_POWER_ITERS`)."""
    value = _opt(group, "svd_power_iters")
    return DEFAULT_POWER_ITERS.get(_opt(group, "svd_method"), 0) if value is None else value


def refresh_seed(group: dict, step: int) -> int:
    """Seed of a randomized refresh at optimizer step ``step``: a function of ``svd_seed`` and
    the step only, so replicas draw the same matrix and a resumed run redraws it."""
    return (int(_opt(group, "svd_seed")) * 1_000_003 + step) % (2**63 - 1)


def galore_sides(shape: torch.Size | tuple[int, int], proj_type: str) -> tuple[str, ...]:
    """Which side(s) GaLore projects for a weight of ``shape`` (moments are r x max(m, n))."""
    m, n = shape
    if proj_type == "std":
        return ("right",) if m >= n else ("left",)
    if proj_type == "reverse_std":
        return ("left",) if m >= n else ("right",)
    if proj_type == "full":
        return ("left", "right")
    return (proj_type,)


class SVDProjector(Projector):
    """Top-``rank`` singular vectors of the gradient at refresh time.

    Group keys: ``rank``, ``proj_type`` (``std``, ``reverse_std``, ``left``, ``right``,
    ``full``) and how a refresh computes the basis (missing keys take :data:`SVD_DEFAULTS`):

    ``svd_method``
        ``"exact"`` (default): ``torch.linalg.svd``, galore-torch's refresh bit for bit.
        ``"randomized"``: the randomized range finder (:func:`fast_svd.randomized_bases`,
        ``svd_oversample`` extra samples, ``svd_power_iters`` power iterations, default 1).
        ``"warm"``: subspace iteration from the current basis (:func:`fast_svd.warm_bases`,
        ``svd_power_iters`` iterations, default 2); the first refresh of a parameter (no basis
        yet, or one of another shape) is exact.
    ``svd_oversample``
        Extra random samples of ``"randomized"`` (default 10).
    ``svd_power_iters``
        Power / subspace iterations (default ``None``: 1 for ``"randomized"``, 2 for
        ``"warm"``; on the tiny recipe's gradients these keep >= 99% (randomized) and a median
        99.3% (warm) of the exact SVD's captured energy, see
        ``benchmarks/results/refresh_cost_cpu.md``).
    ``svd_seed``
        Seed of ``"randomized"``'s Gaussian samples; the draw of a refresh at step ``t`` is
        seeded from ``(svd_seed, t)`` (:func:`refresh_seed`), so DDP replicas agree and a
        resumed run redraws the same matrix without generator state.
    ``proj_bits``
        Precision of the stored basis (the Q-GaLore idea, arXiv:2407.08296): 32 (default: the
        gradient's dtype, as galore-torch), 8 or 4.  Below 32 a refresh quantises the fp32
        basis block-wise (:mod:`~lowrank_optim.projectors.quantized`: signed linear table,
        entries ``proj_left_codes`` / ``proj_left_absmax`` or ``proj_right_*`` instead of
        ``proj_left`` / ``proj_right``), about 1/4 (8 bits) or 1/8 (4 bits) of the fp32 bytes,
        and every use (projection, update, diagnostics, a warm refresh's start) dequantises it
        into a transient dense basis.  The codes are laid out as ``(size, rank)`` (a right basis
        transposed), so 4-bit pairs run along the rank axis.  A dequantised basis is not
        exactly orthonormal: on the tiny recipe's gradients its span keeps >= 99.99% (8 bits)
        and >= 98.4% (4 bits) of the fp32 basis's captured energy, while the energy it
        back-projects, ``||G B'^T B'||^2``, lies within 0.5% (8 bits) and -5% / +16% (4 bits)
        of the fp32 one (``benchmarks/results/quant_projector_cpu.md``; training losses
        matched fp32 bases to 0.001 there).
    ``proj_block_size``
        Elements per fp32 scale of a quantised basis (default 256).

    The SVD runs in fp32 whatever the gradient dtype and the basis is stored in the gradient's
    dtype, as in galore-torch.  The basis is stored as its own compact tensor (not a view into
    the SVD output), so the optimizer holds exactly ``r * min(m, n)`` elements (or their
    codes).  Quantised bases are replicated like fp32 ones, so FSDP2 row shards project with
    them as they do with fp32 bases.
    """

    name = "svd"
    structure_keys = {**Projector.structure_keys, "proj_bits": SVD_DEFAULTS["proj_bits"],
                      "proj_block_size": SVD_DEFAULTS["proj_block_size"]}
    subspace_keys = {k: v for side in SIDES
                     for k, v in quantized.categories(f"proj_{side}", "projectors").items()}
    hyperparameters = (*Projector.hyperparameters, *SVD_DEFAULTS)
    defaults = SVD_DEFAULTS
    row_shardable = True

    def validate(self, param: torch.Tensor, group: dict, label: str) -> None:
        check_choice("proj_type", group.get("proj_type", "std"), PROJ_TYPES)
        check_rank(group["rank"], param, label, group.get("proj_type", "std"))
        check_choice("svd_method", _opt(group, "svd_method"), SVD_METHODS)
        check_int_at_least("svd_oversample", _opt(group, "svd_oversample"), 0)
        check_int_at_least("svd_seed", _opt(group, "svd_seed"), 0)
        if _opt(group, "svd_power_iters") is not None:
            least = 1 if _opt(group, "svd_method") == "warm" else 0
            check_int_at_least("svd_power_iters", _opt(group, "svd_power_iters"), least)
        quantized.check_bits("proj_bits", _opt(group, "proj_bits"))
        check_int_at_least("proj_block_size", _opt(group, "proj_block_size"), 1)

    def sides(self, shape: tuple[int, ...], group: dict) -> tuple[str, ...]:
        return galore_sides(shape, group.get("proj_type", "std"))

    # -- the stored bases -------------------------------------------------------------------
    @staticmethod
    def held(state: dict) -> list[str]:
        """The sides ``state`` holds a basis for (plain or quantised), in projection order."""
        return [s for s in SIDES if quantized.holds(state, f"proj_{s}")]

    @staticmethod
    def _stored_shape(side: str, basis_shape: tuple[int, int]) -> tuple[int, int]:
        """The ``(size, rank)`` layout of a quantised basis: a right basis transposed."""
        return basis_shape if side == "left" else basis_shape[::-1]

    def side_basis(self, state: dict, side: str, group: dict,
                   dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """The basis of ``side`` as the kernels take it (left ``(m, r)``, right ``(r, n)``):
        the stored tensor at ``proj_bits=32``, else its codes dequantised into a transient
        tensor (fp32, or ``dtype``); ``None`` when ``state`` holds none.

        Raises
        ------
        ValueError
            Quantised codes that do not fit ``group``'s ``rank`` / ``proj_bits`` /
            ``proj_block_size`` (a state written with other settings).
        """
        name = f"proj_{side}"
        if name in state:
            return state[name]
        codes = state.get(quantized.storage_keys(name)[0])
        if codes is None:
            return None
        stored = quantized.load(state, name, (int(codes.shape[0]), group["rank"]),
                                precision(group))
        out = stored if side == "left" else stored.t()
        return out if dtype is None else out.to(dtype)

    def _previous(self, state: dict, side: str, group: dict,
                  shape: tuple[int, int]) -> torch.Tensor | None:
        """The current basis of ``side`` in fp32 if it has ``shape`` (a warm refresh's start),
        else ``None``."""
        name = f"proj_{side}"
        if name in state:
            return state[name].float() if tuple(state[name].shape) == shape else None
        if not quantized.holds(state, name) or quantized.problem(
                state, name, self._stored_shape(side, shape), precision(group)) is not None:
            return None
        return self.side_basis(state, side, group)

    def _store(self, state: dict, side: str, basis: torch.Tensor, dtype: torch.dtype,
               group: dict) -> None:
        """Keep the fp32 ``basis`` of ``side``: in ``dtype`` at ``proj_bits=32``, else as
        block-wise codes of its ``(size, rank)`` layout."""
        name, how = f"proj_{side}", precision(group)
        if how.bits == 32:
            quantized.drop(state, name)
            state[name] = basis.to(dtype=dtype, copy=True).contiguous()
        else:
            quantized.store(state, name, basis if side == "left" else basis.t(), how)

    # -- the projection ---------------------------------------------------------------------
    def has_subspace(self, state: dict) -> bool:
        return bool(self.held(state))

    def refresh(self, grad: torch.Tensor, state: dict, group: dict, rule: Rule) -> None:
        rank, sides = group["rank"], self.sides(grad.shape, group)
        method = _opt(group, "svd_method")
        g = grad.float()
        m, n = grad.shape
        shapes = {"left": (m, rank), "right": (rank, n)}
        previous = ({s: self._previous(state, s, group, shapes[s]) for s in sides}
                    if method == "warm" else {})
        if method == "warm" and all(b is not None for b in previous.values()):
            bases = fast_svd.warm_bases(g, previous, power_iterations(group))
        elif method == "randomized":
            generator = torch.Generator(device=g.device)
            generator.manual_seed(refresh_seed(group, int(state.get("step", 0))))
            bases = fast_svd.randomized_bases(g, rank, sides, _opt(group, "svd_oversample"),
                                              power_iterations(group), generator)
        else:
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            bases = {"left": u[:, :rank], "right": vh[:rank]}
        for side in sides:
            self._store(state, side, bases[side], grad.dtype, group)

    def project(self, grad: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        low = grad
        for side in self.held(state):
            low = kernels.project(low, self.side_basis(state, side, group, grad.dtype), side)
        return low

    def project_back(self, low: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        for side in self.held(state):
            low = kernels.project_back(low, self.side_basis(state, side, group, low.dtype), side)
        return low

    def overlap(self, old: dict, new: dict, group: dict) -> torch.Tensor | None:
        """Mean squared cosine of the principal angles between the old and new bases,
        ``||B_old B_new^T||_F^2 / r`` (1: same subspace, 0: orthogonal), averaged over the
        projected sides; sign flips of singular vectors do not count.  Quantised bases are
        compared as dequantised."""
        values = []
        for side in SIDES:
            a, b = self.side_basis(old, side, group), self.side_basis(new, side, group)
            if a is None or b is None:
                continue
            a, b = a.float(), b.float()
            cross = a.t() @ b if side == "left" else a @ b.t()  # r x r
            values.append(cross.square().sum() / min(cross.shape))
        return torch.stack(values).mean() if values else None

    def apply_update(
        self, param: torch.Tensor, low: torch.Tensor, alpha: float, state: dict, group: dict,
        decay_before: float = 0.0, decay_after: float = 0.0,
    ) -> None:
        held = self.held(state)
        if len(held) == 2:  # proj_type="full"
            low = kernels.project_back(low, self.side_basis(state, "left", group, param.dtype),
                                       "left")
        side = held[-1]
        kernels.project_back_update(param, low, self.side_basis(state, side, group, param.dtype),
                                    side, alpha, decay_before, decay_after)
