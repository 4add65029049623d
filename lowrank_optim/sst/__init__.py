"""Sparse Spectral Training (Zhao et al., ICML 2025, arXiv:2405.15481).

Convert a model, train it with :class:`lowrank_optim.SSTAdamW`, merge it back for export::

    from lowrank_optim import sst, SSTAdamW
    sst.convert(model, rank=64, target_modules="all-linear")
    opt = SSTAdamW(sst.sst_param_groups(model), lr=1e-3)
    ...  # train
    sst.merge(model).save_pretrained("out")
"""

from lowrank_optim.sst.convert import convert, merge, spectral_modules
from lowrank_optim.sst.groups import sst_param_groups
from lowrank_optim.sst.layers import SpectralLinear, spectral_product, svd_factors
from lowrank_optim.sst.sampling import sample_indices, sampling_probabilities, seeded_generator

__all__ = [
    "SpectralLinear",
    "convert",
    "merge",
    "sample_indices",
    "sampling_probabilities",
    "seeded_generator",
    "spectral_modules",
    "spectral_product",
    "sst_param_groups",
    "svd_factors",
]

