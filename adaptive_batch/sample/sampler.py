"""AdaptiveBatchSampler: a DataLoader ``batch_sampler`` whose batch size follows feedback."""

from __future__ import annotations

import warnings
from collections.abc import Sequence, Sized
from typing import Any

import numpy as np
from torch import Tensor
from torch.utils.data import Sampler

from ..contract import plan_rule_of, sizing_rule_of
from ..errors import AdaptiveBatchError, AdaptiveBatchTypeError, AdaptiveBatchWarning
from .buckets import SizeBuckets, as_buckets
from .checkpoint import SamplerCheckpoint, sampler_config
from .chunks import ChunksInFlight
from .deprecated import SamplerDeprecations, warn_max_in_flight
from .distributed import RankSync, resolve_replicas
from .feedback_side import SamplerFeedbackSide
from .ledger import as_index_array
from .order import IndexOrder
from .passes import SamplerPass
from .receiver import FeedbackReceiver
from .sizer import BatchSizer

__all__ = ["AdaptiveBatchSampler"]


class AdaptiveBatchSampler(
    SamplerCheckpoint, SamplerFeedbackSide, SamplerDeprecations, Sampler[list[int]]
):
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
        self._loaded = False  # whether no pass has started since load_state_dict
        self.sync = RankSync.for_sampler(
            self.num_replicas, self.rank, self.expects_feedback,
            capacity=self.sizer.max_batch_size + self.sizer.min_batch_size,  # a folded tail's most
        )  # fmt: skip
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
    requested_batch_size = property(
        lambda self: self.sizer.requested,
        doc="The sizing rule's last answer before the caps (``+inf`` recorded as the largest size).",
    )
    next_epoch = property(
        lambda s: s._pending.epoch if s._pending and s._pending.remaining else s._epoch,
        doc="The next epoch with batches to draw (a loaded pass's, resumed where it stopped).",
    )
    resume_position = property(
        lambda s: s._pending.position if s._pending and s._pending.remaining else 0,
        doc="Indices of the next epoch handed out before the checkpoint its pass resumes from.",
    )
    feedback_lag = property(
        lambda self: dict(self.sizer.lags),
        doc="How many batches' feedback was missing when each size was decided, counted (an "
        "epoch plan's feedback comes in groups of up to 32 batches: nothing sizes from it).",
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

    @property
    def batch_size(self) -> int:
        """The size the next batch is drawn at: never more than an epoch holds (an epoch's end
        may fold it, see :func:`~adaptive_batch.fold_tail`)."""
        return min(self.sizer.size, self.shard_size)

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
            return int(run.last_chunk is not None and self._table.awaiting(run.last_chunk))
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
        self.receiver.apply_arrived()  # the sizes and plan of the pass follow all feedback sent
        check_epoch = getattr(self.planning, "check_epoch", None)
        # A plan that anneals, once scored; the first pass after a load was checked when the
        # saved run passed there (and a trainer may not have told the plan its length yet).
        first_after_load, self._loaded = self._loaded, False
        if check_epoch is not None and self.num_feedback and not first_after_load:
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
        if (
            self.sync is not None and self.expects_feedback
        ):  # (the end waits for feedback in flight)
            self.sync.end(run.epoch, run.batches, self.num_feedback - run.reports_at_start)

    def handed_out(self, run: SamplerPass, indices: np.ndarray, pass_total: int | None) -> None:
        """Called by a pass for each batch (or chunk) it hands out."""
        self.active = run
        self._table.handed_out(indices)
        if pass_total is not None:
            self._chunks.handed_out(indices, pass_total)
            run.last_chunk = indices

    # -- chunk mode: batches assembled where they are consumed -------------------------------

    def plan_batch(self, remaining: int) -> int:
        """How many indices the next assembled batch takes with ``remaining`` left in the pass."""
        if self.chunk_size is None:
            raise AdaptiveBatchTypeError("plan_batch() is for samplers with a chunk_size")
        return self.sizer.decide(remaining, self._table.num_feedback, self.chunk_size)

    def pass_total(self, indices: Tensor) -> int:
        """How many indices the pass that handed out this chunk hands out in all."""
        chunk = as_index_array(indices)
        return self._chunks.consumed(chunk, self._table.awaiting(chunk))

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, AdaptiveBatchWarning, stacklevel=3)
