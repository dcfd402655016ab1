"""Epoch plans: each epoch draws its planned indices exactly once and nothing else, len() is right
for the epoch, the rules do what their papers say (InfoBatch's rescaling is unbiased, small-loss
drops the planted mislabelled samples)."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adaptive_batch import (
    AdaptiveBatchError,
    AdaptiveBatchSampler,
    AdaptiveBatchWarning,
    Feedback,
    IndexedDataset,
    StepFeedback,
    SubsetFilter,
    fetch_batch,
)
from adaptive_batch.contract import EpochPlan, ScoreTable
from adaptive_batch.load import ChunkAssembler
from adaptive_batch.policies import (
    InfoBatch,
    Policy,
    SmallLoss,
    SmallLossPlan,
    StaleSelectiveBackprop,
    Stateless,
)
from adaptive_batch.policies.mixture import fit_loss_mixture

from .scripted import ScriptedSizes


class RandomPlan:
    """Draws each index with probability ``keep`` (from the generator the sampler gives), and
    records what it was shown."""

    def __init__(self, keep: float) -> None:
        self.keep = keep
        self.seen: list[int] = []

    def plan(self, epoch, scores, generator):
        self.seen.append(epoch)
        drawn = torch.rand(scores.losses.numel(), generator=generator) < self.keep
        drawn[0] = True
        return EpochPlan(drawn)

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def table(losses: torch.Tensor) -> ScoreTable:
    zeros = torch.zeros(losses.numel(), dtype=torch.int32)
    return ScoreTable(losses, zeros, zeros)


@given(
    size=st.integers(2, 120),
    subset=st.booleans(),
    keep=st.floats(0.05, 1.0),
    chunk=st.one_of(st.none(), st.integers(1, 8)),
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=5),
    fixed=st.booleans(),
)
def test_each_epoch_draws_its_plan_exactly_once_and_len_is_right(
    size, subset, keep, chunk, sizes, fixed
):
    indices = list(range(0, size, 2)) if subset and size > 3 else None
    index_set = indices or list(range(size))
    rule = RandomPlan(keep)
    sizing = None if fixed else ScriptedSizes(sizes)
    low = 1 if chunk is None else chunk
    sampler = AdaptiveBatchSampler(
        size, policy=Policy(sizing=sizing, plan=rule), indices=indices, batch_size=low * 2,
        min_batch_size=low, max_batch_size=max(low * 4, 8), chunk_size=chunk, seed=3,
    )  # fmt: skip
    for epoch in range(3):
        expected_len = len(sampler) if (fixed or chunk) else None  # decides the epoch's plan
        planned = set(torch.tensor(index_set)[sampler.order.decide(epoch).drawn].tolist())
        drawn: list[int] = []
        pieces = 0
        for batch in sampler:
            pieces += 1
            drawn += batch
            sampler.feedback(_keep_all(batch))
        assert sorted(drawn) == sorted(planned)  # exactly once, nothing outside the plan
        assert set(drawn) <= set(index_set)
        if expected_len is not None:
            assert pieces == expected_len
    assert rule.seen == [0, 1, 2]  # planned once per epoch


def _keep_all(batch):
    from adaptive_batch import Feedback

    tensor = torch.tensor(batch)
    return Feedback(tensor, tensor[:0], losses=torch.rand(len(batch)))


def test_a_plan_comes_back_from_a_checkpoint_not_from_the_table():
    sampler = AdaptiveBatchSampler(
        100, policy=RandomPlan(0.5), batch_size=10, min_batch_size=10, max_batch_size=10
    )
    iterator = iter(sampler)
    sampler.feedback(_keep_all(next(iterator)))  # trained: a batch awaiting feedback is handed back
    state = sampler.state_dict()
    original_rest = [i for b in iterator for i in b]
    # A rule that would plan otherwise (keep 0.9): the saved plan, not a new one, is resumed.
    restored = AdaptiveBatchSampler(
        100, policy=RandomPlan(0.9), batch_size=10, min_batch_size=10, max_batch_size=10
    )
    restored.load_state_dict(state)
    assert [i for b in restored for i in b] == original_rest
    assert torch.equal(restored.order.decide(0).drawn, sampler.order.decide(0).drawn)


def test_plans_are_checked():
    class Broken(RandomPlan):
        def plan(self, epoch, scores, generator):
            return EpochPlan(torch.ones(3, dtype=torch.bool))

    sampler = AdaptiveBatchSampler(10, policy=Broken(1.0), batch_size=5, min_batch_size=5)
    with pytest.raises(AdaptiveBatchError, match="planned 3 entries"):
        list(sampler)
    with pytest.raises(AdaptiveBatchError, match="at least one"):
        EpochPlan(torch.zeros(4, dtype=torch.bool))


# -- InfoBatch ------------------------------------------------------------------------------------


def test_infobatch_prunes_a_random_half_of_the_well_learned_and_anneals():
    losses = torch.tensor([0.1, 0.2, 0.3, 0.4, 5.0, 6.0, math.nan, 7.0])
    rule = InfoBatch(prune_ratio=0.5, delta=0.5, num_epochs=4)
    plan = rule.plan(0, table(losses), torch.Generator().manual_seed(1))
    well_learned = {0, 1, 2, 3}  # below the mean 2.71; the unscored one is never pruned
    pruned = set((~plan.drawn).nonzero().flatten().tolist())
    assert len(pruned) == 2 and pruned <= well_learned
    assert plan.weights[sorted(well_learned - pruned)].tolist() == [2.0, 2.0]
    assert plan.weights[[4, 5, 6, 7]].tolist() == [1.0] * 4
    assert bool(rule.plan(2, table(losses), torch.Generator()).drawn.all())  # annealed: everything
    no_rescale = InfoBatch(rescale=False).plan(0, table(losses), torch.Generator().manual_seed(1))
    assert no_rescale.weights is None


def test_infobatch_rescaled_gradient_is_unbiased_exactly():
    # Per-sample gradients g_i of a linear model; InfoBatch prunes `count` of the well-learned
    # samples uniformly at random (a permutation's first `count`). Averaged over every possible
    # pruned set -- each equally likely -- the weighted sum of the kept gradients is the full sum.
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    weight = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    grads = torch.stack(
        [
            torch.autograd.grad(F.cross_entropy(x[i : i + 1] @ weight.T, y[i : i + 1]), weight)[0]
            for i in range(8)
        ]
    )
    losses = torch.tensor([0.1, 0.2, 0.3, 0.4, 2.0, 3.0, 4.0, 5.0])
    rule = InfoBatch(prune_ratio=0.5)
    plan = rule.plan(0, table(losses), torch.Generator().manual_seed(0))
    well_learned = [0, 1, 2, 3]
    total = torch.zeros_like(grads[0])
    subsets = list(itertools.combinations(well_learned, 2))
    for pruned in subsets:  # every pruned set InfoBatch can draw, with its weights
        kept = [i for i in range(8) if i not in pruned]
        weights = plan.weights.double().clone()
        total += sum(weights[i] * grads[i] for i in kept)
    torch.testing.assert_close(total / len(subsets), grads.sum(0))
    # And the plan does draw from exactly these sets, uniformly.
    seen = {}
    for seed in range(600):
        drawn = rule.plan(0, table(losses), torch.Generator().manual_seed(seed)).drawn
        key = tuple((~drawn).nonzero().flatten().tolist())
        seen[key] = seen.get(key, 0) + 1
    assert set(seen) == set(subsets) and min(seen.values()) > 600 / 6 * 0.7


# -- Stale Selective-Backprop ----------------------------------------------------------------------


def test_stale_selective_backprop_draws_about_keep_favouring_high_losses():
    losses = torch.rand(4000, generator=torch.Generator().manual_seed(0))
    rule = StaleSelectiveBackprop(keep=0.3, num_epochs=10)
    plan = rule.plan(1, table(losses), torch.Generator().manual_seed(0))
    assert plan.drawn.float().mean().item() == pytest.approx(0.3, abs=0.02)
    high, low = losses > 0.9, losses < 0.1
    assert plan.drawn[high].float().mean() > 0.8 and plan.drawn[low].float().mean() < 0.05
    assert bool(rule.plan(0, table(losses), torch.Generator()).drawn.all())  # scores first
    assert bool(rule.plan(9, table(losses), torch.Generator()).drawn.all())  # past the end


# -- small-loss ---------------------------------------------------------------------------------------


def test_the_loss_mixture_finds_the_noisy_mode_and_no_mode_in_one_bump():
    gen = torch.Generator().manual_seed(0)
    clean = torch.rand(700, generator=gen) * 0.3
    noisy = 2.0 + torch.rand(300, generator=gen)
    mixture = fit_loss_mixture(torch.cat([clean, noisy]))
    p = mixture.clean_probability(torch.cat([clean, noisy]))
    assert (p[:700] >= 0.5).float().mean() > 0.99 and (p[700:] < 0.5).float().mean() > 0.99
    assert fit_loss_mixture(torch.randn(1000, generator=gen).abs()) is None  # one bump


def noisy_blobs(count: int, flip: float, seed: int = 0):
    """Well-separated classes with a fraction of labels flipped to another class."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 3
    centres = torch.randn(3, 8, generator=gen) * 4
    x = centres[labels] + torch.randn(count, 8, generator=gen)
    flipped = torch.rand(count, generator=gen) < flip
    noisy_labels = torch.where(
        flipped, (labels + 1 + torch.randint(0, 2, (count,), generator=gen)) % 3, labels
    )
    return TensorDataset(x, noisy_labels), flipped


def test_small_loss_plan_drops_the_planted_mislabelled_samples():
    data, flipped = noisy_blobs(600, 0.25)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sampler = AdaptiveBatchSampler(
        data, policy=SmallLoss(warmup_epochs=3), batch_size=50, min_batch_size=50, max_batch_size=50
    )
    batches = StepFeedback(
        DataLoader(IndexedDataset(data), batch_sampler=sampler), model, sampler=sampler
    )
    criterion = batches.weighted(lambda out, y: F.cross_entropy(out, y, reduction="none"))
    for _ in range(5):
        for x, y in batches:
            optimizer.zero_grad()
            criterion(model(x), y).backward()
            optimizer.step()
    plan = sampler.order.decide(4)
    dropped = ~plan.drawn | (plan.weights == 0)  # left out, or drawn to be scored again only
    assert 0 < int((plan.drawn & (plan.weights == 0)).sum()) < int(dropped.sum())
    precision = flipped[dropped].float().mean().item()
    recall = dropped[flipped].float().mean().item()
    assert precision > 0.9 and recall > 0.8, (precision, recall)


def test_small_loss_look_ahead_keeps_the_clean_samples():
    data, flipped = noisy_blobs(600, 0.25)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    policy = SmallLoss(stage="look_ahead", warmup_epochs=3, epoch_size=600)
    sampler = AdaptiveBatchSampler(data, batch_size=100, min_batch_size=100, max_batch_size=100)
    batches = SubsetFilter(
        DataLoader(IndexedDataset(data), batch_sampler=sampler),
        model,
        policy=policy,
        sampler=sampler,
    )
    trained_flipped = trained = 0
    for epoch in range(5):
        for x, y in batches:
            if epoch == 4:
                kept = batches.last_feedback.kept
                trained_flipped += int(flipped[kept].sum())
                trained += kept.numel()
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    # 25% of the candidates are mislabelled; of what it trains on, under a tenth.
    assert trained_flipped / trained < 0.1 and trained > 0.6 * 600


def test_rules_are_wired_to_the_right_stage():
    with pytest.raises(AdaptiveBatchError, match="epoch_size"):
        SmallLoss(stage="look_ahead")
    with pytest.raises(AdaptiveBatchError, match="stage"):
        SmallLoss(stage="both")
    assert SmallLoss(stage="look_ahead", warmup_epochs=0).plan is None


def test_chunked_plans_are_assembled_within_the_epoch():
    sampler = AdaptiveBatchSampler(
        60, policy=RandomPlan(0.5), batch_size=8, min_batch_size=4, max_batch_size=16, chunk_size=4
    )
    data = IndexedDataset(torch.arange(60))
    assembler = ChunkAssembler(sampler)
    chunks = (fetch_batch(data, c) for c in sampler)
    total = 0
    while (batch := assembler.next_batch(chunks)) is not None:
        total += batch.index.numel()
        sampler.feedback(_keep_all(batch.index.tolist()))
    assert total == int(sampler.order.decide(0).drawn.sum())


# -- RandomSubset (RS2) ------------------------------------------------------------------------


@given(
    size=st.integers(1, 60),
    fraction=st.floats(0.05, 1.0),
    seed=st.integers(0, 5),
)
def test_rs2_draws_its_share_and_every_sample_before_any_repeat(size, fraction, seed):
    from adaptive_batch.policies import RandomSubset

    rule = RandomSubset(fraction, seed=seed)
    count = max(1, round(fraction * size))
    seen = torch.zeros(size, dtype=torch.long)
    covered_at = None
    for epoch in range(3 * math.ceil(size / count) + 2):
        drawn = rule.plan(epoch, ScoreTable.empty(size), torch.Generator()).drawn
        assert int(drawn.sum()) == count  # exactly its share, every epoch
        if covered_at is None:  # nothing drawn twice before all are drawn once
            unseen = int((seen == 0).sum())
            assert int((seen[drawn] == 0).sum()) == min(count, unseen)
        seen += drawn
        if covered_at is None and bool((seen > 0).all()):
            covered_at = epoch
    assert covered_at is not None and covered_at <= math.ceil(size / count)
    # A rule built afresh (a resumed run, another rank) plans any epoch the same way.
    fresh = RandomSubset(fraction, seed=seed)
    again = fresh.plan(5, ScoreTable.empty(size), torch.Generator()).drawn
    assert torch.equal(again, rule.plan(5, ScoreTable.empty(size), torch.Generator()).drawn)


def test_rs2_needs_no_feedback_and_stops_at_num_epochs():
    from adaptive_batch.policies import RandomSubset

    sampler = AdaptiveBatchSampler(
        40, policy=RandomSubset(0.25, num_epochs=2), batch_size=5, min_batch_size=5, seed=0
    )
    with_no_stage = [sorted(i for b in sampler for i in b) for _ in range(3)]
    # No feedback was given, and none was asked for (no warning: pytest turns ours into errors).
    assert [len(e) for e in with_no_stage] == [10, 10, 40]
    assert not set(with_no_stage[0]) & set(with_no_stage[1])  # the second epoch: fresh samples
    with pytest.raises(AdaptiveBatchError, match="fraction"):
        RandomSubset(0.0)


class _HalfFromEpochOne(Stateless):
    """Draws everything in epoch 0, the second half of the indices from epoch 1 on."""

    def plan(self, epoch, scores, generator):
        drawn = torch.ones(scores.losses.numel(), dtype=torch.bool)
        if epoch >= 1:
            drawn[: drawn.numel() // 2] = False
        return EpochPlan(drawn)


def test_len_of_a_chunked_sampler_between_epochs_is_the_next_epoch_s():
    sampler = AdaptiveBatchSampler(100, policy=_HalfFromEpochOne(), batch_size=20, chunk_size=10)
    chunks = list(sampler)
    assert len(chunks) == 10
    for first in range(0, len(chunks), 2):  # batches assembled from two chunks each
        batch = torch.tensor(chunks[first] + chunks[first + 1])
        assert len(sampler) == 10  # the epoch still awaits feedback: its own length
        sampler.feedback(Feedback(batch, batch[:0], losses=torch.rand(batch.numel())))
    assert len(sampler) == 5 == len(list(sampler))  # the next epoch's plan, not the last one's


def _epochs_with_feedback(sampler, epochs):
    for _ in range(epochs):
        for batch in sampler:
            indices = torch.tensor(batch)
            sampler.feedback(Feedback(indices, indices[:0], losses=torch.rand(indices.numel())))


@pytest.mark.parametrize("rule", [InfoBatch, StaleSelectiveBackprop])
def test_a_plan_that_anneals_says_once_when_it_lacks_the_run_s_length(rule):
    sampler = AdaptiveBatchSampler(40, policy=rule(), batch_size=10)
    _epochs_with_feedback(sampler, 1)  # the first epoch has no scores: nothing to say yet
    with pytest.warns(AdaptiveBatchWarning, match=r"num_epochs=None\) never anneals") as seen:
        _epochs_with_feedback(sampler, 3)
    assert len(seen) == 1


@pytest.mark.parametrize("rule", [InfoBatch, StaleSelectiveBackprop])
def test_a_run_past_the_plan_s_num_epochs_is_said_once_and_len_alone_says_nothing(rule):
    sampler = AdaptiveBatchSampler(40, policy=rule(num_epochs=2), batch_size=10)
    _epochs_with_feedback(sampler, 2)
    assert len(sampler) == 4  # looking at epoch 2's plan is not training it
    with pytest.warns(AdaptiveBatchWarning, match="epoch 2 lies past") as seen:
        _epochs_with_feedback(sampler, 2)
    assert len(seen) == 1


def test_infobatch_average_score_follows_a_hand_computed_average_and_resumes():
    rule = InfoBatch(num_epochs=10, score="average", score_decay=0.5)
    counts = torch.tensor
    first = ScoreTable(
        torch.tensor([1.0, 2.0, 3.0, math.nan]),
        counts([1, 1, 1, 0], dtype=torch.int32),
        counts([0, 0, 0, 0], dtype=torch.int32),
    )
    rule.plan(1, first, torch.Generator().manual_seed(0))
    restored = InfoBatch(num_epochs=10, score="average", score_decay=0.5)
    restored.load_state_dict(copy.deepcopy(rule.state_dict()))
    # index 1 was not scored again; index 3 is scored for the first time
    second = ScoreTable(
        torch.tensor([3.0, 9.0, 1.0, 5.0]),
        counts([2, 1, 2, 1], dtype=torch.int32),
        counts([0, 0, 0, 0], dtype=torch.int32),
    )
    for r in (rule, restored):
        plan = r.plan(2, second, torch.Generator().manual_seed(0))
        assert r._scores(second).tolist() == [2.0, 2.0, 2.0, 5.0]  # 0.5 * old + 0.5 * new
        assert plan.stats["mean"] == pytest.approx(11 / 4)


def test_the_small_loss_plan_scores_a_share_of_the_dropped_again_at_weight_zero():
    losses = torch.cat([torch.full((80,), 0.1), torch.full((20,), 5.0)])  # 20 clear outliers
    generator = torch.Generator().manual_seed(0)
    plan = SmallLossPlan(fraction=0.2, warmup_epochs=0, rescore=0.25).plan(
        1, table(losses), generator
    )
    again = plan.drawn & (plan.weights == 0)
    assert int(again.sum()) == 5 and bool((losses[again] == 5.0).all())  # a quarter of the 20
    assert int((~plan.drawn).sum()) == 15 and bool((plan.weights[plan.drawn & ~again] == 1).all())
    assert plan.stats["dropped"] == 15 and plan.stats["rescored"] == 5
    never = SmallLossPlan(fraction=0.2, warmup_epochs=0, rescore=0.0).plan(
        1, table(losses), generator
    )
    assert never.weights is None and int((~never.drawn).sum()) == 20


@given(
    eighths=st.lists(st.integers(0, 80), min_size=2, max_size=40),
    labels=st.lists(st.integers(0, 3), min_size=40, max_size=40),
    seed=st.integers(0, 2**16),
)
def test_class_balanced_infobatch_prunes_each_class_against_its_own_mean(eighths, labels, seed):
    losses = [k / 8 for k in eighths]  # exact in float32: the comparisons cannot round apart
    losses_t = torch.tensor(losses)
    classes = torch.tensor(labels[: len(losses)])
    plan = InfoBatch(prune_ratio=0.5, num_epochs=10, classes=classes).plan(
        0, ScoreTable.of_losses(losses_t), torch.Generator().manual_seed(seed)
    )
    pruned = (~plan.drawn).nonzero().flatten().tolist()
    for label in set(classes.tolist()):  # the slow reference: one class at a time, by hand
        members = [i for i in range(len(losses)) if classes[i] == label]
        mean = sum(losses[i] for i in members) / len(members)
        below = {i for i in members if losses[i] < mean}
        ours = {i for i in pruned if classes[i] == label}
        assert ours <= below and len(ours) == int(0.5 * len(below))
        for i in members:  # the class's well-learned weigh 2 (the pruned are not drawn)
            assert plan.weights[i] == (2.0 if i in below else 1.0)


def test_class_balanced_infobatch_keeps_a_hard_class_the_global_mean_would_prune_from():
    # class 0 is easy (losses 0.1-0.5), class 1 hard (3-7): one mean prunes class 0 only
    losses = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 3.0, 4.0, 5.0, 6.0, 7.0])
    classes = torch.tensor([0] * 5 + [1] * 5)
    table = ScoreTable.of_losses(losses)
    plain = InfoBatch(num_epochs=10).plan(0, table, torch.Generator().manual_seed(0))
    balanced = InfoBatch(num_epochs=10, classes=classes).plan(
        0, table, torch.Generator().manual_seed(0)
    )
    assert plain.drawn[5:].all() and int((~plain.drawn[:5]).sum()) == 2
    assert int((~balanced.drawn[:5]).sum()) == 1 and int((~balanced.drawn[5:]).sum()) == 1
    with pytest.raises(AdaptiveBatchError, match="index set"):
        InfoBatch(num_epochs=10, classes=classes[:4]).plan(0, table, torch.Generator())
