"""Stage 5, train: what touches the user's training step, and only when asked -- a learning-rate
scheduler that follows the batch size, and DBA's per-layer backward."""

from .lr_coupling import BatchSizeLR
from .per_layer import PerLayerBackward

__all__ = ["BatchSizeLR", "PerLayerBackward"]
