"""The policy interface, for writing rules of your own (defined in :mod:`adaptive_batch.contract`).

A selection rule has ``select(ProbeResult) -> Selection``; a sizing rule has
``next_batch_size(batch_size, Feedback, Progress) -> float``; a per-layer rule has
``select_layers(losses, grams) -> LayerSelection``; an epoch-plan rule
``plan(epoch, ScoreTable, generator) -> EpochPlan``; an in-batch rule
``keep_mask(losses, epoch) -> (mask, kept)``. Each also has ``state_dict()`` and
``load_state_dict()`` (:class:`Stateless` supplies empty ones).
"""

from ..contract import (
    EpochPlanRule,
    InBatchRule,
    KeepAll,
    LayerSelectionRule,
    Policy,
    SelectionRule,
    SizingRule,
    Stateless,
    in_batch_rule_of,
    layer_rule_of,
    plan_rule_of,
    probe_scope_of,
    selection_rule_of,
    sizing_rule_of,
)

__all__ = [
    "EpochPlanRule",
    "InBatchRule",
    "KeepAll",
    "LayerSelectionRule",
    "Policy",
    "SelectionRule",
    "SizingRule",
    "Stateless",
    "in_batch_rule_of",
    "layer_rule_of",
    "plan_rule_of",
    "probe_scope_of",
    "selection_rule_of",
    "sizing_rule_of",
]
