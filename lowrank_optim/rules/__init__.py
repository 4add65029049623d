"""Inner rules applied inside the low-rank space (or to full tensors when unprojected)."""

from lowrank_optim.rules.adafactor import Adafactor
from lowrank_optim.rules.adam import Adam
from lowrank_optim.rules.base import Rule, Update

__all__ = ["Adafactor", "Adam", "Rule", "Update"]
