"""The sampler's names and arguments of earlier versions, kept working with a warning."""

from __future__ import annotations

import warnings
from typing import Any

__all__ = ["SamplerDeprecations", "warn_max_in_flight"]


def warn_max_in_flight(max_in_flight: int | None) -> None:
    if max_in_flight is not None:
        warnings.warn(
            "max_in_flight is no longer used: the sampler tracks each index awaiting feedback, "
            "with no bound to reach",
            DeprecationWarning,
            stacklevel=3,
        )


class SamplerDeprecations:
    """Mixin: the old names of :class:`~adaptive_batch.AdaptiveBatchSampler` attributes."""

    dataset_size: int

    @property
    def num_samples(self) -> int:
        warnings.warn("num_samples is now called dataset_size", DeprecationWarning, stacklevel=2)
        return self.dataset_size

    def consumer_state_dict(self) -> dict[str, Any]:  # the name of version 0.1
        return self.feedback_state_dict()  # type: ignore[attr-defined]

    def load_consumer_state_dict(self, state: dict[str, Any]) -> None:
        self.load_feedback_state_dict(state)  # type: ignore[attr-defined]
