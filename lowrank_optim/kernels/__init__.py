"""Dispatch functions for the hot low-rank operations.

Every optimizer calls these and nothing else for projection and back-projection, so a faster
backend (Triton on CUDA) slots in here without a second copy of the math.  The pure-torch
implementations in :mod:`lowrank_optim.kernels.reference` are the specification.

Sides: ``"right"`` uses a basis ``P`` of shape ``(r, n)`` and maps ``G (m, n) -> G P^T (m, r)``;
``"left"`` uses ``P`` of shape ``(m, r)`` and maps ``G -> P^T G (r, n)``.
"""

from lowrank_optim.kernels.reference import project, project_back, project_back_update

__all__ = ["project", "project_back", "project_back_update"]
