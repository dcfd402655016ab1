"""IndexOrder: the index set, which of it each epoch draws and in what order, on this rank."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence, Set
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..contract import EpochPlan, EpochPlanRule, ScoreTable
from ..errors import AdaptiveBatchError, AdaptiveBatchTypeError

__all__ = ["IndexOrder"]


class IndexOrder:
    """Which dataset indices an epoch draws, in what order, and which of them are this rank's.

    An epoch's *plan* says which indices of the index set the epoch draws (all of them, unless an
    epoch-plan rule decides otherwise from the per-index scores) and with what weight. It is
    decided once per epoch, when the epoch is first needed (its first pass, or ``len()``), and
    kept: a checkpoint stores it, so a resumed run draws exactly what the uninterrupted run drew.
    The drawn indices are then shuffled by ``seed + epoch`` (or kept in the index set's order
    without ``shuffle``); every rank computes the same order and takes its share: rank ``r`` of
    ``R`` takes ``order[r::R]`` of the first ``R * (len(order) // R)``, so shards are disjoint and
    equal; the ``len(order) % R`` left over rotate with the shuffle.

    Example:
        >>> order = IndexOrder(10, [9, 3, 5, 1], shuffle=False, seed=0, num_replicas=2, rank=1)
        >>> order.epoch_indices(0).tolist()
        [3, 1]
    """

    PLANS_KEY = "plans"
    RULE_KEY = "rule"

    def __init__(
        self,
        dataset_size: int,
        indices: Sequence[int] | Tensor | None,
        *,
        shuffle: bool,
        seed: int,
        num_replicas: int,
        rank: int,
        rule: EpochPlanRule | None = None,
        scores: Callable[[Tensor | None], ScoreTable] | None = None,
    ) -> None:
        self.dataset_size = dataset_size
        self.indices = self.check_indices(indices, dataset_size)
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.rule = rule
        self.scores = scores
        if self.indices.numel() // num_replicas < 1:
            raise AdaptiveBatchError(
                f"{self.indices.numel()} indices cannot give each of {num_replicas} replicas one"
            )
        # The index set is the whole dataset in its order: scores and weights need no gather.
        self._whole = self.indices.numel() == dataset_size and bool(
            (self.indices == torch.arange(dataset_size)).all()
        )
        self._plans: dict[int, EpochPlan] = {}
        self._counts: dict[int, int] = {}
        self._cached: tuple[int, np.ndarray] | None = None
        self._weights_by_index: tuple[int, np.ndarray] | None = None

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

    def decide(self, epoch: int) -> EpochPlan:
        """The plan of ``epoch``: decided now if it was not yet (by the rule, from the scores)."""
        if epoch not in self._plans:
            size = self.indices.numel()
            if self.rule is None:
                plan = EpochPlan.everything(size)
            else:
                assert self.scores is not None
                generator = torch.Generator().manual_seed((self.seed + 7919 * (epoch + 1)) % 2**62)
                table = self.scores(None if self._whole else self.indices)
                plan = self.rule.plan(epoch, table, generator)
                if plan.drawn.shape != (size,):
                    raise AdaptiveBatchError(
                        f"{type(self.rule).__name__} planned {plan.drawn.numel()} entries for an "
                        f"index set of {size}"
                    )
            self._remember(epoch, plan)
        return self._plans[epoch]

    def _remember(self, epoch: int, plan: EpochPlan) -> None:
        """Keep the plan and its count (counted once: per step it is read, never recounted)."""
        count = int(plan.drawn.sum())
        if count < self.num_replicas:
            raise AdaptiveBatchError(
                f"{type(self.rule).__name__} planned {count} indices for epoch {epoch}: fewer "
                f"than the {self.num_replicas} replicas"
            )
        self._plans[epoch] = plan
        self._counts[epoch] = count
        for old in sorted(self._plans)[:-3]:  # keep the few epochs a pass can still be in
            if old != epoch:
                del self._plans[old], self._counts[old]

    def order(self, epoch: int) -> Tensor:
        """The indices the whole job draws in ``epoch``, in order (the same on every rank)."""
        plan = self.decide(epoch)
        drawn = (
            self.indices if self._counts[epoch] == plan.drawn.numel() else self.indices[plan.drawn]
        )
        if not self.shuffle:
            return drawn
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return drawn[torch.randperm(drawn.numel(), generator=generator)]

    def shard(self, order: Tensor) -> Tensor:
        """This rank's share of an epoch's order."""
        share = order.numel() // self.num_replicas
        return order[: share * self.num_replicas][self.rank :: self.num_replicas]

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This rank's indices for ``epoch``, in the order they are drawn (an ``int64`` array:
        a pass slices it per batch)."""
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, self.shard(self.order(epoch)).contiguous().numpy())
        return self._cached[1]

    def epoch_length(self, epoch: int | None = None) -> int:
        """How many indices this rank draws in ``epoch`` (deciding its plan); without an epoch,
        in the latest epoch already planned (the whole share before any plan)."""
        if epoch is None:
            drawn = self._counts[max(self._counts)] if self._counts else self.indices.numel()
        else:
            self.decide(epoch)
            drawn = self._counts[epoch]
        return drawn // self.num_replicas

    def weights(self, epoch: int, dataset_indices: np.ndarray) -> np.ndarray | None:
        """The plan's weights of these dataset indices in ``epoch`` (``None``: all 1). The
        first call of an epoch lays the plan's weights out by dataset index (once per epoch);
        each call after that is a gather of the batch's entries."""
        plan = self._plans.get(epoch)
        if plan is None or plan.weights is None:
            return None
        if self._weights_by_index is None or self._weights_by_index[0] != epoch:
            weights = plan.weights.to(torch.float32)
            if not self._whole:
                by_index = torch.ones(self.dataset_size)
                by_index[self.indices] = weights
                weights = by_index
            self._weights_by_index = (epoch, weights.contiguous().numpy())
        return self._weights_by_index[1][dataset_indices]

    def digest(self, epoch: int | None = None) -> str:
        """A short fingerprint of the index set (and of an epoch's plan): ranks compare it."""
        data = self.indices.numpy().tobytes()
        if epoch is not None:
            data += self.decide(epoch).drawn.numpy().tobytes()
        return hashlib.sha1(data).hexdigest()[:16]

    def state_dict(self) -> dict[str, Any]:
        return {
            self.PLANS_KEY: {
                epoch: {"drawn": p.drawn.clone(), "weights": p.weights, "stats": dict(p.stats)}
                for epoch, p in self._plans.items()
                if self.rule is not None
            },
            self.RULE_KEY: self.rule.state_dict() if self.rule is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._plans, self._counts = {}, {}
        for epoch, p in sorted(state.get(self.PLANS_KEY, {}).items()):
            self._remember(int(epoch), EpochPlan(p["drawn"].clone(), p["weights"], p["stats"]))
        if self.rule is not None and state.get(self.RULE_KEY) is not None:
            self.rule.load_state_dict(state[self.RULE_KEY])
        self._cached = None
        self._weights_by_index = None
