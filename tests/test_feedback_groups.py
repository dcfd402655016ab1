"""Feedback in groups: when nothing reads each batch's feedback (an epoch plan on one process,
no sizing rule, no listener), StepFeedback reports a group of batches at once. The sampler must
end up exactly where batch-by-batch feedback takes it; and ``weighted()`` without a loss
computes each batch's losses once, for the step and the feedback."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader

from adaptive_batch import (
    AdaptiveBatchError,
    AdaptiveBatchSampler,
    AdaptiveBatchWarning,
    IndexedDataset,
    StepFeedback,
)
from adaptive_batch.contract import FeedbackGroup
from adaptive_batch.policies import GradientNoiseScale, InfoBatch, SmallLoss
from adaptive_batch.sample.ledger import FeedbackLedger
from adaptive_batch.train.delivery import GROUP_BATCHES

from .synthetic import blobs

SIZE = 12


@st.composite
def batch_streams(draw):
    """Batches of indices (an index may come back in a later batch), kept masks and losses."""
    count = draw(st.integers(1, 6))
    batches = []
    for _ in range(count):
        indices = draw(st.lists(st.integers(0, SIZE - 1), min_size=1, max_size=5, unique=True))
        kept = draw(st.lists(st.booleans(), min_size=len(indices), max_size=len(indices)))
        losses = draw(
            st.lists(st.floats(0, 10, width=32), min_size=len(indices), max_size=len(indices))
        )
        batches.append((np.array(indices), np.array(kept), np.array(losses, np.float32)))
    return batches


def _columns(ledger: FeedbackLedger):
    return (
        ledger.in_flight.tolist(),
        ledger.times_kept.tolist(),
        ledger.times_dropped.tolist(),
        [None if np.isnan(v) else v for v in ledger.losses.tolist()],
        ledger.num_feedback,
        ledger.num_candidates,
        ledger.num_kept,
        ledger.num_scored,
    )


@given(stream=batch_streams(), selected=st.booleans())
def test_a_group_leaves_the_ledger_as_batch_by_batch_feedback_does(stream, selected):
    one_by_one, grouped = FeedbackLedger(SIZE), FeedbackLedger(SIZE)
    for ledger in (one_by_one, grouped):
        for indices, _, _ in stream:
            ledger.handed_out(indices)
    for indices, kept, losses in stream:  # the reference: one batch at a time
        kept = kept if selected else np.ones_like(kept)
        one_by_one.settle(indices)
        order = np.concatenate([losses[kept], losses[~kept]])
        one_by_one.record(indices[kept], indices[~kept], order)
    candidates = np.concatenate([indices for indices, _, _ in stream])
    mask = np.concatenate([kept for _, kept, _ in stream]) if selected else None
    losses = np.concatenate([losses for _, _, losses in stream])
    repeats = grouped.settle_group(candidates, len(stream))
    grouped.record_group(candidates, mask, losses, repeats)
    assert repeats == (np.unique(candidates).size < candidates.size)
    assert _columns(grouped) == _columns(one_by_one)


def test_a_group_naming_an_index_more_often_than_it_was_handed_out_is_refused():
    ledger = FeedbackLedger(SIZE)
    ledger.handed_out(np.array([1, 2]))
    with pytest.raises(AdaptiveBatchError, match="await no feedback"):
        ledger.settle_group(np.array([1, 2, 2]), 2)
    with pytest.raises(AdaptiveBatchError, match="outside the dataset"):
        ledger.settle_group(np.array([SIZE]), 1)


def test_a_feedback_group_checks_its_shapes():
    indices = torch.arange(4)
    with pytest.raises(AdaptiveBatchError, match="losses must have one entry per candidate"):
        FeedbackGroup(indices, None, torch.zeros(3), 1, last=lambda: None)
    with pytest.raises(AdaptiveBatchError, match="kept must have one entry per candidate"):
        FeedbackGroup(indices, torch.ones(5, dtype=torch.bool), None, 1, last=lambda: None)
    with pytest.raises(AdaptiveBatchError, match="1 batch or more"):
        FeedbackGroup(indices, None, None, 0, last=lambda: None)


def test_a_sampler_that_reads_each_feedback_refuses_a_group():
    sampler = AdaptiveBatchSampler(64, policy=GradientNoiseScale(), batch_size=16)
    assert sampler.reads_each_feedback
    group = FeedbackGroup(torch.arange(4), None, torch.zeros(4), 1, last=lambda: None)
    with pytest.raises(TypeError, match="batch by batch"):
        sampler.feedback_group(group)


def _linear_infobatch(samples: int):
    """A linear model on ``samples`` blobs under InfoBatch, batches of 8 through StepFeedback."""
    torch.manual_seed(0)
    data = blobs(samples)
    model = nn.Sequential(nn.Linear(8, 3))
    sampler = AdaptiveBatchSampler(
        data, policy=InfoBatch(num_epochs=2), batch_size=8, min_batch_size=8
    )
    batches = StepFeedback(
        DataLoader(IndexedDataset(data), batch_sampler=sampler), model, sampler=sampler
    )
    return data, model, sampler, batches


def _train(policy, *, listen: bool, epochs: int = 3, samples: int = 600, shared: bool = False):
    """Epochs of a small MLP under ``policy``; with ``listen`` a listener makes feedback come
    batch by batch. Returns the sampler, each epoch's batches and the most batches held."""
    torch.manual_seed(0)
    data = blobs(samples)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    sampler = AdaptiveBatchSampler(data, policy=policy, batch_size=8, min_batch_size=8, seed=3)
    if listen:
        sampler.add_listener(lambda sampler, feedback: None)
    batches = StepFeedback(
        DataLoader(IndexedDataset(data), batch_sampler=sampler), model, sampler=sampler
    )
    loss_fn = (
        batches.weighted()
        if shared
        else batches.weighted(lambda z, y: F.cross_entropy(z, y, reduction="none"))
    )
    orders, most_held = [], 0
    for _ in range(epochs):
        order = []
        for x, y in batches:
            order.append(batches.current_indices.tolist())
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
            most_held = max(most_held, batches.num_held)
        orders.append(order)
    return sampler, orders, most_held


@pytest.mark.parametrize(
    "make_policy",
    [
        lambda: InfoBatch(num_epochs=3),
        lambda: SmallLoss(fraction=0.2, warmup_epochs=1),
        lambda: SmallLoss(stage="in_batch", fraction=0.25),
    ],
    ids=["infobatch", "small-loss-plan", "small-loss-in-batch"],
)
def test_grouped_feedback_trains_exactly_as_batch_by_batch(make_policy):
    reference, reference_orders, reference_held = _train(make_policy(), listen=True)
    sampler, orders, held = _train(make_policy(), listen=False)
    assert not sampler.reads_each_feedback and reference.reads_each_feedback
    assert reference_held == 1 and held == GROUP_BATCHES  # it did group
    assert orders == reference_orders  # every epoch's plan saw every batch's feedback
    for column in ("losses", "times_kept", "times_dropped"):
        torch.testing.assert_close(
            getattr(sampler.ledger, column), getattr(reference.ledger, column), equal_nan=True
        )
    assert sampler.num_feedback == reference.num_feedback == sum(map(len, orders))
    assert sampler.num_kept == reference.num_kept


def test_reading_the_sampler_reports_the_batches_held_for_a_group():
    _data, model, sampler, batches = _linear_infobatch(400)
    for seen, (x, y) in enumerate(batches, 1):
        F.cross_entropy(model(x), y).backward()
        if seen == 10:
            assert batches.num_held == 10  # 9 measured and held, 1 in training
            assert sampler.num_feedback == 9  # reading it reports them
            assert batches.num_held == 1
            assert batches.last_feedback.kept.numel() == 8  # the 9th batch's own feedback
            break


def test_weighted_without_a_loss_computes_the_losses_once_for_step_and_feedback():
    shared, shared_orders, _ = _train(InfoBatch(num_epochs=3), listen=False, shared=True)
    explicit, explicit_orders, _ = _train(InfoBatch(num_epochs=3), listen=False)
    assert shared_orders == explicit_orders
    torch.testing.assert_close(shared.ledger.losses, explicit.ledger.losses, equal_nan=True)
    torch.testing.assert_close(shared.ledger.times_kept, explicit.ledger.times_kept)


def test_a_shared_loss_on_another_tensor_falls_back_to_the_head_s_own_losses():
    data, model, _sampler, batches = _linear_infobatch(64)
    loss_fn = batches.weighted()
    for step, (x, y) in enumerate(batches):
        logits = model(x)
        # from the 3rd batch on, the loss is taken on a scaled copy: not the head's output
        loss_fn(logits if step < 2 else logits * 2.0, y).backward()
        if step >= 1:
            assert batches.shares_losses == (step < 3)
        if step == 4:
            break
    batches.flush()
    last = batches.last_feedback
    x, y = data.tensors[0][last.kept], data.tensors[1][last.kept]
    with torch.no_grad():
        expected = F.cross_entropy(model(x), y, reduction="none")
    # the feedback is the head output's loss, not the scaled copy's (the model has not stepped)
    torch.testing.assert_close(last.losses, expected)


def test_a_group_with_non_finite_losses_warns_once():
    _data, model, sampler, batches = _linear_infobatch(200)
    with pytest.warns(AdaptiveBatchWarning, match="NaN or infinite"):
        for x, y in batches:
            x = x.clone()
            x[0] = float("nan")
            F.cross_entropy(model(x), y)
    assert sampler.ledger.losses.isnan().sum() == sampler.num_feedback


def test_a_weighted_loss_over_more_rows_than_the_batch_is_a_clear_error():
    _data, model, _sampler, batches = _linear_infobatch(40)
    loss_fn = batches.weighted()
    x, y = next(iter(batches))
    with pytest.raises(AdaptiveBatchError, match="got 16 rows, but the batch just yielded has 8"):
        loss_fn(model(torch.cat([x, x])), torch.cat([y, y]))
