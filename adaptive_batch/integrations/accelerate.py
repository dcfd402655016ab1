"""prepare_loader: an adaptive loader through Accelerate's preparation, without its re-sharding.

``accelerator.prepare(loader)`` shards a DataLoader's batch sampler across processes with its
``BatchSamplerShard``, which hands process ``r`` every ``n``-th batch (or a slice of each) of
whatever the batch sampler yields. An :class:`~adaptive_batch.AdaptiveBatchSampler` already
shards its index set by rank and keeps the ranks' batch sizes equal from their merged feedback;
sharded again, each process would train on a fraction of its own share and skip the feedback of
the rest. :func:`prepare_loader` runs Accelerate's own ``prepare_data_loader`` as for one process
(device placement, non-blocking copies, the end-of-data flag ``accelerator.accumulate`` reads) and
leaves the sampler as it is::

    accelerator = Accelerator()
    sampler = AdaptiveBatchSampler(data, policy=InfoBatch(num_epochs=10))  # after Accelerator()
    loader = prepare_loader(accelerator, DataLoader(IndexedDataset(data), batch_sampler=sampler))
    model, optimizer = accelerator.prepare(model, optimizer)
    batches = StepFeedback(loader, model, sampler=sampler)
    accelerator.register_for_checkpointing(sampler)  # save_state / load_state
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader

from ..contract import FeedbackSink
from ..errors import AdaptiveBatchError, AdaptiveBatchTypeError
from ..optional import require

__all__ = ["AcceleratedLoader", "prepare_loader"]


def prepare_loader(accelerator: Any, loader: DataLoader) -> AcceleratedLoader:
    """``loader`` prepared by Accelerate for ``accelerator``'s device, its adaptive batch sampler
    kept whole (see the module).

    Raises :class:`~adaptive_batch.AdaptiveBatchError` when the loader's ``batch_sampler`` is not
    an adaptive sampler, or was built for another number of processes than the accelerator's
    (build it after ``Accelerator()``, which starts the process group it reads its rank from).
    """
    if not isinstance(loader, DataLoader):
        raise AdaptiveBatchTypeError(
            f"prepare_loader takes a DataLoader; got {type(loader).__name__}"
        )
    sampler = loader.batch_sampler
    if not isinstance(sampler, FeedbackSink):
        raise AdaptiveBatchError(
            "the loader's batch_sampler is not an AdaptiveBatchSampler: build the loader as "
            "DataLoader(IndexedDataset(data), batch_sampler=sampler)"
        )
    replicas = getattr(sampler, "num_replicas", 1)
    if replicas != accelerator.num_processes:
        raise AdaptiveBatchError(
            f"the sampler was built for {replicas} process(es) and the accelerator runs "
            f"{accelerator.num_processes}: build the sampler after Accelerator(), so that it "
            "shards by the process group Accelerate started"
        )
    data_loader = require("accelerate.data_loader", "accelerate", "prepare_loader")
    shard = data_loader.prepare_data_loader(
        loader,
        device=accelerator.device,
        num_processes=1,  # the sampler shards by rank itself
        process_index=0,
        put_on_device=accelerator.device_placement,
        use_seedable_sampler=False,
        non_blocking=accelerator.non_blocking,
    )
    return AcceleratedLoader(shard, sampler)


class AcceleratedLoader:
    """Accelerate's ``DataLoaderShard`` around an adaptive loader, its epoch kept in step with the
    sampler's: the shard sets the batch sampler's epoch from its own count of iterations at each
    ``iter()``, which restarts from 0 in a resumed run, while a sampler loaded from a checkpoint
    knows the epoch it is in (:attr:`~adaptive_batch.AdaptiveBatchSampler.next_epoch`)."""

    def __init__(self, shard: DataLoader, sampler: Any) -> None:
        self.shard = shard
        self.batch_sampler = sampler

    def __iter__(self) -> Iterator[Any]:
        self.shard.iteration = self.batch_sampler.next_epoch  # type: ignore[attr-defined]
        return iter(self.shard)

    def __len__(self) -> int:
        return len(self.shard)

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)

    @property
    def device(self) -> Any:
        return self.shard.device  # type: ignore[attr-defined]
