"""The per-step path is O(batch): no operation in a steady-state training step touches more than a
fixed multiple of the batch, whatever the dataset's size (the epoch-level work -- drawing a plan,
shuffling -- happens once per epoch, outside the steps measured here)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from adaptive_batch import AdaptiveBatchSampler
from adaptive_batch.policies import GradientNoiseScale, InfoBatch, SmallLoss, StaleSelectiveBackprop
from adaptive_batch.train.delivery import GROUP_BATCHES

from .synthetic import features_of, steady_stage

DATASET, BATCH = 300_000, 32
#: What a step may touch: a fixed multiple of the batch (the look-ahead probe's Gram matrix is
#: B x B = 32 B here), far below the dataset's 300,000.
LIMIT = 64 * BATCH


class LargestTensorTouched(TorchDispatchMode):
    """Records the largest tensor any torch op reads or writes, parameters excluded."""

    def __init__(self, ignore: set[int]) -> None:
        super().__init__()
        self.ignore = ignore
        self.largest = 0
        self.op = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves((args, kwargs, out)):
            if not isinstance(leaf, torch.Tensor):
                continue
            if leaf.untyped_storage().data_ptr() not in self.ignore and leaf.numel() > self.largest:
                self.largest, self.op = leaf.numel(), str(func)
        return out


class RecordingArray(np.ndarray):
    """A numpy column that records the largest array any ufunc (a sum, a comparison) sees."""

    largest: ClassVar[list[int]] = [0]

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        plain = [np.asarray(i) if isinstance(i, RecordingArray) else i for i in inputs]
        for i in plain:
            if isinstance(i, np.ndarray):
                RecordingArray.largest[0] = max(RecordingArray.largest[0], i.size)
        if "out" in kwargs:
            kwargs["out"] = tuple(np.asarray(o) for o in kwargs["out"])
        return getattr(ufunc, method)(*plain, **kwargs)


def _record_numpy_columns(sampler: AdaptiveBatchSampler) -> None:
    ledger = sampler.ledger
    for name in ("_in_flight", "_kept", "_dropped", "_losses"):
        setattr(ledger, name, getattr(ledger, name).view(RecordingArray))


@pytest.mark.parametrize(
    ("policy", "stage"),
    [
        (InfoBatch(num_epochs=10), "step"),
        (InfoBatch(num_epochs=10), "step-shared"),
        (StaleSelectiveBackprop(num_epochs=10), "step"),
        (SmallLoss(warmup_epochs=0), "step"),
        (SmallLoss(stage="in_batch", fraction=0.4, warmup_epochs=0), "step"),
        (GradientNoiseScale(), "step"),
        (None, "filter"),
    ],
    ids=[
        "infobatch",
        "infobatch-shared-loss",
        "stale-sb",
        "small-loss",
        "in-batch",
        "gns",
        "filter",
    ],
)
def test_a_steady_state_step_touches_o_batch_elements(policy, stage):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sampler, batches, loss_fn, handed = steady_stage(DATASET, policy, BATCH, stage, model)

    def step() -> None:
        item = features_of(next(handed))
        x, y = batches.filter_batch(item) if stage == "filter" else batches.hand_out(item)
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()

    for _ in range(3):  # the epoch's plan and order are decided in the first
        step()
    _record_numpy_columns(sampler)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    parameters |= {
        s["momentum_buffer"].untyped_storage().data_ptr()
        for s in optimizer.state.values()
        if s.get("momentum_buffer") is not None
    }
    RecordingArray.largest[0] = 0
    with LargestTensorTouched(parameters) as mode:
        for _ in range(GROUP_BATCHES + 5):  # an epoch plan's feedback goes a group at a time
            step()
    assert sampler.num_feedback >= GROUP_BATCHES + 5  # the steps were measured and reported
    assert mode.largest <= LIMIT, f"{mode.op} touched {mode.largest} elements"
    assert RecordingArray.largest[0] <= LIMIT
