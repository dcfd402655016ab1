"""SubsetFilter: keeps the best subset of each batch and feeds back to the sampler."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .batch_structure import concat, get_field, take
from .buckets import SizeBuckets
from .feedback import Feedback, Selection
from .indexed import IndexedSample
from .policies.base import KeepAll, SelectionRule, probe_scope_of, selection_rule_of
from .probe import HeadProbe
from .probe_result import ProbeResult
from .sampler import AdaptiveBatchSampler

__all__ = ["SubsetFilter"]

Probe = Callable[[Any, Tensor], ProbeResult]


class SubsetFilter:
    """Wraps an iterable of batches (a DataLoader, say) and yields the kept subset of each.

    For every batch: probe it, let the policy's selection rule choose, yield the kept samples in
    the structure the batch came in, and -- when a sampler is given -- send it a
    :class:`~adaptive_batch.Feedback` naming the dataset indices kept and dropped. No batch is ever
    dropped whole: a degenerate one is kept entire, and :attr:`reasons` counts why.

    Args:
        batches: the source of batches, iterated anew by each ``iter()``. ``None`` when you call
            :meth:`filter_batch` yourself (as :class:`~adaptive_batch.nodes.SubsetFilterNode`
            does).
        probe: a :class:`~adaptive_batch.HeadProbe`, or the model (probed with default settings:
            its head, or every parameter when a rule of the policy has ``probe_scope == "model"``),
            or any ``probe(inputs, targets) -> ProbeResult``.
        policy: a :class:`~adaptive_batch.policies.Policy` or a selection rule; only its selection
            half is used here. Default: the sampler's policy; a policy without a selection rule
            keeps every sample (the filter then only measures).
        sampler: the :class:`~adaptive_batch.AdaptiveBatchSampler` to report to. Batches must then
            come from an :class:`~adaptive_batch.IndexedDataset` so each carries its indices.
        inputs, targets: where the model's inputs and the targets are in each batch (a position
            or a key). Default ``0`` and ``1``, as in ``for x, y in loader``.
        buckets: keep only batch sizes among these (a :class:`~adaptive_batch.SizeBuckets`, an int
            for its multiples, or a list), so a ``torch.compile``'d step sees few shapes. A kept
            subset of another size is trimmed to the largest allowed size by dropping its last
            kept positions (batches arrive in random order), or, below the smallest allowed size,
            topped up from the dropped samples in order; ``stats["bucket_change"]`` records it.

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

    def __init__(
        self,
        batches: Iterable[Any] | None,
        probe: HeadProbe | nn.Module | Probe,
        *,
        policy: Any = None,
        sampler: AdaptiveBatchSampler | None = None,
        inputs: int | str = 0,
        targets: int | str = 1,
        buckets: SizeBuckets | int | Sequence[int] | None = None,
    ) -> None:
        if sampler is not None and not isinstance(sampler, AdaptiveBatchSampler):
            raise TypeError(
                f"sampler must be an AdaptiveBatchSampler; got {type(sampler).__name__}"
            )
        if policy is None and sampler is not None:
            policy = sampler.policy
        if getattr(policy, "per_layer", None) is not None:
            raise TypeError(
                "this policy selects a subset per layer, which filtering a batch cannot express: "
                "use adaptive_batch.PerLayerBackward in place of loss.backward() instead"
            )
        if isinstance(probe, nn.Module):
            # A rule that needs every parameter's gradients (exact CABS, say) probes the whole model.
            head = probe if probe_scope_of(policy) == "model" else None
            probe = HeadProbe(probe, head=head)
        elif not callable(probe):
            raise TypeError(
                f"probe must be a HeadProbe, a model or a callable; got {type(probe).__name__}"
            )
        self.batches = batches
        self.probe = probe
        self.rule: SelectionRule = selection_rule_of(policy) or KeepAll()
        self.sampler = sampler
        self.inputs = inputs
        self.targets = targets
        if isinstance(buckets, int):
            buckets = SizeBuckets(multiple=buckets)
        elif buckets is not None and not isinstance(buckets, SizeBuckets):
            buckets = SizeBuckets(sizes=buckets)
        self.buckets: SizeBuckets | None = buckets
        self.reasons: Counter[str] = Counter()
        self.num_candidates = 0
        self.num_kept = 0
        self.last_feedback: Feedback | None = None

    @property
    def num_batches(self) -> int:
        return sum(self.reasons.values())

    @property
    def assembles_chunks(self) -> bool:
        """Whether batches are assembled here from a chunked sampler's chunks."""
        return self.sampler is not None and self.sampler.chunk_size is not None

    def __iter__(self) -> Iterator[Any]:
        if self.batches is None:
            raise TypeError("this SubsetFilter has no source of batches; call filter_batch(batch)")
        if not self.assembles_chunks:
            for batch in self.batches:
                yield self.filter_batch(batch)
            return
        chunks = iter(self.batches)
        while (batch := self.assemble(chunks)) is not None:
            yield self.filter_batch(batch)

    def assemble(self, chunks: Iterator[Any]) -> Any:
        """Chunk mode: join as many chunks as the sampler plans for the next batch (``None`` when
        the pass is over). A source that ends early yields what it gave: nothing is dropped."""
        assert self.sampler is not None
        wanted = self.sampler.plan_batch()
        parts: list[IndexedSample] = []
        indices: list[Tensor] = []
        count = 0
        while count < wanted:
            try:
                chunk = next(chunks)
            except StopIteration:
                break
            if not isinstance(chunk, IndexedSample):
                raise ValueError(
                    "chunks must carry their dataset indices: wrap the dataset as IndexedDataset(dataset)"
                )
            parts.append(chunk)
            indices.append(torch.as_tensor(chunk.index).flatten())
            count += indices[-1].numel()
        if not parts:
            return None
        lengths = [i.numel() for i in indices]
        return IndexedSample(torch.cat(indices), concat([p.sample for p in parts], lengths))

    def __len__(self) -> int:
        """The source's length: filtering never removes a whole batch. Unknown (``TypeError``)
        when batches are assembled from chunks."""
        if self.assembles_chunks:
            raise TypeError("batches assembled from chunks have no length known in advance")
        return len(self.batches)  # type: ignore[arg-type]

    def filter_batch(self, batch: Any) -> Any:
        """Probe, select and report one batch; return its kept samples."""
        indices: Tensor | None = None
        if isinstance(batch, IndexedSample):
            indices, batch = torch.as_tensor(batch.index).flatten().cpu(), batch.sample
        elif self.sampler is not None:
            raise ValueError(
                "the SubsetFilter reports to a sampler, so each batch must carry its dataset "
                "indices: wrap the dataset as IndexedDataset(dataset)"
            )
        result = self.probe(get_field(batch, self.inputs), get_field(batch, self.targets))
        selection = self.rule.select(result)
        if selection.batch_size != result.batch_size:
            raise ValueError(
                f"{type(self.rule).__name__} selected from {selection.batch_size} samples; "
                f"the batch has {result.batch_size}"
            )
        if self.buckets is not None:
            selection = self._fit_buckets(selection)
        if indices is not None and indices.numel() != result.batch_size:
            raise ValueError(
                f"the batch has {result.batch_size} samples but {indices.numel()} indices"
            )
        feedback = self._feedback(result, selection, indices)
        if self.sampler is not None:
            self.sampler.feedback(feedback)
        self.last_feedback = feedback
        self.reasons[selection.reason] += 1
        self.num_candidates += selection.batch_size
        self.num_kept += selection.kept.numel()
        if selection.kept.numel() == selection.batch_size:
            return batch
        return take(batch, selection.kept, selection.batch_size)

    def _fit_buckets(self, selection: Selection) -> Selection:
        assert self.buckets is not None
        count, size = selection.kept.numel(), selection.batch_size
        if self.buckets.contains(count) or count == size:
            return selection
        target = self.buckets.floor(count)
        if target > size:  # even the smallest allowed size exceeds the batch: keep it whole
            target = size
        if target <= count:
            kept = selection.kept[:target]
        else:
            kept = torch.cat([selection.kept, selection.dropped[: target - count]]).sort().values
        stats = {**selection.stats, "bucket_change": float(target - count)}
        return Selection(kept, size, selection.reason, stats)

    @staticmethod
    def _feedback(result: ProbeResult, selection: Selection, indices: Tensor | None) -> Feedback:
        mask = torch.zeros(1, result.batch_size, dtype=torch.bool)
        mask[0, selection.kept] = True
        measured = torch.stack(
            [
                result.losses.mean(),
                result.mean_grad_sq_norm(),
                result.grad_variance(),
                result.subset_mean_grad_sq_norms(mask.to(result.device, non_blocking=True))[0],
            ]
        ).tolist()
        stats = dict(
            zip(
                ("loss", "grad_sq_norm", "grad_variance", "kept_grad_sq_norm"),
                measured,
                strict=True,
            )
        )
        stats.update(selection.stats)
        if indices is None:
            kept, dropped = selection.kept, selection.dropped
        else:
            kept, dropped = indices[selection.kept], indices[selection.dropped]
        return Feedback(kept=kept, dropped=dropped, reason=selection.reason, stats=stats)

    # -- checkpointing ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The selection rule's state and the counters (not the source's position); with a
        chunked sampler also the sampler's sizing side, as of the last batch consumed."""
        state = {
            "rule": self.rule.state_dict(),
            "reasons": dict(self.reasons),
            "num_candidates": self.num_candidates,
            "num_kept": self.num_kept,
        }
        if self.assembles_chunks:
            assert self.sampler is not None
            state["sampler"] = self.sampler.consumer_state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.assembles_chunks:
            assert self.sampler is not None
            if "sampler" not in state:
                raise ValueError(
                    "the state_dict has no sampler state; it comes from a filter without a chunked sampler"
                )
            self.sampler.load_consumer_state_dict(state["sampler"])
        self.rule.load_state_dict(state["rule"])
        self.reasons = Counter(state["reasons"])
        self.num_candidates = state["num_candidates"]
        self.num_kept = state["num_kept"]
