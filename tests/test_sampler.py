"""AdaptiveBatchSampler: coverage, caps, the index set, feedback, len and exact resume."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from adaptive_batch import AdaptiveBatchError, AdaptiveBatchSampler, Feedback, fold_tail

from .scripted import ScriptedSizes, keep_all


def run(sampler: AdaptiveBatchSampler, num_batches: int) -> list[list[int]]:
    """Draw ``num_batches`` batches across epochs, feeding back after each one."""
    batches: list[list[int]] = []
    empty_passes = 0
    while len(batches) < num_batches:
        before = len(batches)
        for batch in sampler:
            batches.append(batch)
            sampler.feedback(keep_all(batch))
            if len(batches) == num_batches:
                break
        # A state saved after an epoch's last batch resumes with one empty pass.
        empty_passes = empty_passes + 1 if len(batches) == before else 0
        assert empty_passes < 2, "two passes in a row yielded no batch"
    return batches


sizes_strategy = st.lists(
    st.one_of(st.integers(-5, 120), st.sampled_from([math.nan, math.inf, -math.inf, 0.4])),
    min_size=1,
    max_size=12,
)


@st.composite
def sampler_config(draw):
    num_samples = draw(st.integers(1, 150))
    min_size = draw(st.integers(1, 20))
    max_size = draw(st.integers(min_size, 60))
    subset = draw(st.one_of(st.none(), st.sets(st.integers(0, num_samples - 1), min_size=1)))
    return {
        "data_source": num_samples,
        "min_batch_size": min_size,
        "max_batch_size": max_size,
        "batch_size": draw(st.integers(min_size, max_size)),
        "indices": None if subset is None else sorted(subset),
        "seed": draw(st.integers(0, 1000)),
        "shuffle": draw(st.booleans()),
    }


@given(config=sampler_config(), sizes=sizes_strategy)
def test_every_epoch_covers_the_index_set_exactly_within_caps(config, sizes):
    sampler = AdaptiveBatchSampler(**config, policy=ScriptedSizes(sizes))
    index_set = config["indices"] or list(range(config["data_source"]))
    lo, hi = config["min_batch_size"], config["max_batch_size"]
    for epoch in range(2):
        batches = []
        for batch in sampler:
            batches.append(batch)
            sampler.feedback(keep_all(batch))
        assert sorted(i for b in batches for i in b) == sorted(index_set), f"epoch {epoch}"
        assert all(lo <= len(b) <= hi for b in batches[:-1])
        last = len(batches[-1])
        assert last <= hi
        assert last >= lo or len(index_set) < lo or hi < 2 * lo - 1
        assert sampler.epoch == epoch


@given(config=sampler_config(), sizes=sizes_strategy, drop_last=st.booleans())
def test_nothing_outside_the_index_set_and_len_is_honest(config, sizes, drop_last):
    num_indices = len(config["indices"] or range(config["data_source"]))
    if drop_last and num_indices < config["min_batch_size"]:
        with pytest.raises(ValueError, match="never yield"):
            AdaptiveBatchSampler(**config, drop_last=drop_last)
        return
    fixed = AdaptiveBatchSampler(**config, drop_last=drop_last)
    batches = list(fixed)
    assert len(fixed) == len(batches)
    allowed = set(config["indices"] or range(config["data_source"]))
    assert all(i in allowed for b in batches for i in b)
    assert all(len(b) >= config["min_batch_size"] for b in batches) or not drop_last

    adaptive = AdaptiveBatchSampler(**config, policy=ScriptedSizes(sizes), drop_last=drop_last)
    if adaptive.is_adaptive:
        with pytest.raises(TypeError, match="no len"):
            len(adaptive)
    assert all(i in allowed for b in run(adaptive, 12) for i in b)


def test_sizes_follow_the_rule_clamped_to_the_caps():
    rule = ScriptedSizes([7, 100, 3, 20, math.nan, 12.6, 2.0, math.inf, -math.inf])
    sampler = AdaptiveBatchSampler(
        1000, policy=rule, batch_size=10, min_batch_size=5, max_batch_size=50
    )
    assert [len(b) for b in run(sampler, 10)] == [10, 7, 50, 5, 20, 20, 13, 5, 50, 5]
    assert sampler.requested_batch_size == 7.0  # the rule's 10th answer (its list wrapped)


def test_sizing_rules_see_progress():
    seen = []

    class Recorder(ScriptedSizes):
        def next_batch_size(self, batch_size, feedback, progress):
            seen.append((progress.updates, progress.samples, progress.completed_epochs))
            return batch_size

    sampler = AdaptiveBatchSampler(
        30, policy=Recorder([0]), batch_size=10, min_batch_size=5, indices=range(25)
    )
    run(sampler, 4)
    assert seen == [(1, 10, 0), (2, 20, 0), (3, 25, 1), (4, 35, 1)]  # epochs of 10, 10, 5


@given(stop=st.integers(1, 30), seed=st.integers(0, 100))
def test_state_dict_mid_run_continues_with_the_same_batches(stop, seed):
    def make() -> AdaptiveBatchSampler:
        rule = ScriptedSizes([3, 9, 4, 12, 6])
        return AdaptiveBatchSampler(
            57, policy=rule, batch_size=5, min_batch_size=2, max_batch_size=12, seed=seed
        )

    uninterrupted = run(make(), 30)
    first = make()
    head = run(first, stop)
    restored = make()
    restored.load_state_dict(first.state_dict())
    tail = run(restored, 30 - stop)
    assert head + tail == uninterrupted
    assert torch.equal(restored.times_kept, run_counts(uninterrupted, 57))


def run_counts(batches: list[list[int]], size: int) -> torch.Tensor:
    counts = torch.zeros(size, dtype=torch.int32)
    for batch in batches:
        counts[batch] += 1
    return counts


def test_epochs_are_seeded_and_advance():
    a, b = (
        AdaptiveBatchSampler(40, batch_size=10, seed=1),
        AdaptiveBatchSampler(40, batch_size=10, seed=1),
    )
    assert list(a) == list(b)  # same seed, same epoch
    epoch0 = list(AdaptiveBatchSampler(40, batch_size=10, seed=1))
    assert list(a) != epoch0 and a.epoch == 1  # a finished pass moves on
    a.set_epoch(0)
    assert list(a) == epoch0
    assert list(AdaptiveBatchSampler(40, batch_size=10, seed=2)) != epoch0
    plain = AdaptiveBatchSampler(
        10, batch_size=4, min_batch_size=1, shuffle=False, indices=[9, 3, 5, 1]
    )
    assert list(plain) == [[9, 3, 5, 1]]


def test_an_abandoned_pass_restarts_its_epoch():
    sampler = AdaptiveBatchSampler(50, batch_size=10)
    first = next(iter(sampler))
    assert next(iter(sampler)) == first and sampler.epoch == 0


def test_stopping_right_after_the_last_batch_still_finishes_the_epoch():
    def epoch_batches(epoch: int) -> list[list[int]]:
        fresh = AdaptiveBatchSampler(20, batch_size=10)
        fresh.set_epoch(epoch)
        return list(fresh)

    sampler = AdaptiveBatchSampler(20, batch_size=10)
    it = iter(sampler)
    next(it), next(it)  # the consumer never asks for a third batch
    restored = AdaptiveBatchSampler(20, batch_size=10)
    restored.load_state_dict(sampler.state_dict())
    assert list(restored) == []  # the resumed pass has nothing left...
    assert list(restored) == epoch_batches(1)  # ...and the next pass is epoch 1
    assert list(sampler) == epoch_batches(1)
    sampler.set_epoch(1)  # replaying a finished epoch restarts it
    assert list(sampler) == epoch_batches(1)


def test_set_epoch_after_loading_keeps_the_position():
    sampler = AdaptiveBatchSampler(50, batch_size=10)
    sampler.set_epoch(3)
    it = iter(sampler)
    next(it)
    second = next(it)
    restored = AdaptiveBatchSampler(50, batch_size=10)
    restored.load_state_dict(sampler.state_dict())
    restored.set_epoch(3)  # what a resumed training loop does
    assert next(iter(restored)) != second  # position was 2 batches in: third batch next
    again = AdaptiveBatchSampler(50, batch_size=10)
    again.load_state_dict(sampler.state_dict())
    again.set_epoch(4)
    assert again.epoch == 4 and len(list(again)) == 5


def test_drop_last_drops_only_an_unavoidably_short_tail():
    sampler = AdaptiveBatchSampler(
        23, batch_size=5, min_batch_size=5, max_batch_size=5, drop_last=True
    )
    assert [len(b) for b in sampler] == [5, 5, 5, 5] and len(sampler) == 4
    assert sampler.num_dropped_tails == 1
    folded = AdaptiveBatchSampler(
        23, batch_size=5, min_batch_size=4, max_batch_size=10, drop_last=True
    )
    assert [len(b) for b in folded] == [5, 5, 5, 8]


def test_fold_tail_examples():
    assert fold_tail(100, 105, 10, 1000) == 105
    assert fold_tail(1000, 1005, 10, 1000) == 995
    assert fold_tail(5, 7, 5, 5) == 5  # caps leave no choice: a short batch of 2 follows
    assert fold_tail(50, 30, 10, 100) == 30


def test_feedback_must_name_indices_awaiting_it():
    sampler = AdaptiveBatchSampler(30, batch_size=10, shuffle=False)
    it = iter(sampler)
    batch = next(it)
    with pytest.raises(AdaptiveBatchError, match="never handed them out"):
        sampler.feedback(keep_all([25, 26, 27, 28, 29, 20, 21, 22, 23, 24]))  # not yielded yet
    with pytest.raises(AdaptiveBatchError, match=r"not positions in the batch|outside"):
        sampler.feedback(keep_all([-1, 0]))
    with pytest.raises(AdaptiveBatchError, match="twice"):
        sampler.feedback(Feedback(kept=torch.tensor([0, 1]), dropped=torch.tensor([1])))
    sampler.feedback(Feedback(kept=torch.tensor(batch[:4]), dropped=torch.tensor(batch[4:])))
    assert sampler.times_kept[:10].tolist() == [1] * 4 + [0] * 6
    assert sampler.times_dropped[:10].tolist() == [0] * 4 + [1] * 6
    with pytest.raises(AdaptiveBatchError, match="already given"):
        sampler.feedback(keep_all(batch))  # twice


def test_any_number_of_batches_may_await_feedback():
    # A loader may prefetch as far as it likes: nothing is evicted, no bound is reached.
    sampler = AdaptiveBatchSampler(3000, batch_size=10, min_batch_size=1, shuffle=False)
    batches = list(sampler)  # 300 batches in flight
    for batch in reversed(batches):
        sampler.feedback(keep_all(batch))
    assert sampler.num_feedback == 300 and int(sampler.times_kept.sum()) == 3000
    with pytest.warns(DeprecationWarning, match="max_in_flight"):
        AdaptiveBatchSampler(30, max_in_flight=2, batch_size=10)


def test_bad_arguments_are_refused():
    cases = [
        ({"data_source": 0}, "empty"),
        ({"min_batch_size": 0}, "min_batch_size"),
        ({"min_batch_size": 20, "max_batch_size": 10}, "min_batch_size"),
        ({"batch_size": 5000}, "outside"),
        ({"indices": [1, 200]}, r"\[0, 100\)"),
        ({"indices": [1, 1]}, "duplicates"),
        ({"indices": []}, "empty"),
    ]
    for kwargs, message in cases:
        config = {"data_source": 100, **kwargs}
        with pytest.raises(ValueError, match=message):
            AdaptiveBatchSampler(**config)
    with pytest.raises(TypeError, match="integers"):
        AdaptiveBatchSampler(100, indices=[0.5, 1.0])
    with pytest.raises(TypeError, match="Policy"):
        AdaptiveBatchSampler(100, policy="edba")
    with pytest.raises(ValueError, match="non-negative"):
        AdaptiveBatchSampler(100).set_epoch(-1)


def test_state_from_another_configuration_is_refused():
    state = AdaptiveBatchSampler(100, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        AdaptiveBatchSampler(100, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="dataset_size"):
        AdaptiveBatchSampler(101, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="indices_digest"):
        AdaptiveBatchSampler(100, seed=1, indices=range(1, 100)).load_state_dict(state)
    with pytest.raises(ValueError, match="version"):
        AdaptiveBatchSampler(100, seed=1).load_state_dict({**state, "version": 0})


def test_dataloader_len_follows_the_sampler():
    fixed = DataLoader(
        range(25), batch_sampler=AdaptiveBatchSampler(25, batch_size=10, min_batch_size=5)
    )
    assert len(fixed) == 3 == len(list(fixed))  # 10, 10, 5
    adaptive = DataLoader(
        range(25), batch_sampler=AdaptiveBatchSampler(25, policy=ScriptedSizes([10]))
    )
    with pytest.raises(TypeError):
        len(adaptive)
