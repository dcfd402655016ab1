"""EDBA: the margin-loss selection against a per-subset loop, its invariants, and its sizing rule."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from adaptive_batch import Feedback, ProbeResult, Progress, Reason
from adaptive_batch.policies import EDBA, EDBASelection, EDBASizing
from adaptive_batch.policies.subsets import random_subset_masks


def probe_result(grads: torch.Tensor, losses: torch.Tensor) -> ProbeResult:
    return ProbeResult(losses=losses, gram=grads @ grads.T)


def random_batch(seed: int, size: int, dim: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(size, dim, generator=gen, dtype=torch.float64)
    losses = torch.rand(size, generator=gen, dtype=torch.float64) * 3
    return grads, losses


def reference_selection(grads, losses, loss_ema, grad_ema, seed, num_subsets, min_size):
    """Margins by building each subset's mean gradient explicitly."""
    size = grads.shape[0]
    masks = random_subset_masks(size, num_subsets, min_size, torch.Generator().manual_seed(seed))
    subsets = [list(range(size))] + [m.nonzero().flatten().tolist() for m in masks]
    loss = sum(losses.tolist()) / size
    margins = []
    for subset in subsets:
        mean = sum(grads[i] for i in subset) / len(subset)
        norm = math.sqrt(sum(v * v for v in mean.tolist()))
        margins.append(abs((loss - loss_ema) / (norm - grad_ema) - 1))
    best = min(range(len(margins)), key=lambda k: (margins[k], k))
    return subsets[best], margins[best]


@given(
    seed=st.integers(0, 10_000),
    size=st.integers(2, 40),
    loss_ema=st.floats(0.0, 3.0),
    grad_ema=st.floats(0.1, 3.0),
)
def test_selection_equals_per_subset_reference(seed, size, loss_ema, grad_ema):
    grads, losses = random_batch(seed, size)
    rule = EDBASelection(num_subsets=16, min_kept=2, seed=seed)
    rule.loss_ema, rule.grad_ema = loss_ema, grad_ema
    selection = rule.select(probe_result(grads, losses))
    kept, margin = reference_selection(
        grads, losses, loss_ema, grad_ema, seed, 16, rule.min_subset_size(size)
    )
    assert selection.reason == Reason.SELECTED
    assert selection.kept.tolist() == kept
    assert selection.stats["margin"] == pytest.approx(margin, rel=1e-9, abs=1e-12)


@given(seed=st.integers(0, 10_000), size=st.integers(1, 60), steps=st.integers(1, 4))
def test_kept_is_a_nonempty_subset_within_bounds_and_reproducible(seed, size, steps):
    rules = [EDBASelection(num_subsets=8, seed=seed) for _ in range(2)]
    for step in range(steps):
        grads, losses = random_batch(seed + step, size)
        first, second = (rule.select(probe_result(grads, losses)) for rule in rules)
        kept = first.kept.tolist()
        assert kept == second.kept.tolist() and first.reason == second.reason
        assert kept == sorted(set(kept)) and 1 <= len(kept) <= size
        assert all(0 <= i < size for i in kept)
        if first.reason == Reason.SELECTED and len(kept) < size:
            assert len(kept) >= rules[0].min_subset_size(size)
        else:
            assert len(kept) == size


def test_first_batch_warms_up_running_averages():
    grads, losses = random_batch(0, 10)
    rule = EDBASelection()
    selection = rule.select(probe_result(grads, losses))
    assert selection.reason == Reason.WARMUP and selection.kept.tolist() == list(range(10))
    assert rule.loss_ema == pytest.approx(losses.mean().item())
    assert rule.grad_ema == pytest.approx(grads.mean(0).norm().item())


def test_running_averages_follow_the_chosen_subset():
    grads, losses = random_batch(1, 20)
    rule = EDBASelection(ema_decay=0.75)
    rule.loss_ema, rule.grad_ema = 1.0, 0.5
    selection = rule.select(probe_result(grads, losses))
    chosen_norm = grads[selection.kept].mean(0).norm().item()
    assert rule.loss_ema == pytest.approx(0.75 * 1.0 + 0.25 * losses.mean().item())
    assert rule.grad_ema == pytest.approx(0.75 * 0.5 + 0.25 * chosen_norm)


def test_one_sample_batch_is_kept():
    rule = EDBASelection()
    selection = rule.select(probe_result(torch.ones(1, 3), torch.ones(1)))
    assert selection.reason == Reason.SINGLE_SAMPLE and selection.kept.tolist() == [0]


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("where", ["loss", "grad"])
def test_nonfinite_keeps_everything_and_leaves_state_alone(bad, where):
    grads, losses = random_batch(2, 8)
    if where == "loss":
        losses[3] = bad
    else:
        grads[5, 0] = bad
    rule = EDBASelection()
    rule.loss_ema, rule.grad_ema = 1.0, 0.5
    selection = rule.select(probe_result(grads, losses))
    assert selection.reason == Reason.NONFINITE and selection.kept.numel() == 8
    assert (rule.loss_ema, rule.grad_ema) == (1.0, 0.5)


def test_zero_denominators_keep_everything():
    # Identical per-sample gradients: every subset has the same norm, equal to the average.
    grads = torch.ones(6, 3, dtype=torch.float64)
    rule = EDBASelection()
    rule.loss_ema, rule.grad_ema = 1.0, math.sqrt(3.0)
    selection = rule.select(probe_result(grads, torch.full((6,), 0.5, dtype=torch.float64)))
    assert selection.reason == Reason.DEGENERATE and selection.kept.numel() == 6


def test_state_round_trip_continues_identically():
    batches = [random_batch(s, 25) for s in range(8)]
    original = EDBASelection(seed=3)
    for grads, losses in batches[:4]:
        original.select(probe_result(grads, losses))
    restored = EDBASelection(seed=99)
    restored.load_state_dict(original.state_dict())
    for grads, losses in batches[4:]:
        a = original.select(probe_result(grads, losses))
        b = restored.select(probe_result(grads, losses))
        assert a.kept.tolist() == b.kept.tolist() and a.stats == b.stats


def test_full_batch_can_be_excluded():
    grads, losses = random_batch(4, 30)
    rule = EDBASelection(include_full_batch=False, min_kept_fraction=0.0, min_kept=1)
    rule.loss_ema, rule.grad_ema = 2.0, 0.1
    for _ in range(20):
        selection = rule.select(probe_result(grads, losses))
        assert selection.reason == Reason.SELECTED and selection.kept.numel() < 30


def test_subset_masks_respect_size_bounds():
    masks = random_subset_masks(50, 500, 7, torch.Generator().manual_seed(0))
    sizes = masks.sum(1)
    assert int(sizes.min()) >= 7 and int(sizes.max()) <= 50
    assert len(set(sizes.tolist())) > 30  # sizes spread over the range


PROGRESS = Progress(updates=1, candidates=5, epoch_size=100)


def feedback(reason=Reason.SELECTED, **stats) -> Feedback:
    return Feedback(torch.arange(3), torch.arange(3, 5), reason, stats)


@pytest.mark.parametrize(
    ("target", "expected"), [(0.5, math.ceil(100 * 1.1)), (1.5, 100), (3.0, math.floor(100 / 1.1))]
)
def test_sizing_follows_where_the_margin_zero_lies(target, expected):
    rule = EDBASizing(factor=1.1)
    fb = feedback(target_grad_norm=target, min_grad_norm=1.0, max_grad_norm=2.0)
    assert rule.next_batch_size(100, fb, PROGRESS) == expected


def test_sizing_ignores_batches_that_were_not_selected():
    rule = EDBASizing()
    fb = feedback(Reason.WARMUP, target_grad_norm=0.0, min_grad_norm=1.0, max_grad_norm=2.0)
    assert rule.next_batch_size(64, fb, PROGRESS) == 64
    assert rule.next_batch_size(64, feedback(), PROGRESS) == 64


def test_bad_parameters_are_refused():
    for kwargs in (
        {"num_subsets": 0},
        {"min_kept": 0},
        {"ema_decay": 1.0},
        {"min_kept_fraction": 2},
    ):
        with pytest.raises(ValueError):
            EDBASelection(**kwargs)
    with pytest.raises(ValueError):
        EDBASizing(factor=1.0)


def test_edba_policy_has_both_halves():
    policy = EDBA(num_subsets=5, factor=1.5)
    assert policy.selection.num_subsets == 5 and policy.sizing.factor == 1.5
