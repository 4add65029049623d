"""The ``torch.optim.Optimizer`` classes users import."""

from lowrank_optim.optim.base import LowRankOptimizer
from lowrank_optim.optim.compose import compose
from lowrank_optim.optim.dct import DCTAdafactor, DCTAdamW
from lowrank_optim.optim.galore import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit
from lowrank_optim.optim.sst import SSTAdamW

__all__ = ["DCTAdafactor", "DCTAdamW", "GaLoreAdafactor", "GaLoreAdamW", "GaLoreAdamW8bit",
           "LowRankOptimizer", "SSTAdamW", "compose"]
