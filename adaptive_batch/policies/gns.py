"""GradientNoiseScale: AdaptDL's gradient noise scale drives the batch size."""

from __future__ import annotations

import math
from typing import Any

from ..contract import Feedback, GradientNoise, Progress, check_state_keys
from ..errors import AdaptiveBatchError, renamed_arguments

__all__ = ["GradientNoiseScale", "goodput"]


def goodput(
    batch_size: float, noise_scale: float, initial_batch_size: float, overhead_samples: float
) -> float:
    """Throughput times statistical efficiency, up to a constant.

    Throughput ``B / (B + k)`` (a step costs a fixed overhead worth ``k`` samples plus its samples);
    efficiency ``(phi + B_0) / (phi + B)`` (AdaptDL's progress per sample relative to ``B_0``).
    """
    if math.isinf(noise_scale):
        return batch_size / (batch_size + overhead_samples)
    efficiency = (noise_scale + initial_batch_size) / (noise_scale + batch_size)
    return batch_size / (batch_size + overhead_samples) * efficiency


class GradientNoiseScale:
    """Batch size at the goodput optimum ``sqrt(k * phi)`` for the gradient noise scale ``phi``.

    The noise scale ``phi = tr(Sigma) / |G|^2`` is estimated as AdaptDL does: unbiased per-batch
    estimates of the per-sample gradient variance ``tr(Sigma)`` and of the squared norm of the true
    gradient ``|G|^2``, each smoothed by a running average with bias correction. From one batch of
    ``B`` per-sample gradients (feedback ``grad_variance`` ``v`` and ``grad_sq_norm`` ``s``):
    ``var = v * B / (B - 1)`` and ``sqr = s - var / B``.

    AdaptDL picks the batch size maximising goodput (throughput times statistical efficiency) from
    a throughput model it fits to measured step times. This rule keeps the efficiency term and uses
    a fixed throughput model, ``B / (B + k)``, whose optimum is ``B* = sqrt(k * phi)``; it moves
    there only when the predicted goodput gain exceeds ``min_gain`` (AdaptDL: 5%), which stops it
    thrashing between nearby sizes.

    Args:
        overhead_samples: ``k``, the batch size at which a step's fixed cost equals its per-sample
            cost (time steps at two sizes: ``k = (t1 * B2 - t2 * B1) / (t2 - t1)``). Default 128.
        ema_decay: running-average factor (default 0.95; formerly ``decay``).
        min_gain: the predicted relative goodput gain needed to switch (default 0.05).
        initial_batch_size: ``B_0`` of the efficiency term; default the sampler's starting size.
        scope: ``"head"`` (default) estimates from the head's per-sample gradients; ``"model"``
            makes a SubsetFilter given the model probe every parameter (exact, costlier).
    """

    @renamed_arguments(decay="ema_decay")
    def __init__(
        self,
        *,
        overhead_samples: float = 128.0,
        ema_decay: float = 0.95,
        min_gain: float = 0.05,
        initial_batch_size: int | None = None,
        scope: str = "head",
    ) -> None:
        if not overhead_samples > 0 or not 0.0 <= ema_decay < 1.0 or min_gain < 0:
            raise AdaptiveBatchError(
                "need overhead_samples > 0, 0 <= ema_decay < 1 and min_gain >= 0"
            )
        if scope not in ("head", "model"):
            raise AdaptiveBatchError(f"scope must be 'head' or 'model'; got {scope!r}")
        self.overhead_samples = overhead_samples
        self.ema_decay = ema_decay
        self.min_gain = min_gain
        self.initial_batch_size = initial_batch_size
        self.probe_scope = scope
        self.var_avg = 0.0
        self.sqr_avg = 0.0
        self.count = 0

    def estimates(self) -> tuple[float, float] | None:
        """Bias-corrected ``(tr(Sigma), |G|^2)``, or ``None`` before any batch."""
        if self.count == 0:
            return None
        correction = 1.0 - self.ema_decay**self.count
        return self.var_avg / correction, self.sqr_avg / correction

    def noise_estimate(self) -> GradientNoise | None:
        """The estimates as a :class:`~adaptive_batch.GradientNoise` (what the sampler exposes as
        ``sampler.gradient_noise`` for AdaScale), or ``None`` before any batch."""
        estimates = self.estimates()
        return None if estimates is None else GradientNoise(*estimates)

    def noise_scale(self) -> float:
        estimates = self.estimates()
        if estimates is None:
            return math.nan
        var, sqr = estimates
        return math.inf if sqr <= 0 else max(var, 0.0) / sqr

    def next_batch_size(self, batch_size: int, feedback: Feedback, progress: Progress) -> float:
        if self.initial_batch_size is None:
            self.initial_batch_size = batch_size
        size = feedback.batch_size
        v, s = (
            feedback.stats.get("grad_variance", math.nan),
            feedback.stats.get("grad_sq_norm", math.nan),
        )
        if size < 2 or not (math.isfinite(v) and math.isfinite(s)):
            return batch_size
        var = v * size / (size - 1)
        sqr = s - var / size
        self.var_avg = self.ema_decay * self.var_avg + (1 - self.ema_decay) * var
        self.sqr_avg = self.ema_decay * self.sqr_avg + (1 - self.ema_decay) * sqr
        self.count += 1
        phi = self.noise_scale()
        target = math.inf if math.isinf(phi) else max(1.0, math.sqrt(self.overhead_samples * phi))
        if math.isinf(target):
            return math.inf
        b0, k = self.initial_batch_size, self.overhead_samples
        gain = goodput(target, phi, b0, k) / goodput(batch_size, phi, b0, k)
        return round(target) if gain > 1 + self.min_gain else batch_size

    def state_dict(self) -> dict[str, Any]:
        return {
            "var_avg": self.var_avg,
            "sqr_avg": self.sqr_avg,
            "count": self.count,
            "initial_batch_size": self.initial_batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_keys(self, state)
        self.var_avg = state["var_avg"]
        self.sqr_avg = state["sqr_avg"]
        self.count = state["count"]
        self.initial_batch_size = state["initial_batch_size"]
