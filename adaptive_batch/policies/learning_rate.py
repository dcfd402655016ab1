"""The learning rate a rule couples to: a number, or a callable returning the current one."""

from __future__ import annotations

import math
from collections.abc import Callable

from ..errors import AdaptiveBatchError

__all__ = ["LearningRate"]


class LearningRate:
    """``lr()`` is the current learning rate, or ``nan`` when it is not a positive finite number
    (a rule answering ``nan`` leaves the batch size unchanged).

    Example:
        >>> rates = [0.1]
        >>> lr = LearningRate(lambda: rates[0])
        >>> rates[0] = float("nan")  # a scheduler gone wrong
        >>> lr()
        nan
    """

    def __init__(self, lr: float | Callable[[], float]) -> None:
        if not callable(lr) and not (isinstance(lr, int | float) and 0 < lr < math.inf):
            raise AdaptiveBatchError(
                f"lr must be a positive finite number or a callable; got {lr!r}"
            )
        self.value = lr

    def __call__(self) -> float:
        lr = float(self.value() if callable(self.value) else self.value)
        return lr if 0 < lr < math.inf else math.nan
