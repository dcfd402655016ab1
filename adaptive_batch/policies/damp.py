"""AdaDamp, PadaDamp and GeoDamp (Sievert & Shah; seed 004): batch size from the training loss.

* AdaDamp: ``B_k = ceil(B_0 * (F_0 - F*) / (F_k - F*))`` with ``F`` the training loss.
* PadaDamp: ``B_k = ceil(B_0 + r * k)`` after ``k`` model updates.
* GeoDamp: ``B = B_0 * factor ** floor(epoch / delay)``.

AdaDamp and PadaDamp keep ``B_0`` for the first ``wait`` updates, then re-evaluate every ``dwell``
updates. Past the largest batch the reference lowers the learning rate instead
(``lr = lr_0 * B_max / B``): these rules answer the unclamped size, the sampler clamps it and keeps
the answer as ``requested_batch_size``, and ``BatchSizeLR(..., rule="damp")`` applies the factor.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from ..contract import Feedback, Progress, check_state_keys
from ..errors import AdaptiveBatchError

__all__ = ["AdaDamp", "GeoDamp", "PadaDamp"]


class _Dwell:
    """``wait`` updates at ``B_0``, then a new size every ``dwell`` updates."""

    def __init__(self, initial_batch_size: int | None, wait: int, dwell: int) -> None:
        if wait < 0 or dwell < 1:
            raise AdaptiveBatchError(f"need wait >= 0 and dwell >= 1; got {wait}, {dwell}")
        if initial_batch_size is not None and initial_batch_size < 1:
            raise AdaptiveBatchError(
                f"initial_batch_size must be at least 1; got {initial_batch_size}"
            )
        self.initial_batch_size = initial_batch_size
        self.wait = wait
        self.dwell = dwell
        self.current: float | None = None

    def _b0(self, batch_size: int) -> int:
        if self.initial_batch_size is None:
            self.initial_batch_size = batch_size  # the sampler's starting size
        return self.initial_batch_size

    def _due(self, updates: int) -> bool:
        return updates >= self.wait and (updates - self.wait) % self.dwell == 0

    def state_dict(self) -> dict[str, Any]:
        return {"initial_batch_size": self.initial_batch_size, "current": self.current}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_keys(self, state)
        self.initial_batch_size = state["initial_batch_size"]
        self.current = state["current"]


class AdaDamp(_Dwell):
    """``B_k = ceil(B_0 * (F_0 - F*) / (F_k - F*))``.

    Args:
        min_loss: ``F*``, the smallest achievable loss (default 0, as the paper assumes).
        initial_batch_size: ``B_0``; default the sampler's starting size.
        wait, dwell: keep ``B_0`` for ``wait`` updates (100), then re-evaluate every ``dwell`` (20).

    ``F_0`` is the mean loss of the first candidate batch (a random sample of the training data at
    initialisation); ``F_k`` is the mean candidate loss over the last ``dwell`` batches. The
    reference instead evaluates the loss on a fixed 10% sample of the training set; these batches
    are fresh random samples of it and cost no extra forward passes. Where ``F_k <= F*`` (a
    ``min_loss`` set too high) the formula has no answer: the rule keeps its last size rather
    than asking for an infinite batch, which would drive a damped learning rate to zero.
    """

    def __init__(
        self,
        *,
        min_loss: float = 0.0,
        initial_batch_size: int | None = None,
        wait: int = 100,
        dwell: int = 20,
    ) -> None:
        super().__init__(initial_batch_size, wait, dwell)
        self.min_loss = min_loss
        self.initial_loss: float | None = None
        self.recent_losses: deque[float] = deque(maxlen=dwell)

    def next_batch_size(self, batch_size: int, feedback: Feedback, progress: Progress) -> float:
        b0 = self._b0(batch_size)
        loss = feedback.stats.get("loss", math.nan)
        if math.isfinite(loss):
            self.recent_losses.append(loss)
            if self.initial_loss is None:
                self.initial_loss = loss
        if self.current is None:
            self.current = float(b0)
        if self._due(progress.updates) and self.recent_losses and self.initial_loss is not None:
            f_k = sum(self.recent_losses) / len(self.recent_losses)
            gap = f_k - self.min_loss
            if gap > 0:  # at or below F* the formula is undefined: keep the last size
                self.current = math.ceil(b0 * (self.initial_loss - self.min_loss) / gap)
        return self.current

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "initial_loss": self.initial_loss,
            "recent_losses": list(self.recent_losses),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.initial_loss = state["initial_loss"]
        self.recent_losses = deque(state["recent_losses"], maxlen=self.dwell)


class PadaDamp(_Dwell):
    """``B_k = ceil(B_0 + rate * k)`` after ``k`` updates.

    Args:
        rate: growth per update (default ``1e-3``, the reference's default).
        initial_batch_size, wait, dwell: as in :class:`AdaDamp`.
    """

    def __init__(
        self,
        *,
        rate: float = 1e-3,
        initial_batch_size: int | None = None,
        wait: int = 100,
        dwell: int = 20,
    ) -> None:
        if not (math.isfinite(rate) and rate >= 0):
            raise AdaptiveBatchError(f"rate must be finite and non-negative; got {rate}")
        super().__init__(initial_batch_size, wait, dwell)
        self.rate = rate

    def next_batch_size(self, batch_size: int, feedback: Feedback, progress: Progress) -> float:
        b0 = self._b0(batch_size)
        if self.current is None:
            self.current = float(b0)
        if self._due(progress.updates):
            self.current = float(math.ceil(b0 + self.rate * progress.updates))
        return self.current


class GeoDamp:
    """``B = B_0 * factor ** floor(epoch / delay)``.

    Args:
        factor: growth per step of the schedule (default 2).
        delay: epochs between steps (default 5).
        initial_batch_size: ``B_0``; default the sampler's starting size.

    ``epoch`` counts the epochs of candidates fed back so far, so the first batch of epoch
    ``delay`` is already drawn at the new size.
    """

    def __init__(
        self, *, factor: float = 2.0, delay: int = 5, initial_batch_size: int | None = None
    ) -> None:
        if not factor > 0 or delay < 1:
            raise AdaptiveBatchError(f"need factor > 0 and delay >= 1; got {factor}, {delay}")
        self.factor = factor
        self.delay = delay
        self.initial_batch_size = initial_batch_size

    def next_batch_size(self, batch_size: int, feedback: Feedback, progress: Progress) -> float:
        if self.initial_batch_size is None:
            self.initial_batch_size = batch_size
        return self.initial_batch_size * self.factor ** (progress.completed_epochs // self.delay)

    def state_dict(self) -> dict[str, Any]:
        return {"initial_batch_size": self.initial_batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_keys(self, state)
        self.initial_batch_size = state["initial_batch_size"]
