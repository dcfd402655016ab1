"""BatchSizeLR: each rule's factor by hand, through a real optimizer."""

from __future__ import annotations

import math

import pytest
import torch

from adaptive_batch import AdaptiveBatchSampler, BatchSizeLR, Feedback, Reason
from adaptive_batch.policies import GradientNoiseScale, PadaDamp


class Fixed:
    """A sizing rule answering one number (its state is nothing)."""

    def __init__(self, answer: float) -> None:
        self.answer = answer

    def next_batch_size(self, batch_size, feedback, progress):
        return self.answer

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def step_once(sampler: AdaptiveBatchSampler, **stats: float) -> None:
    batch = next(iter(sampler))
    kept = torch.tensor(batch)
    sampler.feedback(Feedback(kept, kept[:0], Reason.SELECTED, stats))


def make(rule: str, answer: float, policy=None):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(
        [{"params": model.weight, "lr": 0.1}, {"params": model.bias, "lr": 0.01}]
    )
    sampler = AdaptiveBatchSampler(
        10_000, policy=policy or Fixed(answer), batch_size=100, max_batch_size=400
    )
    return optimizer, sampler, BatchSizeLR(optimizer, sampler, rule)


@pytest.mark.parametrize(
    ("rule", "answer", "factor"),
    [
        ("linear", 300, 3.0),
        ("sqrt", 400, 2.0),
        ("linear", 50, 0.5),
        ("damp", 800, 0.5),
        ("damp", 200, 1.0),
    ],
)
def test_factors_by_hand(rule, answer, factor):
    optimizer, sampler, scheduler = make(rule, answer)
    assert [g["lr"] for g in optimizer.param_groups] == [0.1, 0.01]  # factor 1 at the start
    step_once(sampler)
    optimizer.step()
    scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.1 * factor, 0.01 * factor])


def test_damp_follows_the_requested_size_past_the_cap():
    # PadaDamp asks for 2000 at update 1 (rate 1900, wait 0); the cap is 400: lr *= 400 / 2000.
    optimizer, sampler, scheduler = make("damp", 0, policy=PadaDamp(rate=1900.0, wait=0, dwell=1))
    step_once(sampler)
    optimizer.step()
    scheduler.step()
    assert sampler.batch_size == 400 and sampler.requested_batch_size == 2000
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 400 / 2000)


def test_adascale_gain_by_hand():
    gns = GradientNoiseScale(ema_decay=0.0, overhead_samples=10_000.0, min_gain=0.0)
    optimizer, sampler, scheduler = make("adascale", 0, policy=gns)
    # var = 0.99 * 100 / 99 = 1.0, sqr = 0.02 - 1 / 100 = 0.01: phi = 100, B* = sqrt(1e6) -> 400 cap.
    step_once(sampler, grad_variance=0.99, grad_sq_norm=0.02)
    optimizer.step()
    scheduler.step()
    scale = 400 / 100
    gain = (1.0 + 0.01) / (1.0 / scale + 0.01)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * gain)
    assert 1 <= gain <= scale


def test_bad_rules_are_refused():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sampler = AdaptiveBatchSampler(100)
    with pytest.raises(ValueError, match="rule must be"):
        BatchSizeLR(optimizer, sampler, "cubic")
    with pytest.raises(ValueError, match="GradientNoiseScale"):
        BatchSizeLR(optimizer, sampler, "adascale")
    assert math.isclose(BatchSizeLR(optimizer, sampler, "sqrt").factor(), 1.0)
