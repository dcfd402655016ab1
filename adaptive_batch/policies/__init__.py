"""Selection and sizing rules: the decision half of adaptive batching.

Every name here is a plain object over tensors and numbers. See ``docs/policies.md``.
"""

from .base import KeepAll, Policy, SelectionRule, SizingRule, selection_rule_of, sizing_rule_of
from .edba import EDBA, EDBASelection, EDBASizing

__all__ = [
    "EDBA",
    "EDBASelection",
    "EDBASizing",
    "KeepAll",
    "Policy",
    "SelectionRule",
    "SizingRule",
    "selection_rule_of",
    "sizing_rule_of",
]
