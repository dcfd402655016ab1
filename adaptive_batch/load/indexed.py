"""Datasets whose samples carry their own dataset index.

Feedback must name the dataset indices of the samples in a batch. Guessing them from the order in
which a sampler handed them out breaks as soon as workers, prefetching, ``in_order=False`` or a
restored loader reorder or drop batches; carrying the index inside each sample cannot break.
``default_collate`` turns a list of :class:`IndexedSample` into one :class:`IndexedSample` whose
``index`` is a tensor, and :class:`~adaptive_batch.SubsetFilter` strips it off again, so the
training loop sees the batch exactly as the plain dataset would give it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, Dataset, default_collate

from ..errors import AdaptiveBatchError, AdaptiveBatchTypeError

__all__ = ["IndexedDataset", "IndexedSample", "fetch_batch", "split_indexed"]


class IndexedSample(NamedTuple):
    """One sample (or, once collated, one batch) and its dataset index (or indices)."""

    index: Any
    sample: Any


class IndexedDataset(Dataset):
    """Wraps a map-style dataset so that ``ds[i]`` returns ``IndexedSample(i, dataset[i])``.

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> ds = IndexedDataset(TensorDataset(torch.arange(6.0)))
        >>> batch = next(iter(DataLoader(ds, batch_size=3)))
        >>> batch.index.tolist(), batch.sample[0].tolist()
        ([0, 1, 2], [0.0, 1.0, 2.0])
    """

    def __init__(self, dataset: Any) -> None:
        if isinstance(dataset, IndexedDataset):
            raise AdaptiveBatchTypeError("the dataset is already an IndexedDataset")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> IndexedSample:
        _check_one_index(index)
        return IndexedSample(index, self.dataset[index])

    def __getitems__(self, indices: list[int]) -> list[IndexedSample]:
        """A batch's samples at once (what ``DataLoader`` asks a batch sampler's batch for): the
        wrapped dataset's own ``__getitems__`` if it has one, and ``__getitem__``'s check once
        per batch, not per sample."""
        if indices:  # (one check per batch: a batch of batches is all lists)
            _check_one_index(indices[0])
        getitems = getattr(self.dataset, "__getitems__", None)
        samples = (
            getitems(indices) if getitems is not None else map(self.dataset.__getitem__, indices)
        )
        return list(map(IndexedSample, indices, samples))


def _check_one_index(index: Any) -> None:
    if isinstance(index, list | tuple) or (isinstance(index, Tensor) and index.dim() > 0):
        raise AdaptiveBatchTypeError(
            f"IndexedDataset got a batch of indices ({list(index)[:4]}...) where one index "
            "belongs: an AdaptiveBatchSampler yields whole batches, so pass it as "
            "DataLoader(..., batch_sampler=sampler), not sampler=sampler"
        )


def split_indexed(batch: Any, *, required: bool) -> tuple[Tensor | None, Any]:
    """``(dataset indices, batch)`` of a collated batch: the indices an
    :class:`IndexedDataset` attached (a flat CPU ``long`` tensor), or ``None`` where there are
    none and ``required`` is false (a stage reporting to a sampler needs them).

    Example:
        >>> import torch
        >>> split_indexed(IndexedSample(torch.tensor([4, 2]), "batch"), required=True)
        (tensor([4, 2]), 'batch')
    """
    if isinstance(batch, IndexedSample):
        indices = batch.index
        if isinstance(indices, Tensor) and indices.dim() == 1 and indices.device.type == "cpu":
            return indices, batch.sample  # what default_collate makes: nothing to convert
        indices = torch.as_tensor(indices)
        if indices.dim() > 1:
            raise AdaptiveBatchError(
                f"the batch carries indices of shape {tuple(indices.shape)}, a batch of batches: "
                "pass the AdaptiveBatchSampler as DataLoader(..., batch_sampler=sampler), not "
                "sampler=sampler"
            )
        return indices.flatten().cpu(), batch.sample
    if required:
        raise AdaptiveBatchError(
            "reporting to a sampler needs each batch's dataset indices: wrap the dataset as "
            "IndexedDataset(dataset)"
        )
    return None, batch


def fetch_batch(
    dataset: Any, indices: Sequence[int], collate_fn: Callable[[list[Any]], Any] = default_collate
) -> Any:
    """Collate ``dataset[i]`` for each index: the map step of a ``torchdata.nodes`` pipeline.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> fetch_batch(IndexedDataset(TensorDataset(torch.arange(4.0))), [3, 1]).index.tolist()
        [3, 1]
    """
    getitems = getattr(dataset, "__getitems__", None)
    return collate_fn(
        getitems(list(indices)) if getitems is not None else [dataset[i] for i in indices]
    )


def check_not_resharded(batches: Any, sampler: Any) -> None:
    """Refuse a loader whose batch sampler wraps ``sampler`` (Accelerate's ``BatchSamplerShard``
    after ``accelerator.prepare(loader)``, say): it would split or skip the sampler's batches,
    which are sharded by rank already, and their feedback would never come."""
    outer = getattr(batches, "batch_sampler", None)
    for _ in range(4):  # a few layers of wrapping at most
        if outer is None or outer is sampler:
            return
        inner = getattr(outer, "batch_sampler", None) or getattr(outer, "sampler", None)
        if inner is sampler and type(outer) is BatchSampler:
            raise AdaptiveBatchError(
                "the AdaptiveBatchSampler was given to the DataLoader as sampler=, so torch "
                "batches its batches again: pass it as batch_sampler= instead, "
                "DataLoader(IndexedDataset(dataset), batch_sampler=sampler)"
            )
        if inner is sampler:
            raise AdaptiveBatchError(
                f"the loader's batch sampler is a {type(outer).__name__} around the "
                "AdaptiveBatchSampler, which would re-shard its batches (they are sharded by rank "
                "already): with Accelerate, prepare the loader with "
                "adaptive_batch.integrations.accelerate.prepare_loader(accelerator, loader), not "
                "accelerator.prepare(loader)"
            )
        outer = inner
