"""Subspace sources: one file per projector, one interface (:class:`Projector`)."""

from lowrank_optim.projectors.base import Projector
from lowrank_optim.projectors.svd import SVDProjector, galore_sides

__all__ = ["Projector", "SVDProjector", "galore_sides"]
