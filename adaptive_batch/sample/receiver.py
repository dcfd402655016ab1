"""FeedbackReceiver: the sampler's feedback side -- what each batch's feedback does on arrival.

It owns the per-index ledger, the stages that report (and flush before a checkpoint), the
listeners, and the exchange of feedback between ranks; it asks the sampler's
:class:`~.sizer.BatchSizer` for the next size. Everything it does per feedback costs ``O(batch)``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..contract import Feedback, Progress
from ..errors import AdaptiveBatchTypeError
from .distributed import RankSync, cpu_feedback, merge_for_sizing
from .ledger import FeedbackLedger, as_index_array
from .sizer import BatchSizer

__all__ = ["FeedbackReceiver"]

Listener = Callable[[Any, Feedback], None]


def _losses_array(feedback: Feedback) -> np.ndarray | None:
    losses = feedback.losses
    if losses is None:
        return None
    return losses.detach().to("cpu", torch.float32).reshape(-1).numpy()


class FeedbackReceiver:
    """Takes one :class:`~adaptive_batch.Feedback` per batch: settles and records it in the
    ledger (gathered from every rank under DDP), lets the sizing rule decide the next size, and
    calls the listeners.

    Args:
        dataset_size: rows of the ledger.
        sizer: the sizer whose rule the feedback moves.
        epoch_size: ``() -> (this rank's share of the epoch, the epoch over all ranks)``, read per
            feedback (a cached count, never a sum over the plan).
    """

    def __init__(
        self, dataset_size: int, sizer: BatchSizer, epoch_size: Callable[[], tuple[int, int]]
    ) -> None:
        self.ledger = FeedbackLedger(dataset_size)
        self.sizer = sizer
        self.epoch_size = epoch_size
        self.sync: RankSync | None = None  # set by the sampler under DDP
        self.num_reporters = 0
        self.last_feedback: Feedback | None = None
        self._flushers: list[weakref.ref[Any]] = []
        self._listeners: list[Listener] = []

    # -- who reports and who listens -----------------------------------------------------------

    def register_reporter(self, reporter: object) -> None:
        self.num_reporters += 1
        if callable(getattr(reporter, "flush", None)):
            self._flushers.append(weakref.ref(reporter))

    def flush_reporters(self) -> None:
        """Ask every reporter still alive to report what it holds (before a checkpoint)."""
        for reporter in (ref() for ref in self._flushers):
            if reporter is not None:  # (not its truth: a stage's len() may be unknown)
                reporter.flush()

    def batches_held(self) -> int:
        """Batches the reporters have taken but not yet reported (StepFeedback's batch in
        training and those on their way to the host): not lost, they arrive later."""
        reporters = (ref() for ref in self._flushers)
        return sum(getattr(r, "num_held", 0) for r in reporters if r is not None)

    def add_listener(self, listener: Listener) -> None:
        if not callable(listener):
            raise AdaptiveBatchTypeError(f"a listener must be callable; got {type(listener)}")
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        self._listeners.remove(listener)

    @property
    def wants_gradient_statistics(self) -> bool:
        """Whether anything reads the batch statistics beyond the losses (a sizing rule, a
        listener): a stage computes them only then."""
        return self.sizer.rule is not None or bool(self._listeners)

    # -- per batch -------------------------------------------------------------------------------

    def receive(self, sampler: Any, feedback: Feedback, exchange: bool) -> None:
        """Record ``feedback`` (gathered from every rank when ``exchange``), size the next batch,
        tell the listeners."""
        kept, dropped = as_index_array(feedback.kept), as_index_array(feedback.dropped)
        self.ledger.settle(kept if not dropped.size else np.concatenate([kept, dropped]))
        if exchange and self.sync is not None:
            local = cpu_feedback(feedback)
            items = self.sync.feedback(local, self.ledger.num_feedback)
            for item in items:
                self.ledger.record(
                    as_index_array(item.kept), as_index_array(item.dropped), _losses_array(item)
                )
            merged = merge_for_sizing(items)
        else:
            self.ledger.record(kept, dropped, _losses_array(feedback))
            merged = feedback
        self.last_feedback = feedback
        if self.sizer.rule is not None:
            share, whole = self.epoch_size()
            progress = Progress(self.ledger.num_feedback, self.ledger.num_candidates, whole)
            self.sizer.update(merged, progress, share)
        for listener in self._listeners:
            listener(sampler, feedback)
