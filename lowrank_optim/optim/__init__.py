"""The ``torch.optim.Optimizer`` classes users import."""

from lowrank_optim.optim.apollo import ApolloAdamW, ApolloMini
from lowrank_optim.optim.base import LowRankOptimizer
from lowrank_optim.optim.compose import compose
from lowrank_optim.optim.dct import DCTAdafactor, DCTAdamW
from lowrank_optim.optim.fira import DCTFiraAdamW, FiraAdamW
from lowrank_optim.optim.galore import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit
from lowrank_optim.optim.sst import SSTAdamW

__all__ = ["ApolloAdamW", "ApolloMini", "DCTAdafactor", "DCTAdamW", "DCTFiraAdamW",
           "FiraAdamW", "GaLoreAdafactor", "GaLoreAdamW", "GaLoreAdamW8bit", "LowRankOptimizer",
           "SSTAdamW", "compose"]
