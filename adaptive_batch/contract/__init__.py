"""The contract between the stages: messages, rule protocols, the sampler-side protocols, and the
checkpointing protocol. Everything else in the library depends on this package; it depends on
nothing else in it."""

from .feedback_sink import (
    ChunkPlanner,
    FeedbackSink,
    check_fetched_ahead,
    load_trainer_state,
    trainer_state,
)
from .messages import (
    EpochPlan,
    Feedback,
    GradientNoise,
    LayerSelection,
    ProbeResult,
    Progress,
    Reason,
    ScoreTable,
    Selection,
)
from .rules import (
    EpochPlanRule,
    KeepAll,
    LayerSelectionRule,
    Policy,
    SelectionRule,
    SizingRule,
    check_feedback_source,
    check_whole_batch_policy,
    feedback_source_of,
    layer_rule_of,
    plan_rule_of,
    probe_scope_of,
    selection_rule_of,
    sizing_rule_of,
)
from .stateful import Stateful, Stateless, require_keys

__all__ = [
    "ChunkPlanner",
    "EpochPlan",
    "EpochPlanRule",
    "Feedback",
    "FeedbackSink",
    "GradientNoise",
    "KeepAll",
    "LayerSelection",
    "LayerSelectionRule",
    "Policy",
    "ProbeResult",
    "Progress",
    "Reason",
    "ScoreTable",
    "Selection",
    "SelectionRule",
    "SizingRule",
    "Stateful",
    "Stateless",
    "check_feedback_source",
    "check_fetched_ahead",
    "check_whole_batch_policy",
    "feedback_source_of",
    "layer_rule_of",
    "load_trainer_state",
    "plan_rule_of",
    "probe_scope_of",
    "require_keys",
    "selection_rule_of",
    "sizing_rule_of",
    "trainer_state",
]
