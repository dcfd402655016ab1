"""The sampler's feedback side: what stages and users call to report, read scores and listen.

A mixin of :class:`~adaptive_batch.AdaptiveBatchSampler` whose state all lives in the sampler's
:class:`~.receiver.FeedbackReceiver` (``self.receiver``: the ledger, the reporters, the
listeners, the exchange between ranks); the sampler's own module keeps the index order, the
sizes and the hand-out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..contract import Feedback, FeedbackGroup, GradientNoise
from .ledger import FeedbackLedger, as_index_array

__all__ = ["SamplerFeedbackSide"]

Listener = Callable[[Any, Feedback], None]  # (the sampler, the feedback)


class SamplerFeedbackSide:
    """Mixin: reporting feedback, the per-index table and the epoch plan's weights."""

    last_feedback = property(lambda self: self.receiver.last_feedback, doc="The latest feedback.")

    @property
    def num_feedback(self) -> int:
        """Batches fed back (a group counts each of its batches)."""
        self.receiver.report_held()
        return self._table.num_feedback

    # Under DDP, the other ranks' feedback of the latest step arrives with the next step; reading
    # the table applies what has arrived first (waiting for it), so these always count it all.
    @property
    def ledger(self) -> FeedbackLedger:
        """The per-index feedback table (every batch reported so far, of every rank)."""
        self.receiver.report_held()
        self.receiver.apply_arrived()
        return self.receiver.ledger

    times_kept = property(lambda self: self.ledger.times_kept, doc="Per index: times kept.")
    times_dropped = property(lambda self: self.ledger.times_dropped, doc="Per index: dropped.")
    num_candidates = property(
        lambda self: self.ledger.num_candidates, doc="Candidates fed back (over all ranks)."
    )
    num_kept = property(lambda self: self.ledger.num_kept, doc="Candidates kept (over all ranks).")
    _table = property(lambda self: self.receiver.ledger)  # as it stands: the per-step path's

    def score_table_bytes(self) -> int:
        """Bytes of the per-index feedback table (losses and counts): what the sampler keeps per
        dataset index beyond the index order itself."""
        return self._table.score_table_bytes()

    @property
    def estimates_gradient_noise(self) -> bool:
        return callable(getattr(self.sizer.rule, "noise_estimate", None))

    @property
    def gradient_noise(self) -> GradientNoise | None:
        """The sizing rule's gradient-noise estimates, where it keeps them (else ``None``)."""
        return self.sizer.rule.noise_estimate() if self.estimates_gradient_noise else None  # type: ignore[union-attr]

    # -- feedback ------------------------------------------------------------------------------

    @property
    def expects_feedback(self) -> bool:
        return self.is_adaptive or self._plans_from_scores or self.receiver.num_reporters > 0

    @property
    def _plans_from_scores(self) -> bool:
        """Whether the epoch plan reads the scores feedback reports (RS2's does not)."""
        return self.planning is not None and getattr(self.planning, "reads_scores", True)

    @property
    def wants_gradient_statistics(self) -> bool:
        """Whether anything reads batch statistics beyond per-sample losses (a sizing rule, a
        listener): a stage that measures the training step computes them only then."""
        return self.receiver.wants_gradient_statistics

    def register_reporter(self, reporter: object) -> None:
        """Record that ``reporter`` (a filter, say) will report feedback for every batch. A
        reporter with a ``flush()`` (StepFeedback) is asked to report what it holds before any
        checkpoint is taken, so a checkpoint never misses a batch already trained."""
        self.receiver.register_reporter(reporter)

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(sampler, feedback)`` after each feedback is recorded and the next size
        decided (a :class:`~adaptive_batch.TrajectoryLogger`); not part of the state."""
        self.receiver.add_listener(listener)

    def remove_listener(self, listener: Listener) -> None:
        """Stop calling ``listener``; a ``ValueError`` if it was never added."""
        self.receiver.remove_listener(listener)

    def rank_states(self, state: dict[str, Any]) -> list[dict[str, Any]]:
        """Every rank's ``state``, in rank order: a collective under DDP (every rank calls it,
        as a trainer saving a checkpoint does); ``[state]`` on one replica."""
        return [state] if self.sync is None else self.sync.states(state)

    def feedback(self, feedback: Feedback) -> None:
        """Record what became of one yielded batch, then let the sizing rule pick the next size.

        Raises :class:`~adaptive_batch.AdaptiveBatchError` when the kept and dropped indices do
        not await feedback (indices this sampler never handed out, feedback given twice). Under
        DDP every rank must call it once per batch: the ranks' feedback is gathered, every rank
        counts all of it, and every rank's sizing rule sees the same merged numbers, so sizes
        agree; a rank out of step makes every rank raise.
        """
        self.receiver.receive(self, feedback, exchange=self.expects_feedback)

    def feedback_group(self, group: FeedbackGroup) -> None:
        """Record several consecutive batches' feedback at once: what a stage sends when
        :attr:`reads_each_feedback` is false (an epoch plan on one process, no listener), so
        the work of reporting is paid once per group. Raises as :meth:`feedback` does."""
        self.receiver.receive_group(group)

    reads_each_feedback = property(
        lambda self: self.receiver.reads_each_feedback,
        doc="Whether feedback is read batch by batch (a sizing rule, a listener, several "
        "ranks); else stages may report groups of batches (:meth:`feedback_group`).",
    )

    # -- epoch plans -----------------------------------------------------------------------------

    def weights_of(self, indices: Tensor) -> Tensor | None:
        """The current epoch plan's training weights of these dataset indices (``None``: all 1).

        InfoBatch keeps a random part of the well-learned samples and weighs them up so that the
        expected gradient is unchanged; ``StepFeedback.weighted(loss)`` applies them."""
        run = self.active
        if run is None:
            return None
        weights = self.order.weights(run.epoch, as_index_array(indices))
        return None if weights is None else torch.from_numpy(weights)

    def _scores_of(self, indices: Tensor | None) -> Any:
        return self.ledger.scores(indices)  # (every rank's feedback so far: see ``ledger``)

    @property
    def scores(self) -> Any:
        """The per-index scores epoch plans decide from (a :class:`~adaptive_batch.contract.ScoreTable`
        over the index set)."""
        return self._scores_of(self.order.indices)
