"""CABS, Coupling Adaptive Batch Sizes with learning rates (Balles, Romero & Hennig; seed 001)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ..contract import Feedback, Progress, check_state_keys
from ..errors import AdaptiveBatchError, renamed_arguments
from .learning_rate import LearningRate

__all__ = ["CABS"]


class CABS:
    """``next = round(c * lr * xi_avg / L_avg)``: the batch grows as the loss falls relative to the
    gradient variance.

    ``xi`` is the trace of the within-batch covariance of per-sample gradients,
    ``sum over parameters of (mean_i g_i^2 - (mean_i g_i)^2)``; ``L`` the mean loss. Both are read
    from the feedback (``grad_variance`` and ``loss``) and smoothed by running averages with factor
    ``ema_decay`` and no bias correction.

    Args:
        lr: the SGD learning rate, or a callable returning the current one (for example
            ``lambda: optimizer.param_groups[0]["lr"]``). A learning rate that is not a positive
            finite number (a NaN from a diverged scheduler, say) leaves the size unchanged.
        c: the proportionality constant (1 in the paper).
        ema_decay: factor of the running averages (0.95 in the paper; formerly ``decay``).
        initial_loss: the running loss average's start (1.0 in the paper).
        initial_variance: the running variance average's start. The paper's averages start from
            zero, which is why its reference runs begin at the smallest batch (16); default 0.
        variance: ``"exact"`` -- per-sample gradients of every parameter, as the paper computes
            them: a :class:`~adaptive_batch.SubsetFilter` given the model then probes the whole
            model with ``torch.func``. ``"head"`` -- the head's per-sample gradients only, a cheap
            estimate (the default probe).

    The paper's caps are 16 and 2048: use ``AdaptiveBatchSampler(..., batch_size=16,
    min_batch_size=16, max_batch_size=2048)`` to match. It assumes plain SGD and a minimal loss
    near 0.
    """

    @renamed_arguments(decay="ema_decay")
    def __init__(
        self,
        lr: float | Callable[[], float],
        *,
        c: float = 1.0,
        ema_decay: float = 0.95,
        initial_loss: float = 1.0,
        initial_variance: float = 0.0,
        variance: str = "exact",
    ) -> None:
        if not 0.0 <= ema_decay < 1.0:
            raise AdaptiveBatchError(f"ema_decay must lie in [0, 1); got {ema_decay}")
        if variance not in ("exact", "head"):
            raise AdaptiveBatchError(f"variance must be 'exact' or 'head'; got {variance!r}")
        self.lr = lr
        self.current_lr = LearningRate(lr)
        self.c = c
        self.ema_decay = ema_decay
        self.loss_avg = initial_loss
        self.variance_avg = initial_variance
        self.variance = variance
        self.probe_scope = "model" if variance == "exact" else "head"

    def next_batch_size(self, batch_size: int, feedback: Feedback, progress: Progress) -> float:
        loss = feedback.stats.get("loss", math.nan)
        xi = feedback.stats.get("grad_variance", math.nan)
        if not (math.isfinite(loss) and math.isfinite(xi)):
            return batch_size  # a NaN or inf statistic leaves the averages and the size alone
        self.loss_avg = self.ema_decay * self.loss_avg + (1 - self.ema_decay) * loss
        self.variance_avg = self.ema_decay * self.variance_avg + (1 - self.ema_decay) * xi
        if self.loss_avg <= 0:
            return math.inf
        size = self.c * self.current_lr() * self.variance_avg / self.loss_avg
        return round(size) if math.isfinite(size) else size  # NaN: the sampler keeps the size

    def state_dict(self) -> dict[str, Any]:
        return {"loss_avg": self.loss_avg, "variance_avg": self.variance_avg}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_keys(self, state)
        self.loss_avg = state["loss_avg"]
        self.variance_avg = state["variance_avg"]
