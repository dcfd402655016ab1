"""What the stages downstream of the loader need from a sampler: two small protocols.

A :class:`FeedbackSink` takes feedback (the filter, the per-layer backward and your own code
report to it); a :class:`ChunkPlanner` plans batches assembled from chunks where they are
consumed. :class:`~adaptive_batch.AdaptiveBatchSampler` is both; the stages depend only on these
protocols, never on the sampler class.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from .messages import Feedback

__all__ = ["ChunkPlanner", "FeedbackSink"]


@runtime_checkable
class FeedbackSink(Protocol):
    """Receives one :class:`~adaptive_batch.Feedback` per candidate batch.

    Attributes:
        policy: the policy the sampler was built with (a filter without one uses its selection).
        chunk_size: ``None`` when the sampler yields whole batches; else the size of its chunks,
            which the consumer assembles into batches (see :class:`ChunkPlanner`).
    """

    policy: Any
    chunk_size: int | None

    def feedback(self, feedback: Feedback) -> None: ...

    def register_reporter(self, reporter: object) -> None:
        """Say that ``reporter`` will report feedback for every batch (ranks check they agree)."""

    def feedback_state_dict(self) -> dict[str, Any]:
        """The feedback side (sizing rule, size, per-index counts) as of the last feedback."""

    def load_feedback_state_dict(self, state: dict[str, Any]) -> None: ...

    def weights_of(self, indices: Tensor) -> Tensor | None:
        """The current epoch plan's training weights of these dataset indices (``None``: all 1)."""


@runtime_checkable
class ChunkPlanner(Protocol):
    """Plans candidate batches made of whole chunks, at the moment they are consumed."""

    chunk_size: int | None

    def plan_batch(self, remaining: int) -> int:
        """How many indices the next batch takes when ``remaining`` are left in the pass (a whole
        number of chunks; the end of the pass folded so no batch falls below the minimum)."""

    def pass_total(self, indices: Tensor) -> int:
        """How many indices the pass that handed out this chunk hands out from where it started
        (the same for every chunk of a pass; the consumer counts down from it)."""
