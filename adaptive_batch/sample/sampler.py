"""AdaptiveBatchSampler: a DataLoader ``batch_sampler`` whose batch size follows feedback."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence, Sized
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Sampler

from ..contract import Feedback, GradientNoise, plan_rule_of, sizing_rule_of
from ..errors import AdaptiveBatchError, AdaptiveBatchTypeError, AdaptiveBatchWarning
from .buckets import SizeBuckets, as_buckets
from .checkpoint import SamplerCheckpoint, sampler_config
from .chunks import ChunksInFlight
from .deprecated import SamplerDeprecations, warn_max_in_flight
from .distributed import RankSync, resolve_replicas
from .ledger import as_index_array
from .order import IndexOrder
from .passes import SamplerPass
from .receiver import FeedbackReceiver
from .sizer import BatchSizer

__all__ = ["AdaptiveBatchSampler"]


class AdaptiveBatchSampler(SamplerCheckpoint, SamplerDeprecations, Sampler[list[int]]):
    """Yields batches of dataset indices whose size a sizing rule adapts from feedback.

    Use it as ``DataLoader(dataset, batch_sampler=sampler)``; a
    :class:`~adaptive_batch.SubsetFilter` (or your own code) calls :meth:`feedback` after each
    batch, and the policy's sizing rule picks the size of the batches drawn after that.

    Args:
        data_source: the dataset (anything with ``len``) or its length.
        policy: a :class:`~adaptive_batch.policies.Policy`, a sizing rule or an epoch-plan rule;
            ``None`` keeps ``batch_size`` fixed and draws the whole index set every epoch. The
            sampler uses the sizing rule (the size of the next batch) and the plan rule (which
            indices each epoch draws, from the losses feedback reports).
        batch_size: size of the first batch (EDBA's start: 100), per rank.
        min_batch_size, max_batch_size: caps on every size the policy asks for (EDBA's: 10, 1000).
        indices: the index set to draw from (a list or tensor, in the order used without
            ``shuffle``); default the whole dataset. Nothing outside it is ever yielded.
        shuffle: draw each epoch in a permutation seeded by ``seed + epoch``.
        seed: seed of the shuffle; must be the same on every rank.
        drop_last: drop an epoch's last batch when it is smaller than ``min_batch_size`` (only
            when the caps leave no other choice; see :func:`~adaptive_batch.fold_tail`).
        chunk_size: size batches *where they are consumed*: yield chunks of this many indices and
            let the consumer (:class:`~adaptive_batch.SubsetFilter`, the node) assemble batches of
            the current size from them. Sizes then take effect at once however far a loader
            prefetches, and a checkpoint taken with workers resumes exactly; sizes are multiples
            of ``chunk_size``. ``None`` (default) yields whole batches.
        buckets: round every size to these (a :class:`~adaptive_batch.SizeBuckets`, an int for
            its multiples, or a list of sizes), bounding the shapes ``torch.compile`` sees.
        num_replicas, rank: as for ``DistributedSampler``; default from the process group.

    Every epoch yields each index of the index set at most once: exactly once without an epoch
    plan and ``drop_last``; an epoch plan (InfoBatch, small-loss, RS2, ...) draws only part of it
    (under DDP each rank a disjoint, equal share). Every batch is within the caps,
    the last of an epoch too unless the caps leave no choice. Each ``iter()`` is a pass of its
    own: it resumes a loaded state, starts the next epoch after a finished one, and otherwise (a
    pass abandoned midway) starts the current epoch over. :meth:`set_epoch` chooses the epoch, as
    with ``DistributedSampler``.

    Example:
        >>> sampler = AdaptiveBatchSampler(10, batch_size=4, min_batch_size=3, seed=0)
        >>> [len(b) for b in sampler]
        [4, 6]
        >>> sorted(i for b in sampler for i in b) == list(range(10))
        True
    """

    def __init__(
        self,
        data_source: Sized | int,
        *,
        policy: Any = None,
        batch_size: int = 100,
        min_batch_size: int = 10,
        max_batch_size: int = 1000,
        indices: Sequence[int] | Tensor | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        chunk_size: int | None = None,
        buckets: SizeBuckets | int | Sequence[int] | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
        max_in_flight: int | None = None,
    ) -> None:
        size = data_source if isinstance(data_source, int) else len(data_source)
        if size < 1:
            raise AdaptiveBatchError(f"the dataset is empty (length {size})")
        warn_max_in_flight(max_in_flight)
        self.num_replicas, self.rank = resolve_replicas(num_replicas, rank)
        self.dataset_size, self.policy = size, policy
        self._data_source = None if isinstance(data_source, int) else data_source
        self.order = IndexOrder(
            size, indices, shuffle=shuffle, seed=seed, num_replicas=self.num_replicas,
            rank=self.rank, rule=plan_rule_of(policy), scores=self._scores_of,
        )  # fmt: skip
        self.sizer = BatchSizer(
            sizing_rule_of(policy), batch_size=batch_size, min_batch_size=min_batch_size,
            max_batch_size=max_batch_size, buckets=as_buckets(buckets), chunk_size=chunk_size,
            drop_last=drop_last, epoch_length=self.order.epoch_length(),
        )  # fmt: skip
        self.receiver = FeedbackReceiver(size, self.sizer, self._epoch_sizes)
        self._agreed, self._warned = False, set[str]()
        self.sync = RankSync.for_sampler(self.num_replicas, self.rank, self.expects_feedback)
        self.receiver.sync = self.sync
        self._chunks = ChunksInFlight()  # chunk mode: where each chunk's pass ends
        self._epoch = 0  # what the next fresh pass draws
        self._pending: SamplerPass | None = None  # a loaded pass the next iter() resumes
        self.active: SamplerPass | None = None  # the pass that handed out the latest batch
        self._finished: SamplerPass | None = None  # the last pass that drew a whole epoch
        self.num_dropped_tails = 0

    # -- what it is and where it stands ---------------------------------------------------------

    chunk_size = property(lambda self: self.sizer.chunk_size, doc="The chunk size, or ``None``.")
    drop_last = property(lambda self: self.sizer.drop_last)
    min_batch_size = property(lambda self: self.sizer.min_batch_size)
    max_batch_size = property(lambda self: self.sizer.max_batch_size)
    buckets = property(lambda self: self.sizer.buckets)
    sizing = property(lambda self: self.sizer.rule, doc="The policy's sizing rule (or ``None``).")
    planning = property(lambda self: self.order.rule, doc="The policy's epoch-plan rule, or None.")
    is_adaptive = property(lambda self: self.sizer.is_adaptive, doc="Whether sizes can change.")
    indices = property(lambda self: self.order.indices, doc="The index set.")
    ledger = property(lambda self: self.receiver.ledger, doc="The per-index feedback table.")
    last_feedback = property(lambda self: self.receiver.last_feedback, doc="The latest feedback.")
    times_kept = property(lambda self: self.ledger.times_kept, doc="Per index: times kept.")
    times_dropped = property(lambda self: self.ledger.times_dropped, doc="Per index: dropped.")
    num_feedback = property(lambda self: self.ledger.num_feedback, doc="Feedback calls received.")
    num_candidates = property(
        lambda self: self.ledger.num_candidates, doc="Candidates fed back (over all ranks)."
    )
    num_kept = property(lambda self: self.ledger.num_kept, doc="Candidates kept (over all ranks).")
    requested_batch_size = property(
        lambda self: self.sizer.requested,
        doc="The sizing rule's last answer before the caps (``+inf`` recorded as the largest size).",
    )
    next_epoch = property(
        lambda s: s._pending.epoch if s._pending and s._pending.remaining else s._epoch,
        doc="The next epoch with batches to draw (a loaded pass's, resumed where it stopped).",
    )
    feedback_lag = property(
        lambda self: dict(self.sizer.lags),
        doc="How many batches' feedback was missing when each size was decided, counted.",
    )

    @property
    def epoch(self) -> int:
        """The epoch of the pass that handed out the latest batch (else the next pass's)."""
        return self.active.epoch if self.active is not None else self.next_epoch

    @property
    def shard_size(self) -> int:
        """Indices this rank draws in the latest epoch planned."""
        return self.order.epoch_length()

    def _epoch_sizes(self) -> tuple[int, int]:
        """This rank's share of the latest epoch planned, and that epoch over all ranks."""
        share = self.shard_size
        return share, share * self.num_replicas

    def score_table_bytes(self) -> int:
        """Bytes of the per-index feedback table (losses and counts): what the sampler keeps per
        dataset index beyond the index order itself."""
        return self.ledger.score_table_bytes()

    @property
    def batch_size(self) -> int:
        """The size the next batch is drawn at: never more than an epoch holds (an epoch's end
        may fold it, see :func:`~adaptive_batch.fold_tail`)."""
        return min(self.sizer.size, self.shard_size)

    @property
    def estimates_gradient_noise(self) -> bool:
        return callable(getattr(self.sizer.rule, "noise_estimate", None))

    @property
    def gradient_noise(self) -> GradientNoise | None:
        """The sizing rule's gradient-noise estimates, where it keeps them (else ``None``)."""
        return self.sizer.rule.noise_estimate() if self.estimates_gradient_noise else None  # type: ignore[union-attr]

    # -- passes --------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Draw the next pass in the order of ``epoch``. Setting the epoch that a loaded,
        unfinished pass is in keeps its position; otherwise the pass starts at the beginning."""
        if epoch < 0:
            raise AdaptiveBatchError(f"epoch must be non-negative; got {epoch}")
        pending = self._pending
        if pending is not None and (pending.epoch != epoch or pending.remaining == 0):
            self._pending = None
        self._epoch = epoch

    def __iter__(self) -> SamplerPass:
        pending = self._pending
        if pending is None:
            return SamplerPass(self, self._epoch)
        # A loaded pass is resumed by the first iterator that hands out a batch: a DataLoader
        # with workers calls iter() twice before it asks for one.
        return SamplerPass(self, pending.epoch, pending.position, pending.replay, resumes=pending)

    def __len__(self) -> int:
        """Batches (chunks, with a ``chunk_size``) per epoch; a ``TypeError`` when feedback decides
        it (torch's convention for an unknown length). The epoch is the next pass's, or the
        current one's while its batches await feedback (the next plan waits for their scores)."""
        run = self.active
        awaiting = run is not None and self.expects_feedback and self._unsettled(run) > 0
        epoch = run.epoch if awaiting else self.next_epoch  # type: ignore[union-attr]
        length = self.order.epoch_length(epoch)  # the epoch's plan, decided now
        if self.chunk_size is not None:
            return -(-length // self.chunk_size)
        if self.is_adaptive:
            raise AdaptiveBatchTypeError(
                "the number of batches of an AdaptiveBatchSampler with a sizing policy depends on "
                "the feedback it will receive, so it has no len()"
            )
        return self.sizer.count_batches(length)

    def _unsettled(self, run: SamplerPass) -> int:
        """Batches ``run`` handed out that await feedback (feedback comes in order). With a
        ``chunk_size`` the feedback is of batches assembled from the chunks, so none is counted
        against the chunks: whether the last chunk handed out awaits feedback tells (1 or 0)."""
        if self.chunk_size is not None:
            return int(run.last_chunk is not None and self.ledger.awaiting(run.last_chunk))
        return max(run.batches - (self.num_feedback - run.reports_at_start), 0)

    def pass_started(self, run: SamplerPass) -> None:
        """Called by a pass before it hands out its first batch."""
        if run.resumes is not None and run.resumes is self._pending:
            self._pending = None
        if self._data_source is not None and len(self._data_source) != self.dataset_size:
            raise AdaptiveBatchError(
                f"the dataset's length changed from {self.dataset_size} to "
                f"{len(self._data_source)} since the sampler was built; build a new sampler for it"
            )
        last = self._finished
        adapts = self.is_adaptive or self._plans_from_scores
        if last is not None and adapts and self.num_feedback == last.reports_at_start:
            self._warn_once(
                "silent",
                f"the sampler received no feedback during epoch {last.epoch}, so its policy never "
                "adapts: wrap the loader in SubsetFilter(loader, model, sampler=sampler) or "
                "StepFeedback(loader, model, sampler=sampler), or call sampler.feedback(...) "
                "after every batch",
            )
        run.reports_at_start = self.num_feedback
        check_epoch = getattr(self.planning, "check_epoch", None)
        # A plan that anneals, once scored; a resumed pass was checked when it first started.
        if check_epoch is not None and self.num_feedback and run.resumes is None:
            check_epoch(run.epoch)
        if self.sync is not None and (self.expects_feedback or not self._agreed):
            config = None if self._agreed else sampler_config(self)
            plan = self.order.digest(run.epoch) if self.planning is not None else ""
            reporting = self.receiver.num_reporters > 0
            self.sync.start(config, run.epoch, run.position, reporting, plan)
            self._agreed = True

    def pass_snapshot(self, run: SamplerPass) -> None:
        """Called when a loader saves the pass's state itself (a ``StatefulDataLoader``): whole
        batches whose sizes were decided before the feedback of batches the loader fetched
        ahead cannot resume exactly, and nothing else would say so."""
        if self.chunk_size is not None or not self.is_adaptive:
            return
        if self._unsettled(run) > self.receiver.batches_held():
            self._warn_once(
                "snapshot",
                "a loader saved this sampler's position while it held batches fetched ahead "
                "(StatefulDataLoader workers, a Prefetcher): their sizes were decided before the "
                "feedback in between, so a resume will not repeat them exactly. Build the sampler "
                "with chunk_size= (sizes decided where batches are consumed) for an exact resume.",
            )

    def pass_loaded(self, run: SamplerPass) -> None:
        """Called by a pass whose state a ``StatefulDataLoader`` loaded: it is the active one."""
        self.active = run

    def tail_dropped(self) -> None:
        """Called by a pass that drops its epoch's short last batch (``drop_last``)."""
        self.num_dropped_tails += 1

    def pass_finished(self, run: SamplerPass) -> None:
        """Called by a pass once it has handed out its last batch."""
        self._epoch = max(self._epoch, run.epoch + 1)
        self._finished = run if run.batches else None
        if self.sync is not None and self.expects_feedback:
            self.sync.end(run.epoch, run.batches, self.num_feedback - run.reports_at_start)

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

    def add_listener(self, listener: Callable[[AdaptiveBatchSampler, Feedback], None]) -> None:
        """Call ``listener(sampler, feedback)`` after each feedback is recorded and the next size
        decided (a :class:`~adaptive_batch.TrajectoryLogger`); not part of the state."""
        self.receiver.add_listener(listener)

    def remove_listener(self, listener: Callable[[AdaptiveBatchSampler, Feedback], None]) -> None:
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

    def handed_out(self, run: SamplerPass, indices: np.ndarray, pass_total: int | None) -> None:
        """Called by a pass for each batch (or chunk) it hands out."""
        self.active = run
        self.ledger.handed_out(indices)
        if pass_total is not None:
            self._chunks.handed_out(indices, pass_total)
            run.last_chunk = indices

    # -- chunk mode: batches assembled where they are consumed -------------------------------

    def plan_batch(self, remaining: int) -> int:
        """How many indices the next assembled batch takes with ``remaining`` left in the pass."""
        if self.chunk_size is None:
            raise AdaptiveBatchTypeError("plan_batch() is for samplers with a chunk_size")
        return self.sizer.decide(remaining, self.num_feedback, self.chunk_size)

    def pass_total(self, indices: Tensor) -> int:
        """How many indices the pass that handed out this chunk hands out in all."""
        chunk = as_index_array(indices)
        return self._chunks.consumed(chunk, self.ledger.awaiting(chunk))

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
        return self.ledger.scores(indices)

    @property
    def scores(self) -> Any:
        """The per-index scores epoch plans decide from (a :class:`~adaptive_batch.contract.ScoreTable`
        over the index set)."""
        return self.ledger.scores(self.order.indices)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, AdaptiveBatchWarning, stacklevel=3)
