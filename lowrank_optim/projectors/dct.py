"""SVD-free projector: the top-r columns of a fixed DCT basis (Modoranu et al., 2025).

arXiv:2505.17967 ("FFT-based Dynamic Subspace Selection for Low-Rank Adaptive Optimization of
Large Language Models").  Instead of an SVD of the gradient, the subspace is spanned by ``r``
vectors of one fixed orthonormal basis, the DCT-II, chosen by their alignment with the
gradient.  Per parameter only the ``r`` integer indices are stored; the basis is built once
per (size, device, dtype) and shared by every layer of that size.

Orientation (the same for both scoring routes and for every kernel):

* ``Q = dct_matrix(n)`` is the orthonormal DCT-II matrix with **rows as frequencies**,
  ``Q[k, j] = sqrt(2/n) cos(pi k (2j + 1) / (2n))`` with row 0 scaled by ``1/sqrt(2)``; it
  equals ``scipy.fft.dct(np.eye(n), type=2, norm="ortho", axis=0)`` and ``Q @ x`` is the
  orthonormal DCT-II of a vector ``x``.  Basis vector ``k`` is row ``Q[k]`` (a cosine of
  frequency ``k``).
* Right side (``n`` = number of columns): coefficients ``S = G Q^T`` (the DCT-II of every row
  of ``G``), low-rank gradient ``R = S[:, idx] = G Q[idx]^T`` (m x r), back-projection
  ``N Q[idx]``.  Left side (``n`` = number of rows): ``S = Q G`` (DCT-II of every column),
  ``R = S[idx] = Q[idx] G`` (r x n), back-projection ``Q[idx]^T N``.
* ALGORITHMS.md writes ``S = G @ Q`` with columns of ``Q`` as basis vectors; that ``Q`` is our
  ``Q^T``.  The matmul route and the FFT route (which computes the DCT-II of each row, i.e.
  ``G Q^T``) therefore score the same vectors; using the DCT-II matrix itself on the right
  (``G Q``, a DCT-III) would make the two routes disagree.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from lowrank_optim import kernels
from lowrank_optim.projectors import quantized
from lowrank_optim.projectors.base import Projector, index_overlap
from lowrank_optim.projectors.svd import galore_sides
from lowrank_optim.rules.base import Rule
from lowrank_optim.validation import check_choice, check_int_at_least, check_rank

SCORE_NORMS = ("l2", "l1")
SCORE_ROUTES = ("auto", "matmul", "fft")
#: ``proj_type`` values the DCT projector accepts (one side only: no ``"full"``)
DCT_PROJ_TYPES = ("std", "reverse_std", "left", "right")
#: group keys of the DCT projector and their defaults (read with ``group.get``)
DCT_DEFAULTS: dict[str, Any] = {
    "score_norm": "l2",
    "score_route": "auto",
    "rotate_moments": True,
    "error_feedback": False,
    "error_feedback_bits": 32,
}
#: ``score_route="auto"`` takes the FFT route from this basis size on: on one CPU core the two
#: routes' refresh times cross between n = 192 and 256 (0.6 ms vs 0.44 ms at 256, 2x faster FFT
#: at 384, over 10x at 512); below, the GEMM wins on the FFT route's fixed overhead
AUTO_FFT_MIN_SIZE = 256
#: optimizer-state key of the error-feedback residual (memory category ``other``)
ERROR_FEEDBACK_KEY = "error_feedback"
#: elements per fp32 scale of a quantised error-feedback residual (``error_feedback_bits``)
ERROR_FEEDBACK_BLOCK_SIZE = 256


def dct_matrix(
    n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """The orthonormal DCT-II matrix ``Q`` (n x n), rows as frequencies.

    ``Q[k, j] = sqrt(2/n) cos(pi k (2j + 1) / (2n))``, row 0 times ``1/sqrt(2)``, so
    ``Q @ Q.T = I`` and ``Q`` equals ``scipy.fft.dct(np.eye(n), type=2, norm="ortho", axis=0)``.
    Built in float64 on the CPU and then cast, so every device and dtype gets the correctly
    rounded values (and a rebuilt basis is bit-identical, which bit-exact resume relies on).
    """
    check_int_at_least("n", n, 1)
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    j = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    q = torch.cos(k * (2.0 * j + 1.0) * (math.pi / (2.0 * n))).mul_(math.sqrt(2.0 / n))
    q[0].mul_(math.sqrt(0.5))
    return q.to(device=device, dtype=dtype)


def dct_side(shape: torch.Size | tuple[int, int], proj_type: str = "std") -> tuple[str, int]:
    """Projected side and basis size for a weight of ``shape``.

    With the default ``proj_type="std"`` this is the reference rule: for ``W`` of shape
    ``R x C``, the right side with ``n = C`` when ``R >= C`` (moments ``R x r``), else the left
    side with ``n = R`` (moments ``r x C``), i.e. the smaller dimension is transformed.
    """
    side = galore_sides(shape, proj_type)[0]
    return side, int(shape[1] if side == "right" else shape[0])


def _opt(group: dict, key: str) -> Any:
    return group.get(key, DCT_DEFAULTS[key])


def error_feedback_precision(group: dict) -> quantized.Precision:
    """How the group's error-feedback residuals are stored (``error_feedback_bits``)."""
    return quantized.Precision(_opt(group, "error_feedback_bits"), ERROR_FEEDBACK_BLOCK_SIZE,
                               "error_feedback_bits")


class DCTProjector(Projector):
    """``rank`` DCT-II basis vectors chosen by alignment with the gradient at refresh time.

    Group keys (besides ``rank``, ``update_proj_gap`` and ``proj_type``; missing keys take
    :data:`DCT_DEFAULTS`):

    ``score_norm``
        ``"l2"`` (default): column norms of the coefficients; the top-r l2 scores capture the
        most gradient energy of any r basis vectors (optimal for a fixed orthonormal basis).
        ``"l1"``: the reference implementation's default heuristic.
    ``score_route``
        ``"matmul"``: coefficients by one GEMM with the basis (``2 m n^2`` flops).  ``"fft"``:
        a fast DCT through the real FFT (Makhoul), ``O(m n log n)``.  ``"auto"`` (default):
        FFT from basis size :attr:`fft_min_size` on.  Both select the same indices.
    ``rotate_moments``
        On a refresh, re-express the moments in the new subspace:
        ``R_rot = Q_old Q_new^T`` (``Q[:, old]^T Q[:, new]`` in the paper's orientation),
        ``M <- M R_rot`` (right) or ``R_rot^T M`` (left), likewise for the second moment.
        For a fixed orthonormal basis ``R_rot`` is exactly the 0/1 partial permutation
        ``[old_a == new_b]``: moments of frequencies that stay selected move to their new slot,
        those of new frequencies start at zero; the paper's ``|V R_rot|`` is then a no-op
        (a permutation keeps ``V >= 0``), so it is computed exactly, without the basis.
        The rule rotates every moment that keeps the rank axis
        (:meth:`~lowrank_optim.rules.Rule.map_moments`: Adam's two moments, Adafactor's first
        moment and its factored statistic along the rank axis); 8-bit moments (``bits=8``) are
        dequantised, rotated and requantised.
        Default ``True``.  The reference defaults to ``False``, which leaves slot ``j`` of the
        moments to whatever frequency is ``j``-th after the next selection: with a refresh
        every step that scrambles the moments (tiny LLaMA on the order-2 task of
        ``tests/test_dct_convergence.py``, rank 8, 300 steps, one seed: final loss 1.49
        without rotation, 1.09 with it, 1.00 for GaLore with ``update_proj_gap=50``).
    ``error_feedback``
        Keep the projection residual ``E <- (G + E) - back(project(G + E))`` in a full-size
        buffer (parameter dtype, or codes: ``error_feedback_bits``) under
        :data:`ERROR_FEEDBACK_KEY` and add it to the next gradient.  Costs ``m n`` floats per
        layer (memory category ``other``).
        ``refresh`` / ``project`` consume the residual, so call them once per step (the core
        does).  Default ``False``.
    ``error_feedback_bits``
        Precision of the residual: 32 (default: the parameter's dtype), 8 or 4.  Below 32 it
        is kept as block-wise codes (:mod:`~lowrank_optim.projectors.quantized`: entries
        ``error_feedback_codes`` / ``error_feedback_absmax``, blocks of
        :data:`ERROR_FEEDBACK_BLOCK_SIZE`, memory category ``other``), about 1/4 or 1/8 of the
        fp32 bytes, as the reference DCT-AdamW offers; each step dequantises it, adds it to the
        gradient and quantises the new residual, so what the quantisation drops is lost (the
        telescoping sum holds up to the sum of the per-step rounding errors).

    Per-parameter state: ``proj_idx`` (int32, the ``r`` selected frequencies in increasing
    order: the order is canonical, so both routes agree exactly) and ``proj_shape`` (int64,
    the weight's shape, so :meth:`project_back` knows side and basis size).  No float projector
    is stored; the shared bases are reported by :meth:`shared_buffers`.

    Parameters
    ----------
    fft_min_size
        Smallest basis size for which ``score_route="auto"`` takes the FFT route.
    """

    name = "dct"
    structure_keys = {**Projector.structure_keys,
                      "error_feedback": DCT_DEFAULTS["error_feedback"],
                      "error_feedback_bits": DCT_DEFAULTS["error_feedback_bits"]}
    subspace_keys = {"proj_idx": "indices", "proj_shape": "indices"}
    extra_keys = quantized.categories(ERROR_FEEDBACK_KEY, "other")
    hyperparameters = (*Projector.hyperparameters, *DCT_DEFAULTS)
    defaults = DCT_DEFAULTS
    row_shardable = True
    refresh_from_rows = True

    def __init__(self, fft_min_size: int = AUTO_FFT_MIN_SIZE) -> None:
        check_int_at_least("fft_min_size", fft_min_size, 1)
        self.fft_min_size = fft_min_size
        self._bases: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}
        self._scratch: torch.Tensor | None = None

    # -- shared bases ---------------------------------------------------------------------
    def basis(self, n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The DCT-II basis of size ``n`` (built on first use, then shared by every layer)."""
        key = (n, torch.device(device), dtype)
        if key not in self._bases:
            self._bases[key] = dct_matrix(n, dtype=dtype, device=device)
        return self._bases[key]

    def shared_buffers(self) -> list[torch.Tensor]:
        """The bases this projector instance built: one per (size, device, dtype) in use."""
        return list(self._bases.values())

    def scratch(self, shape: tuple[int, ...], dtype: torch.dtype,
                device: torch.device) -> torch.Tensor | None:
        """A ``shape`` / ``dtype`` view of this projector's CPU scratch buffer (``None`` off the
        CPU), for one temporary at a time: a refresh's spectrum, then its moment rotation.

        On the CPU a fresh tensor above the allocator's mmap threshold (32 MB) costs page faults
        every time (the spectrum of a 32000 x 512 head: ~15 ms of a ~30 ms transform), so
        refreshes share one buffer, grown to the largest temporary seen.  It is scratch, not
        optimizer state: it holds nothing between calls, is not saved and is not in
        :meth:`shared_buffers`.  Elsewhere the caching allocator already reuses the memory.
        """
        if torch.device(device).type != "cpu":
            return None
        size = math.prod(shape) * dtype.itemsize
        if self._scratch is None or self._scratch.numel() < size:
            self._scratch = torch.empty(size, dtype=torch.uint8, device="cpu")
        return self._scratch[:size].view(dtype).view(shape)

    # -- settings ---------------------------------------------------------------------------
    def validate(self, param: torch.Tensor, group: dict, label: str) -> None:
        proj_type = group.get("proj_type", "std")
        check_choice("proj_type", proj_type, DCT_PROJ_TYPES)
        check_rank(group["rank"], param, label, proj_type)
        check_choice("score_norm", _opt(group, "score_norm"), SCORE_NORMS)
        check_choice("score_route", _opt(group, "score_route"), SCORE_ROUTES)
        check_choice("rotate_moments", _opt(group, "rotate_moments"), (False, True))
        check_choice("error_feedback", _opt(group, "error_feedback"), (False, True))
        quantized.check_bits("error_feedback_bits", _opt(group, "error_feedback_bits"))

    def sides(self, shape: tuple[int, ...], group: dict) -> tuple[str, ...]:
        return (dct_side(shape, group.get("proj_type", "std"))[0],)

    def fsdp2_problem(self, group: dict) -> str | None:
        if _opt(group, "error_feedback"):
            return ("error_feedback=True is not supported under FSDP2: DCT error feedback keeps "
                    "a full-size residual per weight; turn it off under FSDP2")
        return None

    def overlap(self, old: dict, new: dict, group: dict) -> torch.Tensor | None:
        """Share of the new frequencies that were already selected (see
        :func:`~lowrank_optim.projectors.base.index_overlap`)."""
        return index_overlap(old.get("proj_idx"), new.get("proj_idx"))

    def route(self, n: int, group: dict) -> str:
        """``"matmul"`` or ``"fft"``: how the coefficients of a size-``n`` basis are scored."""
        route = _opt(group, "score_route")
        if route == "auto":
            return "fft" if n >= self.fft_min_size else "matmul"
        return route

    # -- the projection ---------------------------------------------------------------------
    def has_subspace(self, state: dict) -> bool:
        return "proj_idx" in state

    def coefficients(self, grad: torch.Tensor, group: dict) -> torch.Tensor:
        """All DCT coefficients of ``grad`` on its projected side: ``G Q^T`` or ``Q G``.

        The FFT route returns fp32 for half-precision gradients; the matmul route returns the
        gradient's dtype (the basis is built in that dtype).
        """
        side, n = dct_side(grad.shape, group.get("proj_type", "std"))
        if self.route(n, group) == "fft":
            return kernels.dct2_fft(grad, dim=1 if side == "right" else 0)
        q = self.basis(n, grad.device, grad.dtype)
        return kernels.project(grad, q if side == "right" else q.t(), side)

    @staticmethod
    def top(scores: torch.Tensor, rank: int) -> torch.Tensor:
        """Indices (int32, increasing) of the ``rank`` largest ``scores``."""
        return torch.topk(scores, rank, sorted=False).indices.sort().values.to(torch.int32)

    def refresh(self, grad: torch.Tensor, state: dict, group: dict,
                rule: Rule) -> torch.Tensor:
        return self._refresh(grad, state, group, tuple(grad.shape), None, rule)

    def refresh_rows(
        self, rows: torch.Tensor, state: dict, group: dict, shape: tuple[int, ...],
        all_reduce: Callable[[torch.Tensor], object], rule: Rule,
    ) -> torch.Tensor:
        """Refresh from this rank's rows of a gradient of ``shape`` split by rows (FSDP2).

        Right side only (the basis mixes columns, which every rank holds in full): each rank
        scores its rows (l2: squared norms, l1: absolute sums, so partial scores add up),
        ``all_reduce`` sums them in place across ranks, and every rank picks the same
        frequencies without gathering the gradient: ``n`` floats of communication instead of
        ``m n``.  Returns this rank's rows of the low-rank gradient.
        """
        side, _ = dct_side(shape, group.get("proj_type", "std"))
        if side != "right":
            raise ValueError(f"refresh_rows needs a right-side projection, not {side!r} "
                             f"(shape {shape}, proj_type={group.get('proj_type', 'std')!r})")
        return self._refresh(rows, state, group, shape, all_reduce, rule)

    def _refresh(self, grad: torch.Tensor, state: dict, group: dict, shape: tuple[int, ...],
                 all_reduce: Callable[[torch.Tensor], object] | None,
                 rule: Rule) -> torch.Tensor:
        side, n = dct_side(shape, group.get("proj_type", "std"))
        acc = self._with_error(grad, state, group)
        norm = _opt(group, "score_norm")
        positions = None
        if self.route(n, group) == "fft":  # packed coefficients and additive scores, one pass
            rows, size = acc.shape if side == "right" else acc.shape[::-1]
            spectrum = self.scratch((rows, size // 2 + 1), torch.complex128
                                    if acc.dtype == torch.float64 else torch.complex64,
                                    acc.device)
            coeffs, scores, positions = kernels.dct_fft_coefficients(acc, side, norm, spectrum)
        else:
            coeffs = self.coefficients(acc, group)
            scores = kernels.dct_scores(coeffs, side, norm)
            if all_reduce is not None:  # partial scores of a row shard: make them additive
                scores = scores.float().square() if norm == "l2" else scores
        if all_reduce is not None:
            scores = scores.float()
            all_reduce(scores)
        idx = self.top(scores, group["rank"])
        where = idx if positions is None else positions.index_select(0, idx)
        low = kernels.gather_lowrank(coeffs, where, side).to(grad.dtype)
        old = state.get("proj_idx")  # rotated after the gather: the scratch is free again
        if old is not None and _opt(group, "rotate_moments") and not torch.equal(old, idx):
            self._rotate_moments(rule, state, group, old, idx, side)
        state["proj_idx"] = idx
        if "proj_shape" not in state:
            state["proj_shape"] = torch.tensor(shape, dtype=torch.int64)
        self._store_error(acc, low, state, group)
        return low

    def project(self, grad: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        side, n = dct_side(grad.shape, group.get("proj_type", "std"))
        acc = self._with_error(grad, state, group)
        low = kernels.project_indexed(
            acc, self.basis(n, acc.device, acc.dtype), state["proj_idx"], side
        )
        self._store_error(acc, low, state, group)
        return low

    def project_back(self, low: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        shape = tuple(int(s) for s in state["proj_shape"])
        side, n = dct_side(shape, group.get("proj_type", "std"))
        return kernels.project_back_indexed(
            low, self.basis(n, low.device, low.dtype), state["proj_idx"], side
        )

    def apply_update(
        self, param: torch.Tensor, low: torch.Tensor, alpha: float, state: dict, group: dict,
        decay_before: float = 0.0, decay_after: float = 0.0,
    ) -> None:
        side, n = dct_side(param.shape, group.get("proj_type", "std"))
        kernels.project_back_indexed_update(
            param, low, self.basis(n, param.device, param.dtype), state["proj_idx"], side, alpha,
            decay_before, decay_after,
        )

    # -- options ----------------------------------------------------------------------------
    @staticmethod
    def rotation(old: torch.Tensor, new: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``R_rot = Q[old] Q[new]^T`` (r x r) for an orthonormal ``Q``: exactly ``[old_a ==
        new_b]``, computed from the indices alone."""
        return (old.unsqueeze(1) == new.unsqueeze(0)).to(dtype)

    def _rotate_moments(
        self, rule: Rule, state: dict, group: dict, old: torch.Tensor, new: torch.Tensor,
        side: str,
    ) -> None:
        """Have ``rule`` re-express its moments in the new selection (rank axis: the
        low-rank gradient's columns on the right, its rows on the left).

        The rotation by :meth:`rotation` is a 0/1 partial permutation, so it is applied as an
        index remap (:func:`~lowrank_optim.kernels.selection_remap`, once per weight, then
        :func:`~lowrank_optim.kernels.remap_lowrank_` in place per moment: a gather of the kept
        slots and zeros for the new ones), not as an ``r x r`` matmul.
        """
        remaps: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

        def rotate(value: torch.Tensor, axis: int) -> torch.Tensor:
            if value.device not in remaps:
                remaps[value.device] = kernels.selection_remap(old.to(value.device),
                                                               new.to(value.device))
            scratch = self.scratch(tuple(value.shape), value.dtype, value.device)
            return kernels.remap_lowrank_(value, *remaps[value.device], axis, scratch)

        rule.map_moments(state, group, 1 if side == "right" else 0, rotate)

    @staticmethod
    def _with_error(grad: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        if not _opt(group, "error_feedback"):
            return grad
        err = quantized.load(state, ERROR_FEEDBACK_KEY, tuple(grad.shape),
                             error_feedback_precision(group))
        return grad if err is None else grad + err.to(grad.dtype)

    def _store_error(
        self, acc: torch.Tensor, low: torch.Tensor, state: dict, group: dict
    ) -> None:
        if not _opt(group, "error_feedback"):
            return
        side, n = dct_side(acc.shape, group.get("proj_type", "std"))
        back = kernels.project_back_indexed(
            low, self.basis(n, acc.device, acc.dtype), state["proj_idx"], side
        )
        residual = acc - back
        how = error_feedback_precision(group)
        if how.bits < 32:
            quantized.store(state, ERROR_FEEDBACK_KEY, residual, how)
        elif ERROR_FEEDBACK_KEY in state:
            state[ERROR_FEEDBACK_KEY].copy_(residual)
        else:
            quantized.drop(state, ERROR_FEEDBACK_KEY)
            state[ERROR_FEEDBACK_KEY] = residual
