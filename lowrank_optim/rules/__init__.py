"""Inner rules applied inside the low-rank space (or to full tensors when unprojected).

One file per rule; each declares its state (:class:`Moment`) and capabilities on
:class:`Rule`, and :mod:`~lowrank_optim.rules.lowbit` stores moments in 8 bits for rules that
support it.
"""

from lowrank_optim.rules import lowbit, scaling
from lowrank_optim.rules.adafactor import Adafactor
from lowrank_optim.rules.adam import Adam
from lowrank_optim.rules.apollo import Apollo
from lowrank_optim.rules.base import Moment, MomentMap, Projection, Rule, Update
from lowrank_optim.rules.fira import Fira

__all__ = ["Adafactor", "Adam", "Apollo", "Fira", "Moment", "MomentMap", "Projection", "Rule",
           "Update", "lowbit", "scaling"]
