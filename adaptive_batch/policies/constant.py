"""Constant: a fixed batch size (the baseline every other rule is compared with)."""

from __future__ import annotations

from ..contract import Feedback, Progress, Stateless
from ..errors import AdaptiveBatchError

__all__ = ["Constant"]


class Constant(Stateless):
    """Sizing rule that keeps one batch size.

    Args:
        batch_size: the size to keep; ``None`` keeps whatever size the sampler started with.

    Example:
        >>> from adaptive_batch import Feedback, Progress
        >>> import torch
        >>> fb = Feedback(torch.arange(4), torch.arange(0))
        >>> Constant(64).next_batch_size(100, fb, Progress(1, 4, 10))
        64
    """

    def __init__(self, batch_size: int | None = None) -> None:
        if batch_size is not None and batch_size < 1:
            raise AdaptiveBatchError(f"batch_size must be at least 1; got {batch_size}")
        self.batch_size = batch_size

    def next_batch_size(self, batch_size: int, feedback: Feedback, progress: Progress) -> int:
        return batch_size if self.batch_size is None else self.batch_size
