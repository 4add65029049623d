"""Cheap top-``r`` singular subspaces for GaLore refreshes: randomized and warm-started.

An exact SVD of an ``m x n`` gradient costs ``O(m n min(m, n))`` in LAPACK's bidiagonalisation,
much of it memory-bound; GaLore only needs the top ``r`` singular vectors of one side.  Both
methods here are block power (subspace) iterations built from GEMMs and thin QRs, all in fp32:

* :func:`randomized_bases` (Halko, Martinsson & Tropp, 2011): sample the range with a seeded
  Gaussian ``n x (r + p)`` matrix, sharpen it with ``q`` power iterations
  (``(G G^T)^q G Omega``, re-orthonormalised between products), then a Rayleigh-Ritz step
  (SVD of the small ``(r + p) x n`` matrix ``Q^T G``) gives ranked singular vectors;
* :func:`warm_bases` (subspace iteration from the current basis, as GaLore 2 and LDAdam
  refresh): ``q`` iterations ``U <- orth(G G^T U)`` started from the previous refresh's basis,
  so the iteration starts near the answer when the subspace drifts slowly; no random numbers.
  Without oversampling it converges slower than the randomized finder when the subspace moves
  a lot between refreshes (``benchmarks/results/refresh_cost_cpu.md`` measures both).

Products alternate with cheap re-conditioning (Cholesky QR, :func:`_condition`); returned
bases are finished by a Householder QR (:func:`orthonormalize`).

Bases follow :mod:`lowrank_optim.kernels`' convention: ``"left"`` is ``(m, r)`` with
orthonormal columns, ``"right"`` is ``(r, n)`` with orthonormal rows.  Both functions are
deterministic (the Gaussian comes from a generator seeded by the caller), so replicas with the
same gradient agree and a resumed run recomputes the same bases.
"""

from __future__ import annotations

import torch


def orthonormalize(y: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning ``y``'s (thin Householder QR), each column's sign chosen
    so that ``R``'s diagonal is non-negative: the unique QR, so a column that already points
    along an orthonormal input keeps its sign (warm refreshes keep moment coordinates)."""
    q, r = torch.linalg.qr(y)
    signs = torch.sign(torch.diagonal(r))
    return q * torch.where(signs == 0, torch.ones_like(signs), signs)


def _condition(y: torch.Tensor) -> torch.Tensor:
    """Well-conditioned columns spanning ``y``'s, for the inside of a power iteration: one
    Cholesky QR (``y R^-1`` with ``R^T R = y^T y``; a GEMM, a small Cholesky and a triangular
    solve, about three times cheaper than Householder on CPU), Householder where the Gram
    matrix is numerically singular.  Not orthonormal to working precision (its error grows
    with ``cond(y)^2``), which the next product does not need; returned bases are always
    finished by :func:`orthonormalize`."""
    factor, info = torch.linalg.cholesky_ex(y.t() @ y, upper=True)
    if int(info) != 0:
        return torch.linalg.qr(y).Q
    return torch.linalg.solve_triangular(factor, y, upper=True, left=False)


def _power(g: torch.Tensor, y: torch.Tensor, iterations: int,
           orthonormal_start: bool = False) -> torch.Tensor:
    """``iterations`` steps ``y <- G G^T y``, re-conditioned before each product
    (:func:`_condition`; not the first when ``y`` is already orthonormal), then orthonormalised:
    orthonormal ``(m, k)``."""
    for i in range(iterations):
        if i or not orthonormal_start:
            y = _condition(y)
        y = g @ _condition(g.t() @ y)
    return orthonormalize(y)


def _ritz(g: torch.Tensor, y: torch.Tensor, rank: int,
          sides: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Top-``rank`` singular vectors of ``g`` within the column space ``y`` (orthonormal
    ``(m, k)``): the SVD of ``y^T g`` (``k x n``, small), through the QR of its transpose."""
    b = y.t() @ g  # (k, n) = R^T Q_b^T
    q_b, r_b = torch.linalg.qr(b.t())
    u_small, _, v_small_h = torch.linalg.svd(r_b.t())  # b = u_small S (q_b v_small)^T
    out = {}
    if "left" in sides:
        out["left"] = y @ u_small[:, :rank]
    if "right" in sides:
        out["right"] = (q_b @ v_small_h.t()[:, :rank]).t()
    return out


def randomized_bases(g: torch.Tensor, rank: int, sides: tuple[str, ...], oversample: int,
                     power_iters: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Top-``rank`` singular bases of ``g`` (fp32, ``m x n``) on ``sides`` by the randomized
    range finder: ``k = min(rank + oversample, m, n)`` Gaussian samples of the range of the
    projected side's matrix, ``power_iters`` power iterations, Rayleigh-Ritz.

    The range is sampled on the side the caller needs, so a right-only basis (``m >= n``,
    GaLore's ``std``) is found from ``g^T`` and its ``(n, k)`` samples, the smaller problem.
    """
    m, n = g.shape
    transpose = sides == ("right",)
    a = g.t() if transpose else g
    k = min(rank + oversample, m, n)
    omega = torch.randn(a.shape[1], k, generator=generator, device=g.device, dtype=g.dtype)
    y = _power(a, a @ omega, power_iters)
    bases = _ritz(a, y, rank, ("left",) if transpose else sides)
    return {"right": bases["left"].t()} if transpose else bases


def warm_bases(g: torch.Tensor, previous: dict[str, torch.Tensor], iterations: int,
               ) -> dict[str, torch.Tensor]:
    """New bases of ``g`` (fp32) on the sides of ``previous`` (their current bases, fp32) by
    ``iterations`` subspace iterations started from them.

    One side: the iterated basis itself (the iteration keeps the previous columns' order and
    signs, so Adam's moment coordinates stay meaningful).  Both sides (``proj_type="full"``):
    the left basis is iterated and both come from its Rayleigh-Ritz step.
    """
    if "left" in previous:
        y = _power(g, previous["left"], iterations, orthonormal_start=True)
        if "right" not in previous:
            return {"left": y}
        return _ritz(g, y, previous["left"].shape[1], ("left", "right"))
    y = _power(g.t(), previous["right"].t(), iterations, orthonormal_start=True)
    return {"right": y.t()}
