"""SubsetFilter: keeps the best subset of each batch and reports to the sampler."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..contract import (
    Feedback,
    FeedbackSink,
    KeepAll,
    ProbeResult,
    Reason,
    Selection,
    SelectionRule,
    check_feedback_sink,
    check_fetched_ahead,
    check_policy_for_stage,
    load_trainer_state,
    probe_scope_of,
    require_keys,
    selection_rule_of,
    sizing_rule_of,
    trainer_state,
)
from ..errors import AdaptiveBatchError, AdaptiveBatchTypeError, AdaptiveBatchWarning
from ..load import ChunkAssembler, check_not_resharded, get_field, split_indexed, take
from ..probe import HeadProbe
from ..sample import SizeBuckets, as_buckets
from ..train import PlanWeights, YieldedRows
from .ahead import FetchedAhead

__all__ = ["SubsetFilter"]

Probe = Callable[[Any, Tensor], ProbeResult]


class SubsetFilter(PlanWeights):
    """Wraps an iterable of batches (a DataLoader, say) and yields the kept subset of each.

    For every batch: probe it, let the policy's selection rule choose, yield the kept samples in
    the structure the batch came in, and -- when a sampler is given -- send it a
    :class:`~adaptive_batch.Feedback` naming the dataset indices kept and dropped. No batch is ever
    dropped whole: a degenerate one is kept entire, and :attr:`reasons` counts why. An epoch plan
    that weighs samples (InfoBatch) reaches the loss through :meth:`weighted`, as with
    :class:`~adaptive_batch.StepFeedback`.

    Args:
        batches: the source of batches, iterated anew by each ``iter()`` (a loader, or anything
            wrapping one: a generator, ``tqdm``). ``None`` when you call :meth:`filter_batch`
            yourself.
        probe: a :class:`~adaptive_batch.HeadProbe`, or the model (probed with default settings:
            its head, or every parameter when a rule of the policy has ``probe_scope ==
            "model"``), or any ``probe(inputs, targets) -> ProbeResult``.
        policy: a :class:`~adaptive_batch.policies.Policy` or a selection rule; only its selection
            half is used here. Default: the sampler's policy; a policy without a selection rule
            keeps every sample (the filter then only measures).
        sampler: the :class:`~adaptive_batch.AdaptiveBatchSampler` (any
            :class:`~adaptive_batch.contract.FeedbackSink`) to report to. Batches must then come
            from an :class:`~adaptive_batch.IndexedDataset` so each carries its indices. With a
            chunked sampler the filter assembles each candidate batch from its chunks.
        inputs, targets: where the model's inputs and the targets are in each batch (a position
            or a key). Default ``0`` and ``1``, as in ``for x, y in loader``.
        buckets: keep only batch sizes among these (a :class:`~adaptive_batch.SizeBuckets`, an int
            for its multiples, or a list), so a ``torch.compile``'d step sees few shapes. A kept
            subset of another size is trimmed to the largest allowed size by dropping its last
            kept positions (batches arrive in random order), or, below the smallest allowed size,
            topped up from the dropped samples in order; ``stats["bucket_change"]`` records it.
        fetched_ahead: the trainer fetches batches ahead of their training steps and announces
            each step (:meth:`begin_batch`, :meth:`end_batch`; Lightning's ``Trainer`` with
            :class:`~adaptive_batch.integrations.lightning.AdaptiveBatchCallback`). A batch is
            probed and selected when fetched, and its feedback reaches the sampler when its step
            begins. The trainer then checkpoints only this stage, so :meth:`state_dict` holds the
            sampler's state too, and the selections of batches fetched but not yet trained, which
            a resumed run replays (see :mod:`~adaptive_batch.select.ahead`).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from adaptive_batch import AdaptiveBatchSampler, IndexedDataset
        >>> from adaptive_batch.policies import EDBA
        >>> ds = TensorDataset(torch.randn(64, 4), torch.randint(0, 3, (64,)))
        >>> model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> sampler = AdaptiveBatchSampler(ds, policy=EDBA(), batch_size=16, min_batch_size=4)
        >>> loader = DataLoader(IndexedDataset(ds), batch_sampler=sampler)
        >>> sizes = [len(y) for x, y in SubsetFilter(loader, model, sampler=sampler)]
        >>> all(1 <= s <= 32 for s in sizes)
        True
    """

    RULE_KEY, RULE_TYPE_KEY, REASONS_KEY = "rule", "rule_type", "reasons"
    CANDIDATES_KEY, TRAINED_KEY, SAMPLER_KEY = "num_candidates", "num_trained", "sampler"
    AHEAD_KEY = "fetched_ahead"

    def __init__(
        self,
        batches: Iterable[Any] | None,
        probe: HeadProbe | nn.Module | Probe,
        *,
        policy: Any = None,
        sampler: FeedbackSink | None = None,
        inputs: int | str = 0,
        targets: int | str = 1,
        buckets: SizeBuckets | int | Sequence[int] | None = None,
        fetched_ahead: bool = False,
    ) -> None:
        if sampler is not None:
            check_feedback_sink(sampler)
        if policy is None and sampler is not None:
            policy = sampler.policy
        check_policy_for_stage(policy, "look_ahead")
        if isinstance(probe, nn.Module):
            # A rule that needs every parameter's gradients (exact CABS, say) probes the whole model.
            probe = HeadProbe(probe, head=probe if probe_scope_of(policy) == "model" else None)
        elif not callable(probe):
            raise AdaptiveBatchTypeError(
                f"probe must be a HeadProbe, a model or a callable; got {type(probe).__name__}"
            )
        if sampler is None:
            _warn_if_feedback_is_lost(batches, policy)
        else:
            check_not_resharded(batches, sampler)
            sampler.register_reporter(self)
        self.batches = batches
        self.probe = probe
        self.rule: SelectionRule = selection_rule_of(policy) or KeepAll()
        self.sampler = sampler
        self.inputs = inputs
        self.targets = targets
        self.buckets = as_buckets(buckets)
        self.reasons: Counter[str] = Counter()
        self.num_candidates = 0
        self.num_trained = 0
        self.last_feedback: Feedback | None = None
        self._epoch_reasons: Counter[str] = Counter()
        self._warned_nonfinite = False
        self.fetched_ahead = fetched_ahead
        self._yielded: YieldedRows | None = None  # the kept rows of the batch being trained
        self._assembler: ChunkAssembler | None = None
        self._warned: set[str] = set()
        self._ahead = FetchedAhead()
        if fetched_ahead:
            check_fetched_ahead(sampler)

    @property
    def num_batches(self) -> int:
        return sum(self.reasons.values())

    @property
    def num_kept(self) -> int:
        """The old name of :attr:`num_trained`."""
        return self.num_trained

    @property
    def assembles_chunks(self) -> bool:
        """Whether batches are assembled here from a chunked sampler's chunks."""
        return self.sampler is not None and self.sampler.chunk_size is not None

    def __iter__(self) -> Iterator[Any]:
        if self.batches is None:
            raise AdaptiveBatchTypeError(
                "this SubsetFilter has no source of batches; call filter_batch(batch)"
            )
        source = iter(self.batches)
        self.start_pass()
        while (batch := self.next_from(source)) is not None:
            yield batch

    def start_pass(self) -> None:
        """Begin a pass over the source (what ``iter()`` does; a node calls it on ``reset()``):
        forget batches fetched for an earlier pass and never trained, assemble chunks anew."""
        self.start_epoch()
        self._ahead.held.clear()
        self._assembler = ChunkAssembler(self.sampler) if self.assembles_chunks else None  # type: ignore[arg-type]

    def next_from(self, source: Iterator[Any]) -> Any:
        """The kept subset of the next batch of ``source`` (``None`` at its end, which ends the
        epoch): what ``iter()`` does, for a pipeline that drives the stage itself."""
        if self._assembler is not None:
            batch = self._assembler.next_batch(source)
        else:
            batch = next(source, None)
        if batch is None:
            self.end_epoch()
            return None
        return self.filter_batch(batch)

    def __len__(self) -> int:
        """The source's length: filtering never removes a whole batch. Unknown (``TypeError``)
        when batches are assembled from chunks."""
        if self.assembles_chunks:
            raise AdaptiveBatchTypeError(
                "batches assembled from chunks have no length known in advance"
            )
        return len(self.batches)  # type: ignore[arg-type]

    def start_epoch(self) -> None:
        self._epoch_reasons.clear()

    def end_epoch(self) -> None:
        """Say so, once and loudly, when every batch of the epoch had non-finite losses."""
        count = sum(self._epoch_reasons.values())
        if count and self._epoch_reasons[Reason.NONFINITE] == count and not self._warned_nonfinite:
            self._warned_nonfinite = True
            warnings.warn(
                f"every one of the {count} batches of the last epoch had NaN or infinite losses "
                "or gradient statistics: selection kept them whole and no policy could learn "
                "from them. Check the inputs, the learning rate, or a loss scaler.",
                AdaptiveBatchWarning,
                stacklevel=2,
            )

    def filter_batch(self, batch: Any) -> Any:
        """Probe, select and report one batch; return its kept samples."""
        indices, batch = split_indexed(batch, required=self.sampler is not None)
        replay = self._ahead.replay(indices) if indices is not None else None
        if replay is not None:  # selected before a checkpoint: kept as it was
            feedback, kept = replay
            size = feedback.batch_size
        else:
            feedback, kept = self._select(batch, indices)
            size = feedback.batch_size
        if self.fetched_ahead:
            self._ahead.hold(feedback)
        else:
            self._report(feedback)
        if kept.numel() == size:
            return batch
        return take(batch, kept, size)

    def begin_batch(self) -> None:
        """The trainer starts the step of the oldest batch fetched (``fetched_ahead``): its
        feedback goes to the sampler."""
        feedback = self._ahead.release()
        if feedback is not None:
            self._report(feedback)

    def end_batch(self) -> None:
        """The trainer finished the step begun last (nothing left to report: a look-ahead
        filter reported when the step began)."""

    def _yielded_rows(self) -> YieldedRows | None:
        return self._yielded

    def _report(self, feedback: Feedback) -> None:
        """Send the feedback of the batch whose step runs now (its kept rows are what the step
        trains on, for :meth:`weighted`)."""
        if self.sampler is not None:
            self.sampler.feedback(feedback)
            if self._yielded is not None:  # the step before has run: did its loss weigh it?
                self._check_plan_weights_used(self._yielded)
        self._yielded = YieldedRows(feedback.kept, feedback.num_kept)
        self.last_feedback = feedback
        self.reasons[feedback.reason] += 1
        self._epoch_reasons[feedback.reason] += 1
        self.num_candidates += feedback.batch_size
        self.num_trained += feedback.num_kept

    def _select(self, batch: Any, indices: Tensor | None) -> tuple[Feedback, Tensor]:
        """Probe and select: the feedback and the positions of the kept samples."""
        result = self.probe(get_field(batch, self.inputs), get_field(batch, self.targets))
        selection = self.rule.select(result)
        if selection.batch_size != result.batch_size:
            raise AdaptiveBatchError(
                f"{type(self.rule).__name__} selected from {selection.batch_size} samples; "
                f"the batch has {result.batch_size}"
            )
        if self.buckets is not None:
            selection = self._fit_buckets(selection)
        if indices is not None and indices.numel() != result.batch_size:
            raise AdaptiveBatchError(
                f"the batch has {result.batch_size} samples but {indices.numel()} indices"
            )
        return _feedback(result, selection, indices), selection.kept

    def _fit_buckets(self, selection: Selection) -> Selection:
        assert self.buckets is not None
        count, size = selection.kept.numel(), selection.batch_size
        if self.buckets.contains(count) or count == size:
            return selection
        target = min(self.buckets.floor(count), size)  # above the batch: keep it whole
        if target <= count:
            kept = selection.kept[:target]
        else:
            kept = torch.cat([selection.kept, selection.dropped[: target - count]]).sort().values
        stats = {**selection.stats, "bucket_change": float(target - count)}
        return Selection(kept, size, selection.reason, stats)

    # -- checkpointing ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The selection rule's state and the counters (not the source's position); with a
        chunked sampler also the sampler's feedback side, as of the last batch consumed."""
        state = {
            self.RULE_KEY: self.rule.state_dict(),
            self.RULE_TYPE_KEY: type(self.rule).__qualname__,
            self.REASONS_KEY: dict(self.reasons),
            self.CANDIDATES_KEY: self.num_candidates,
            self.TRAINED_KEY: self.num_trained,
        }
        if self.assembles_chunks:
            state[self.SAMPLER_KEY] = self.sampler.feedback_state_dict()  # type: ignore[union-attr]
        if self.fetched_ahead:  # the trainer saves this stage alone: the sampler's state too
            state[self.AHEAD_KEY] = self._ahead.state_dict()
            return trainer_state(self.sampler, state)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.fetched_ahead:
            state = load_trainer_state(self.sampler, state)
        require_keys(self, state, (self.RULE_KEY, self.REASONS_KEY, self.CANDIDATES_KEY))
        self._ahead.load_state_dict(state.get(self.AHEAD_KEY, []))
        saved_rule = state.get(self.RULE_TYPE_KEY, type(self.rule).__qualname__)
        if saved_rule != type(self.rule).__qualname__:
            raise AdaptiveBatchError(
                f"this filter state was saved with a {saved_rule} selection rule; this filter's "
                f"rule is {type(self.rule).__qualname__}: build the filter with the same policy"
            )
        if self.assembles_chunks:
            if self.SAMPLER_KEY not in state:
                raise AdaptiveBatchError(
                    "the state_dict has no sampler state; it comes from a filter without a chunked sampler"
                )
            self.sampler.load_feedback_state_dict(state[self.SAMPLER_KEY])  # type: ignore[union-attr]
        self.rule.load_state_dict(state[self.RULE_KEY])
        self.reasons = Counter(state[self.REASONS_KEY])
        self.num_candidates = state[self.CANDIDATES_KEY]
        self.num_trained = state.get(self.TRAINED_KEY, state.get("num_kept", 0))


def _feedback(result: ProbeResult, selection: Selection, indices: Tensor | None) -> Feedback:
    """The feedback for one batch: its statistics and per-sample losses in one device-to-host
    transfer."""
    mask = torch.zeros(1, result.batch_size, dtype=torch.bool)
    mask[0, selection.kept] = True
    order = torch.cat([selection.kept, selection.dropped]).to(result.device, non_blocking=True)
    measured = torch.cat(
        [
            torch.stack(
                [
                    result.losses.mean(),
                    result.mean_grad_sq_norm(),
                    result.grad_variance(),
                    result.subset_mean_grad_sq_norms(mask.to(result.device, non_blocking=True))[0],
                ]
            ),
            result.losses[order],
        ]
    ).to("cpu", torch.float32)
    names = ("loss", "grad_sq_norm", "grad_variance", "kept_grad_sq_norm")
    stats = {**dict(zip(names, measured[:4].tolist(), strict=True)), **selection.stats}
    if indices is None:
        kept, dropped = selection.kept, selection.dropped
    else:
        kept, dropped = indices[selection.kept], indices[selection.dropped]
    return Feedback(kept, dropped, selection.reason, stats, losses=measured[4:])


def _warn_if_feedback_is_lost(batches: Any, policy: Any) -> None:
    """Without ``sampler=`` no feedback leaves the filter: say so where that cannot be meant."""
    rule = sizing_rule_of(policy)
    loader_sampler = getattr(batches, "batch_sampler", None)
    if rule is not None:
        message = (
            f"the policy's sizing rule ({type(rule).__name__}) will never run: no sampler receives "
            "this filter's feedback. Pass sampler=<the AdaptiveBatchSampler>, or give the filter "
            "only the selection half (policy=<policy>.selection)"
        )
    elif isinstance(loader_sampler, FeedbackSink) and getattr(
        loader_sampler, "expects_feedback", False
    ):
        message = (
            "the loader's AdaptiveBatchSampler adapts from feedback, but this filter reports to no "
            "sampler: pass sampler=loader.batch_sampler"
        )
    else:
        return
    warnings.warn(message, AdaptiveBatchWarning, stacklevel=3)
