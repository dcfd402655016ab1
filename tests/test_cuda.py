"""On a GPU, a steady-state training step with StepFeedback never waits for the device: the
losses and statistics reach the host by a non-blocking copy read a step later. A look-ahead
SubsetFilter decides each subset on the host, so it copies once per batch (documented in
docs/scaling.md), and nothing more. Skipped without CUDA."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from adaptive_batch.policies import GradientNoiseScale, InfoBatch, SmallLoss

from .synthetic import features_of, steady_stage

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DATASET, BATCH = 10_000, 64


def _steps(stage_kind: str, policy, steps: int, sync_mode: str) -> list[warnings.WarningMessage]:
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sampler, stage, loss_fn, handed = steady_stage(DATASET, policy, BATCH, stage_kind, model)

    def step() -> None:
        item = features_of(next(handed), pin=True)
        x, y = stage.filter_batch(item) if stage_kind == "filter" else stage.hand_out(item)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()

    for _ in range(3):  # warm up: the epoch's plan, CUDA's lazy initialisation
        step()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode(sync_mode)
        try:
            for _ in range(steps):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert sampler.num_feedback >= steps  # the steps were measured and reported
    return list(seen)


@pytest.mark.parametrize(
    ("policy", "stage"),
    [
        (InfoBatch(num_epochs=100), "step"),
        (InfoBatch(num_epochs=100), "step-shared"),  # weighted(): the stage's loss, shared
        (SmallLoss(stage="in_batch", fraction=0.3), "step"),
        (GradientNoiseScale(), "step"),
    ],
    ids=["plan", "plan-shared-loss", "in-batch", "sizing"],
)
def test_step_feedback_steps_never_synchronise(policy, stage):
    _steps(stage, policy, steps=40, sync_mode="error")  # a synchronising op raises (40: a group)


def test_the_look_ahead_filter_synchronises_once_per_batch():
    seen = _steps("filter", None, steps=5, sync_mode="warn")
    syncs = [w for w in seen if "synchroniz" in str(w.message).lower()]
    assert len(syncs) <= 5
