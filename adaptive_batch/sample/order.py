"""IndexOrder: the index set, and the order in which each epoch draws it on this rank."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence, Set

import torch
from torch import Tensor

from ..errors import AdaptiveBatchError, AdaptiveBatchTypeError

__all__ = ["IndexOrder"]


class IndexOrder:
    """Which dataset indices an epoch draws, in what order, and which of them are this rank's.

    An epoch's *plan* is the sequence of indices the whole job draws in that epoch: by default the
    index set in a permutation seeded by ``seed + epoch`` (or in its given order without
    ``shuffle``). Every rank computes the same plan and takes its share: rank ``r`` of ``R`` takes
    ``plan[r::R]`` of the plan's first ``R * (len(plan) // R)`` indices, so shards are disjoint
    and equal; the ``len(plan) % R`` left over rotate with the shuffle. A plan is a pure function
    of the epoch, so a checkpoint stores the epoch and a position, never the plan.

    Example:
        >>> order = IndexOrder(10, [9, 3, 5, 1], shuffle=False, seed=0, num_replicas=2, rank=1)
        >>> order.epoch_indices(0).tolist()
        [3, 1]
    """

    def __init__(
        self,
        dataset_size: int,
        indices: Sequence[int] | Tensor | None,
        *,
        shuffle: bool,
        seed: int,
        num_replicas: int,
        rank: int,
    ) -> None:
        self.dataset_size = dataset_size
        self.indices = self.check_indices(indices, dataset_size)
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        if self.indices.numel() // num_replicas < 1:
            raise AdaptiveBatchError(
                f"{self.indices.numel()} indices cannot give each of {num_replicas} replicas one"
            )
        self._cached: tuple[int, Tensor] | None = None

    @staticmethod
    def check_indices(indices: Sequence[int] | Tensor | None, dataset_size: int) -> Tensor:
        """The index set as a CPU ``long`` tensor, after checking it names each dataset index at
        most once and nothing outside ``[0, dataset_size)``."""
        if indices is None:
            return torch.arange(dataset_size)
        if isinstance(indices, Set):
            raise AdaptiveBatchTypeError(
                "indices is a set, which has no order (and shuffle=False keeps the given order): "
                "pass sorted(indices), a list or a tensor"
            )
        tensor = torch.as_tensor(indices)
        if tensor.numel() == 0:
            raise AdaptiveBatchError("indices is empty: the sampler would have nothing to yield")
        if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
            raise AdaptiveBatchTypeError(f"indices must be integers; got {tensor.dtype}")
        tensor = tensor.to(torch.long).flatten().cpu()
        if tensor.min() < 0 or tensor.max() >= dataset_size:
            raise AdaptiveBatchError(
                f"indices must lie in [0, {dataset_size}); got values from {int(tensor.min())} "
                f"to {int(tensor.max())}"
            )
        if tensor.unique().numel() != tensor.numel():
            raise AdaptiveBatchError("indices contains duplicates; each index may appear once")
        return tensor.clone()

    def plan(self, epoch: int) -> Tensor:
        """The indices the whole job draws in ``epoch``, in order (the same on every rank)."""
        if not self.shuffle:
            return self.indices
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return self.indices[torch.randperm(self.indices.numel(), generator=generator)]

    def shard(self, plan: Tensor) -> Tensor:
        """This rank's share of a plan."""
        share = plan.numel() // self.num_replicas
        return plan[: share * self.num_replicas][self.rank :: self.num_replicas]

    def epoch_indices(self, epoch: int) -> Tensor:
        """This rank's indices for ``epoch``, in the order they are drawn."""
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, self.shard(self.plan(epoch)))
        return self._cached[1]

    def epoch_length(self, epoch: int) -> int:
        """How many indices this rank draws in ``epoch``."""
        return self.indices.numel() // self.num_replicas

    def digest(self) -> str:
        """A short fingerprint of the index set (checkpoints and ranks compare it)."""
        return hashlib.sha1(self.indices.numpy().tobytes()).hexdigest()[:16]
