"""The ``torch.optim.Optimizer`` classes users import."""

from lowrank_optim.optim.base import LowRankOptimizer
from lowrank_optim.optim.galore import GaLoreAdafactor, GaLoreAdamW

__all__ = ["GaLoreAdafactor", "GaLoreAdamW", "LowRankOptimizer"]
