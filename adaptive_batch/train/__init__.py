"""Stage 5, train: what touches the user's training step, and only when asked -- feedback from the
training step's own forward (:class:`StepFeedback`; :class:`~adaptive_batch.nodes.StepFeedbackNode` from
:mod:`adaptive_batch.nodes`), a learning-rate scheduler that follows the batch size, and DBA's
per-layer backward."""

from .lr_coupling import BatchSizeLR
from .per_layer import PerLayerBackward
from .step_feedback import StepFeedback
from .weighted_loss import PlanWeights, WeightedLoss, YieldedRows

__all__ = [
    "BatchSizeLR",
    "PerLayerBackward",
    "PlanWeights",
    "StepFeedback",
    "WeightedLoss",
    "YieldedRows",
]
