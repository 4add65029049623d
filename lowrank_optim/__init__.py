"""lowrank-optim: drop-in torch.optim optimizers with low-rank optimizer state."""

from lowrank_optim import memory
from lowrank_optim.groups import param_groups
from lowrank_optim.optim import GaLoreAdafactor, GaLoreAdamW, LowRankOptimizer
from lowrank_optim.registry import available, create_optimizer

__version__ = "0.1.0"

__all__ = [
    "GaLoreAdafactor",
    "GaLoreAdamW",
    "LowRankOptimizer",
    "available",
    "create_optimizer",
    "memory",
    "param_groups",
]
