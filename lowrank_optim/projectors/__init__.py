"""Subspace sources: one file per projector, one interface (:class:`Projector`)."""

from lowrank_optim.projectors.base import Projector
from lowrank_optim.projectors.dct import DCTProjector, dct_matrix, dct_side
from lowrank_optim.projectors.random import RandomProjector
from lowrank_optim.projectors.sampled import SampledColumnsProjector
from lowrank_optim.projectors.svd import SVDProjector, galore_sides

__all__ = [
    "DCTProjector",
    "Projector",
    "RandomProjector",
    "SVDProjector",
    "SampledColumnsProjector",
    "dct_matrix",
    "dct_side",
    "galore_sides",
]
