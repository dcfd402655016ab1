"""``torchdata.nodes`` nodes (``pip install 'adaptive-batch[torchdata]'``)."""

from .select.node import SubsetFilterNode
from .train.node import StepFeedbackNode

__all__ = ["StepFeedbackNode", "SubsetFilterNode"]
