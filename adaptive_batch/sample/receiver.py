"""FeedbackReceiver: the sampler's feedback side -- what each batch's feedback does on arrival.

It owns the per-index ledger, the stages that report (and flush before a checkpoint), the
listeners, and the exchange of feedback between ranks; it asks the sampler's
:class:`~.sizer.BatchSizer` for the next size. Everything it does per feedback costs ``O(batch)``.
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..contract import Feedback, FeedbackGroup, Progress
from ..errors import AdaptiveBatchTypeError
from .distributed import RankSync, merge_for_sizing
from .ledger import FeedbackLedger, as_index_array
from .sizer import BatchSizer

__all__ = ["FeedbackReceiver"]

Listener = Callable[[Any, Feedback], None]


def _losses_array(feedback: Feedback | FeedbackGroup) -> np.ndarray | None:
    losses = feedback.losses
    if losses is None:
        return None
    if losses.dtype == torch.float32 and losses.device.type == "cpu" and not losses.requires_grad:
        return losses.numpy().reshape(-1)  # (a stage's: no conversion to dispatch)
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
        self._last: Feedback | FeedbackGroup | None = None  # a group's is built when read
        self._sent: deque[tuple[int, int, int] | None] = (
            deque()
        )  # DDP: each unapplied step's context
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

    def report_held(self) -> None:
        """Ask every reporter to report the batches it holds only to fill a group."""
        for reporter in (ref() for ref in self._flushers):
            if reporter is not None and callable(getattr(reporter, "report_held", None)):
                reporter.report_held()

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
        listener that does not say ``wants_gradient_statistics = False``): a stage computes
        them only then."""
        return self.sizer.rule is not None or any(
            getattr(listener, "wants_gradient_statistics", True) for listener in self._listeners
        )

    @property
    def reads_each_feedback(self) -> bool:
        """Whether anything reads feedback batch by batch (a sizing rule, a listener, the
        exchange between ranks): else a stage may report a group of batches at once."""
        return self.sizer.rule is not None or bool(self._listeners) or self.sync is not None

    @property
    def last_feedback(self) -> Feedback | None:
        """The latest batch's feedback."""
        if isinstance(self._last, FeedbackGroup):
            self._last = self._last.last()
        return self._last

    # -- per batch -------------------------------------------------------------------------------

    def receive(self, sampler: Any, feedback: Feedback, exchange: bool) -> None:
        """Record ``feedback``, size the next batch, tell the listeners. With ``exchange`` under
        DDP the feedback goes to every rank instead, and every rank's is recorded and sized from
        when the next one is sent (or a pass starts, a plan is drawn: :meth:`apply_arrived`)."""
        kept, dropped = as_index_array(feedback.kept), as_index_array(feedback.dropped)
        self.ledger.settle(kept if not dropped.size else np.concatenate([kept, dropped]))
        self._last = feedback
        if exchange and self.sync is not None:
            self.apply_arrived()
            self._sent.append(self._context())  # the sizing rule sees the step as it was sent
            self.sync.feedback(feedback, self.ledger.num_feedback)
        else:
            self.ledger.record(kept, dropped, _losses_array(feedback))
            self._size_next(feedback, self._context())
        for listener in self._listeners:
            listener(sampler, feedback)

    def receive_group(self, group: FeedbackGroup) -> None:
        """Record a group of batches' feedback at once (only when nothing reads each one)."""
        if self.reads_each_feedback:
            raise AdaptiveBatchTypeError(
                "feedback comes batch by batch to a sampler with a sizing rule, listeners or "
                "several ranks; a group is for epoch plans on one process"
            )
        candidates = as_index_array(group.candidates)
        repeats = self.ledger.settle_group(candidates, group.batches)
        kept = None if group.kept is None else group.kept.numpy()
        self.ledger.record_group(candidates, kept, _losses_array(group), repeats)
        self._last = group

    def apply_arrived(self) -> None:
        """Record and size from every rank's feedback sent so far (DDP; waits for it)."""
        if self.sync is not None:
            self._apply(self.sync.take())

    def _apply(self, steps: list[list[Feedback]]) -> None:
        for items in steps:
            for item in items:
                self.ledger.record(
                    as_index_array(item.kept), as_index_array(item.dropped), _losses_array(item)
                )
            self._size_next(merge_for_sizing(items), self._sent.popleft())

    # -- checkpoints: what has arrived but is not applied yet is part of the state ----------------

    def in_transit_state(self) -> list[dict[str, Any]]:
        """Every rank's feedback sent but not applied yet (waits for it), and where the run was
        when it was sent, as plain data."""
        if self.sync is None:
            return []
        self.sync.finish()
        return [
            {
                "ranks": [_as_plain(item) for item in items],
                "sent": None if sent is None else list(sent),
            }
            for items, sent in zip(self.sync.arrived, self._sent, strict=True)
        ]

    def load_in_transit_state(self, steps: list[dict[str, Any]]) -> None:
        arrived = [[Feedback(**item) for item in step["ranks"]] for step in steps]
        if self.sync is not None:
            self.sync.take()  # what was on its way belongs to the run being replaced
        self._sent = deque(None if step["sent"] is None else tuple(step["sent"]) for step in steps)
        if self.sync is None:  # saved under DDP, resumed on one process: apply it now
            self._apply(arrived)
        else:
            self.sync.arrived = arrived

    def _context(self) -> tuple[int, int, int] | None:
        """What a sizing rule reads beside a feedback: feedback calls so far and the epoch's
        size (this rank's share, all ranks'); ``None`` without a sizing rule."""
        if self.sizer.rule is None:
            return None
        return (self.ledger.num_feedback, *self.epoch_size())

    def _size_next(self, feedback: Feedback, context: tuple[int, int, int] | None) -> None:
        if context is not None and self.sizer.rule is not None:
            updates, share, whole = context
            progress = Progress(updates, self.ledger.num_candidates, whole)
            self.sizer.update(feedback, progress, share)


def _as_plain(feedback: Feedback) -> dict[str, Any]:
    return {
        "kept": feedback.kept,
        "dropped": feedback.dropped,
        "reason": str(feedback.reason),
        "stats": dict(feedback.stats),
        "losses": feedback.losses,
    }
