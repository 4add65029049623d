"""lowrank-optim: drop-in torch.optim optimizers with low-rank optimizer state."""

from lowrank_optim import memory, schedules, sst
from lowrank_optim.groups import param_groups
from lowrank_optim.layerwise import LayerwiseOptimizer
from lowrank_optim.optim import (
    ApolloAdamW,
    ApolloMini,
    DCTAdafactor,
    DCTAdamW,
    DCTFiraAdamW,
    FiraAdamW,
    GaLoreAdafactor,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    LowRankOptimizer,
    SSTAdamW,
)
from lowrank_optim.registry import available, create_optimizer

__version__ = "0.1.0"

__all__ = [
    "ApolloAdamW",
    "ApolloMini",
    "DCTAdafactor",
    "DCTAdamW",
    "DCTFiraAdamW",
    "FiraAdamW",
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "GaLoreAdamW8bit",
    "LayerwiseOptimizer",
    "LowRankOptimizer",
    "SSTAdamW",
    "available",
    "create_optimizer",
    "memory",
    "param_groups",
    "schedules",
    "sst",
]
