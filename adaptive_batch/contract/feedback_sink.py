"""What the stages downstream of the loader need from a sampler: two small protocols.

A :class:`FeedbackSink` takes feedback (the filter, the per-layer backward and your own code
report to it); a :class:`ChunkPlanner` plans batches assembled from chunks where they are
consumed. :class:`~adaptive_batch.AdaptiveBatchSampler` is both; the stages depend only on these
protocols, never on the sampler class.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from ..errors import AdaptiveBatchError, AdaptiveBatchTypeError
from .messages import Feedback

__all__ = [
    "RANK_STATES_KEY",
    "SAMPLER_STATE_KEY",
    "ChunkPlanner",
    "FeedbackSink",
    "check_feedback_sink",
    "check_fetched_ahead",
    "load_trainer_state",
    "trainer_state",
]


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


def check_feedback_sink(sampler: Any) -> None:
    """A stage reports to a sampler that takes feedback (the ``sampler=`` of every stage)."""
    if not isinstance(sampler, FeedbackSink):
        raise AdaptiveBatchTypeError(
            f"sampler must be an AdaptiveBatchSampler (a FeedbackSink); got {type(sampler).__name__}"
        )


# -- stages a trainer drives (fetched_ahead=True) ----------------------------------------------

#: The keys of a trainer-driven stage's state: the sampler's state and each rank's own part.
SAMPLER_STATE_KEY, RANK_STATES_KEY = "sampler_state", "rank_states"


def check_fetched_ahead(sampler: Any) -> None:
    """A stage a trainer drives reports to a sampler of whole batches."""
    if sampler is None:
        raise AdaptiveBatchError("fetched_ahead=True needs sampler=<the AdaptiveBatchSampler>")
    if sampler.chunk_size is not None:
        raise AdaptiveBatchError(
            "fetched_ahead=True works with whole batches: a trainer that fetches ahead assembles "
            "each batch before its step anyway; build the sampler without chunk_size"
        )


def trainer_state(sampler: Any, own: dict[str, Any]) -> dict[str, Any]:
    """What a trainer-driven stage saves: the sampler's state and every rank's ``own`` state
    (gathered under DDP, where the trainer calls ``state_dict()`` on every rank and writes rank
    0's checkpoint)."""
    gather = getattr(sampler, "rank_states", None)
    return {
        SAMPLER_STATE_KEY: sampler.state_dict(),
        RANK_STATES_KEY: gather(own) if callable(gather) else [own],
    }


def load_trainer_state(sampler: Any, state: dict[str, Any]) -> dict[str, Any]:
    """Load the sampler's part of a trainer-driven stage's state; return this rank's own part."""
    sampler.load_state_dict(state[SAMPLER_STATE_KEY])
    # A trainer takes a checkpoint saved after an epoch's last batch as that epoch's end and
    # starts the next one, creating its iterator at once: a pass with nothing left to draw is not
    # resumed then (a plain loop finishes the empty pass itself).
    if hasattr(sampler, "next_epoch") and callable(getattr(sampler, "set_epoch", None)):
        sampler.set_epoch(sampler.next_epoch)
    ranks, rank = state[RANK_STATES_KEY], getattr(sampler, "rank", 0)
    if rank >= len(ranks):
        raise AdaptiveBatchError(
            f"this checkpoint holds the stage states of {len(ranks)} ranks; this is rank {rank}"
        )
    return ranks[rank]
