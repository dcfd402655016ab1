"""The failures found in ordinary use, one test (or more) per failure class; each failed before
its fix. Resume at epoch ends (class 2) is in test_resume.py, DDP (class 6) in
test_distributed.py, the property tests behind classes 1, 4 and 5 in test_coverage.py."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from adaptive_batch import (
    AdaptiveBatchError,
    AdaptiveBatchSampler,
    AdaptiveBatchWarning,
    BatchSizeLR,
    Feedback,
    HeadProbe,
    IndexedDataset,
    SubsetFilter,
)
from adaptive_batch.app.bench.common import peak_memory_bytes
from adaptive_batch.policies import CABS, EDBA, AdaDamp, Policy, SelectiveBackprop
from adaptive_batch.probe import PerSampleGradients

from .reference import per_sample_head_grads
from .scripted import ScriptedSizes, keep_all, zero_probe
from .synthetic import blobs


class Doubling:
    """A sizing rule that doubles the batch at every feedback (to the cap)."""

    def next_batch_size(self, batch_size, feedback, progress):
        return 2 * batch_size

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def mlp(inputs: int = 8, classes: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(inputs, 16), nn.ReLU(), nn.Linear(16, classes))


def indexed_loader(data, sampler, **kwargs) -> DataLoader:
    return DataLoader(IndexedDataset(data), batch_sampler=sampler, **kwargs)


# -- 1. chunk mode and deep prefetching: no in-flight bound to overflow -----------------------


def test_1_a_policy_growing_to_the_cap_of_1000_with_chunks_of_8_trains_three_epochs():
    data = blobs(3000)
    sampler = AdaptiveBatchSampler(data, policy=Doubling(), batch_size=96, chunk_size=8)
    batches = SubsetFilter(indexed_loader(data, sampler), zero_probe, sampler=sampler)
    for epoch in range(3):
        sizes = [len(y) for _, y in batches]
        assert sum(sizes) == 3000, epoch
        assert max(sizes) == 1000  # the cap: 125 chunks in one batch
    assert int((sampler.times_kept == 3).sum()) == 3000


def test_1_a_loader_prefetching_more_than_64_batches_is_fine():
    data = blobs(2000)
    sampler = AdaptiveBatchSampler(data, policy=Doubling(), batch_size=10, max_batch_size=12)
    loader = indexed_loader(data, sampler, num_workers=2, prefetch_factor=34)
    assert sum(len(y) for _, y in SubsetFilter(loader, zero_probe, sampler=sampler)) == 2000


def test_1_feedback_errors_say_what_is_wrong_not_blame_the_dataset():
    sampler = AdaptiveBatchSampler(50, batch_size=10, shuffle=False)
    batch = next(iter(sampler))
    sampler.feedback(keep_all(batch))
    with pytest.raises(AdaptiveBatchError, match="already given") as error:
        sampler.feedback(keep_all(batch))
    assert "IndexedDataset" not in str(error.value)


# -- 3. a lazily started source --------------------------------------------------------------


@pytest.mark.parametrize("wrapper", ["generator", "tqdm"])
@pytest.mark.parametrize("chunk_size", [None, 8])
def test_3_a_wrapped_lazily_started_source_trains_every_epoch(wrapper, chunk_size):
    data = blobs(75)
    policy = Policy(selection=SelectiveBackprop(keep=0.5), sizing=ScriptedSizes([16, 24]))
    sampler = AdaptiveBatchSampler(
        data, policy=policy, batch_size=16, min_batch_size=8, chunk_size=chunk_size
    )
    loader = indexed_loader(data, sampler)

    class Wrapped:
        def __iter__(self):
            yield from loader  # iter(loader) happens only at the first next()

    source = Wrapped() if wrapper == "generator" else tqdm(loader, disable=True)
    batches = SubsetFilter(source, mlp(), sampler=sampler)
    candidates = []
    for _ in range(3):
        before = batches.num_candidates
        trained = sum(len(y) for _, y in batches)
        candidates.append(batches.num_candidates - before)
        assert trained >= 1
    assert candidates == [75, 75, 75]


# -- 4. the end of an epoch in chunk mode ---------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "batch", "caps", "chunk", "expected"),
    [(17, 8, (2, 1000), 8, [8, 9]), (22, 15, (11, 30), 15, [22])],
)
def test_4_chunks_fold_the_last_batch_within_the_caps(size, batch, caps, chunk, expected):
    data = blobs(size)
    sampler = AdaptiveBatchSampler(
        data, batch_size=batch, min_batch_size=caps[0], max_batch_size=caps[1], chunk_size=chunk
    )
    batches = SubsetFilter(indexed_loader(data, sampler), zero_probe, sampler=sampler)
    assert [len(y) for _, y in batches] == expected


# -- 5. a second iterator over the same loader ----------------------------------------------------


def test_5_peeking_with_a_second_iterator_leaves_the_running_epoch_alone():
    data = blobs(200)
    sampler = AdaptiveBatchSampler(data, batch_size=20, min_batch_size=5)
    loader = indexed_loader(data, sampler)
    seen = []
    for step, batch in enumerate(loader):
        seen += batch.index.tolist()
        if step == 3:
            next(iter(loader))  # a peek: its own pass
    assert len(seen) == 200 and len(set(seen)) == 200
    assert sampler.epoch == 0
    assert len({i for b in loader for i in b.index.tolist()}) == 200 and sampler.epoch == 1


def test_5_two_filters_over_one_loader_each_get_their_own_pass():
    data = blobs(120)
    sampler = AdaptiveBatchSampler(data, policy=EDBA(), batch_size=20, min_batch_size=5)
    loader = indexed_loader(data, sampler)
    first = SubsetFilter(loader, mlp(), sampler=sampler)
    second = SubsetFilter(loader, mlp(), sampler=sampler)
    a, b = iter(first), iter(second)
    next(a), next(b)
    list(a), list(b)
    assert first.num_candidates == 120 and second.num_candidates == 120
    assert (sampler.times_kept + sampler.times_dropped).tolist() == [2] * 120


# -- 7. learning-rate coupling that freezes, and a NaN learning rate -----------------------------


def test_7_adadamp_with_damping_never_drives_the_learning_rate_to_zero():
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rule = AdaDamp(min_loss=0.5, wait=0, dwell=1)
    sampler = AdaptiveBatchSampler(10_000, policy=rule, batch_size=100, max_batch_size=400)
    scheduler = BatchSizeLR(optimizer, sampler, "damp")
    for loss in [2.0, 1.0, 0.6, 0.4, 0.3, 0.45, 0.2]:  # dips below min_loss and stays there
        batch = torch.tensor(next(iter(sampler)))
        sampler.feedback(Feedback(batch, batch[:0], stats={"loss": loss}))
        optimizer.step()
        scheduler.step()
        lr = optimizer.param_groups[0]["lr"]
        assert 0 < lr <= 0.1 and math.isfinite(sampler.requested_batch_size)


def test_7_cabs_with_a_nan_learning_rate_leaves_the_size_unchanged():
    rates = [0.5]
    sampler = AdaptiveBatchSampler(
        1000, policy=CABS(lr=lambda: rates[0]), batch_size=16, min_batch_size=16, max_batch_size=256
    )
    stats = {"loss": 1.0, "grad_variance": 2000.0}
    for step in range(4):
        if step == 2:
            rates[0] = math.nan  # a scheduler gone wrong
        size = sampler.batch_size
        batch = torch.tensor(next(iter(sampler)))
        sampler.feedback(Feedback(batch, batch[:0], stats=stats))
        if step >= 2:
            assert sampler.batch_size == size
    assert sampler.batch_size > 16  # it did grow before the NaN


# -- 8. the size the sampler reports is the size it draws ---------------------------------------


def test_8_the_reported_size_and_the_lr_coupling_follow_what_is_drawn():
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sampler = AdaptiveBatchSampler(
        1000, policy=ScriptedSizes([270]), indices=range(100), batch_size=100, min_batch_size=10
    )
    scheduler = BatchSizeLR(optimizer, sampler, "linear")
    for _ in range(2):
        for batch in sampler:
            assert len(batch) == 100
            sampler.feedback(keep_all(batch))
            optimizer.step()
            scheduler.step()
    assert sampler.batch_size == 100
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)


# -- 9. the torch.func path: its memory bound, and every RNG left alone -----------------------------


@pytest.mark.parametrize(("batch", "budget_fraction"), [(64, 0.4), (48, 3.0)])
def test_9_the_func_path_stays_within_its_memory_bound(batch, budget_fraction):
    head = nn.Linear(256, 40)
    features, targets = torch.randn(batch, 256), torch.randint(0, 40, (batch,))
    params = 256 * 40 + 40
    budget = int(budget_fraction * batch * params)
    probe = PerSampleGradients(
        head, lambda o, y: F.cross_entropy(o, y, reduction="none"), max_grad_numel=budget
    )
    peak = peak_memory_bytes(lambda: probe.gram(features, targets), torch.device("cpu"))
    assert peak <= 1.1 * budget * 4, peak / (budget * 4)
    if budget_fraction < 1:
        assert len(probe.chunk_slices(batch, 1)) > 1  # it did have to work in chunks


@pytest.mark.parametrize("method", ["gram", "func"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_9_the_probe_leaves_every_rng_as_it_was(method, mode):
    import random

    import numpy

    model = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.5), nn.ReLU(), nn.Linear(16, 4))
    inputs, targets = torch.randn(12, 6), torch.randint(0, 4, (12,))
    before = (torch.get_rng_state(), random.getstate(), numpy.random.get_state()[1].copy())
    HeadProbe(model, method=method, mode=mode, max_grad_numel=200)(inputs, targets)
    after = (torch.get_rng_state(), random.getstate(), numpy.random.get_state()[1].copy())
    assert torch.equal(before[0], after[0]) and before[1] == after[1]
    assert (before[2] == after[2]).all()


# -- 10. silent misuse becomes a clear error or a warning --------------------------------------------


def test_10_a_filter_whose_sizing_rule_would_never_run_warns():
    with pytest.warns(AdaptiveBatchWarning, match="sampler="):
        SubsetFilter(None, mlp(), policy=EDBA())
    data = blobs(40)
    sampler = AdaptiveBatchSampler(data, policy=EDBA().sizing, batch_size=10, min_batch_size=5)
    with pytest.warns(AdaptiveBatchWarning, match="loader.batch_sampler"):
        SubsetFilter(indexed_loader(data, sampler), mlp())


def test_10_an_epoch_without_feedback_warns():
    sampler = AdaptiveBatchSampler(50, policy=EDBA(), batch_size=10, min_batch_size=5)
    list(sampler)
    with pytest.warns(AdaptiveBatchWarning, match="no feedback during epoch 0"):
        next(iter(sampler))


def test_10_regression_targets_with_the_cross_entropy_probe_say_what_to_use():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    x = torch.randn(6, 4)
    with pytest.raises(AdaptiveBatchError, match="loss='mse'"):
        HeadProbe(model)(x, torch.randn(6, 1))
    with pytest.raises(AdaptiveBatchError, match="loss='mse'"):
        HeadProbe(mlp(4, 3))(x, torch.randn(6))  # float targets, class logits
    result = HeadProbe(model, loss="mse")(x, torch.randn(6, 1))
    assert result.gram.shape == (6, 6) and bool((result.losses > 0).all())


def test_10_a_sampler_passed_as_sampler_instead_of_batch_sampler_is_named():
    data = blobs(30)
    sampler = AdaptiveBatchSampler(data, batch_size=10, min_batch_size=5)
    loader = DataLoader(IndexedDataset(data), sampler=sampler)
    with pytest.raises(AdaptiveBatchError, match="batch_sampler=sampler"):
        next(iter(loader))


def test_10_ignored_targets_carry_no_gradient():
    model = mlp(4, 3).eval()
    x, y = torch.randn(8, 4), torch.tensor([0, 1, -100, 2, 1, -100, 0, 2])
    result = HeadProbe(model)(x, y)
    kept = y != -100
    grads, losses = per_sample_head_grads(model, model[-1], x[kept], y[kept])
    torch.testing.assert_close(result.gram[kept][:, kept], grads @ grads.T, atol=1e-5, rtol=1e-4)
    assert result.gram[~kept].abs().max() == 0 and result.losses[~kept].abs().max() == 0
    torch.testing.assert_close(result.losses[kept], losses)


def test_10_filter_state_from_another_rule_is_refused_by_name():
    first = SubsetFilter(None, mlp(), policy=SelectiveBackprop())
    second = SubsetFilter(None, mlp(), policy=EDBA().selection)
    with pytest.raises(AdaptiveBatchError, match="SelectiveBackprop"):
        second.load_state_dict(first.state_dict())


def test_10_indices_given_as_a_set_are_refused():
    with pytest.raises(AdaptiveBatchError, match="sorted"):
        AdaptiveBatchSampler(10, indices={1, 2, 3})


def test_10_an_epoch_of_nonfinite_losses_warns_once():
    x = torch.randn(40, 8)
    x[:, 0] = math.inf
    data = TensorDataset(x, torch.randint(0, 3, (40,)))
    batches = SubsetFilter(DataLoader(data, batch_size=10), mlp(), policy=EDBA().selection)
    with pytest.warns(AdaptiveBatchWarning, match="NaN or infinite"):
        list(batches)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list(batches)  # said once


def test_10_a_model_whose_output_stops_being_its_heads_is_caught():
    class Sometimes(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            out = self.fc(x)
            return out if self.calls == 1 else out * 2

    probe = HeadProbe(Sometimes())
    probe(torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))
    with pytest.raises(AdaptiveBatchError, match="not the output of its head"):
        probe(torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))
