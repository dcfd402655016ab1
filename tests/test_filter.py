"""SubsetFilter: batch structure kept, feedback names the right dataset indices, errors are clear."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from adaptive_batch import (
    AdaptiveBatchSampler,
    AdaptiveBatchWarning,
    IndexedDataset,
    Reason,
    Selection,
    SubsetFilter,
)
from adaptive_batch.load import take
from adaptive_batch.policies import EDBA, KeepAll, Policy
from adaptive_batch.policies.base import Stateless

Pair = namedtuple("Pair", ["x", "y"])


class EveryOther(Stateless):
    """Keeps even positions: a selection whose result is known in advance."""

    def select(self, result):
        return Selection(torch.arange(0, result.batch_size, 2), result.batch_size, Reason.SELECTED)


class Records(Dataset):
    """Sample i has features whose first entry is i, label i % 3, a name and a constant."""

    def __init__(self, size: int, layout: str) -> None:
        self.size, self.layout = size, layout

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int):
        x = torch.tensor([float(i), 1.0, -1.0, 0.5])
        y = i % 3
        if self.layout == "tuple":
            return x, y, f"s{i}"
        if self.layout == "list":
            return [x, y, f"s{i}"]
        if self.layout == "dict":
            return {"image": x, "label": y, "name": f"s{i}", "scale": 2.0}
        return Pair(x, y)


def model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


FIELDS = {"tuple": (0, 1), "list": (0, 1), "dict": ("image", "label"), "namedtuple": (0, 1)}


@pytest.mark.parametrize("layout", sorted(FIELDS))
def test_structure_is_kept_and_feedback_names_the_kept_samples(layout):
    dataset = Records(20, layout)
    sampler = AdaptiveBatchSampler(
        dataset, batch_size=6, min_batch_size=2, policy=Policy(selection=EveryOther())
    )
    loader = DataLoader(IndexedDataset(dataset), batch_sampler=sampler)
    inputs, targets = FIELDS[layout]
    filt = SubsetFilter(loader, model(), sampler=sampler, inputs=inputs, targets=targets)
    seen = []
    for batch in filt:
        x = batch[inputs]
        assert type(batch).__name__ == {"tuple": "list", "list": "list", "dict": "dict"}.get(
            layout, "Pair"
        )
        ids = x[:, 0].long().tolist()
        assert filt.last_feedback.kept.tolist() == ids  # feedback names exactly what was yielded
        assert batch[targets].tolist() == [i % 3 for i in ids]
        if layout in ("tuple", "list"):
            assert list(batch[2]) == [f"s{i}" for i in ids]
        if layout == "dict":
            assert list(batch["name"]) == [f"s{i}" for i in ids] and batch["scale"].tolist() == [
                2.0
            ] * len(ids)
        seen += ids + filt.last_feedback.dropped.tolist()
    assert sorted(seen) == list(range(20))
    assert sampler.times_kept.sum() + sampler.times_dropped.sum() == 20
    assert filt.reasons == {Reason.SELECTED: filt.num_batches}


def test_without_sampler_or_indices_it_just_filters():
    x, y = torch.randn(9, 4), torch.randint(0, 3, (9,))
    filt = SubsetFilter([(x, y)], model(), policy=EveryOther())
    ((kept_x, kept_y),) = list(filt)
    assert torch.equal(kept_x, x[::2]) and torch.equal(kept_y, y[::2])
    assert filt.last_feedback.kept.tolist() == [0, 2, 4, 6, 8]  # positions, with no indices


def test_sampler_without_indexed_dataset_is_a_clear_error():
    dataset = Records(10, "tuple")
    sampler = AdaptiveBatchSampler(dataset, batch_size=5, min_batch_size=1)
    filt = SubsetFilter(DataLoader(dataset, batch_sampler=sampler), model(), sampler=sampler)
    with pytest.raises(ValueError, match="IndexedDataset"):
        next(iter(filt))


def test_policy_comes_from_the_sampler_and_sizing_only_keeps_all():
    sampler = AdaptiveBatchSampler(10, policy=EDBA())
    assert isinstance(
        SubsetFilter(None, model(), sampler=sampler).rule, type(sampler.policy.selection)
    )
    with pytest.warns(AdaptiveBatchWarning, match="never run"):  # no sampler takes its feedback
        assert isinstance(SubsetFilter(None, model(), policy=EDBA().sizing).rule, KeepAll)
    assert isinstance(SubsetFilter(None, model()).rule, KeepAll)


def test_missing_fields_and_bad_arguments():
    filt = SubsetFilter(None, model(), inputs="image")
    with pytest.raises(KeyError, match=r"inputs=\.\.\. and targets="):
        filt.filter_batch((torch.randn(2, 4), torch.tensor([0, 1])))
    with pytest.raises(TypeError, match="probe"):
        SubsetFilter(None, probe=3)
    with pytest.raises(TypeError, match="AdaptiveBatchSampler"):
        SubsetFilter(None, model(), sampler=object())
    with pytest.raises(TypeError, match="filter_batch"):
        iter(SubsetFilter(None, model())).__next__()


def test_a_rule_answering_for_another_batch_size_is_refused():
    class Wrong(Stateless):
        def select(self, result):
            return Selection.keep_all(result.batch_size + 1, Reason.KEEP_ALL)

    filt = SubsetFilter(None, model(), policy=Wrong())
    with pytest.raises(ValueError, match="selected from 4 samples; the batch has 3"):
        filt.filter_batch((torch.randn(3, 4), torch.tensor([0, 1, 2])))


def test_statistics_in_feedback_match_the_probe():
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    net = model()
    filt = SubsetFilter(None, net, policy=EveryOther())
    filt.filter_batch((x, y))
    result = filt.probe(x, y)
    stats = filt.last_feedback.stats
    assert stats["loss"] == pytest.approx(result.losses.mean().item())
    assert stats["grad_sq_norm"] == pytest.approx(result.mean_grad_sq_norm().item())
    assert stats["grad_variance"] == pytest.approx(result.grad_variance().item())
    kept = torch.zeros(1, 8)
    kept[0, ::2] = 1
    assert stats["kept_grad_sq_norm"] == pytest.approx(
        result.subset_mean_grad_sq_norms(kept).item()
    )


def test_state_round_trip():
    batches = [(torch.randn(12, 4), torch.randint(0, 3, (12,))) for _ in range(6)]
    net = model()
    first = SubsetFilter(None, net, policy=EDBA(seed=5).selection)
    for batch in batches[:3]:
        first.filter_batch(batch)
    second = SubsetFilter(None, net, policy=EDBA(seed=0).selection)
    second.load_state_dict(first.state_dict())
    for x, y in batches[3:]:
        a, b = first.filter_batch((x, y)), second.filter_batch((x, y))
        assert torch.equal(a[0], b[0])
    assert first.state_dict()["reasons"] == second.state_dict()["reasons"]


def test_take_carries_what_is_not_per_sample():
    batch = {"x": torch.arange(8).view(4, 2), "w": torch.ones(3), "tag": "run", "ids": [1, 2, 3, 4]}
    kept = take(batch, torch.tensor([1, 3]), 4)
    assert kept["x"].tolist() == [[2, 3], [6, 7]]
    assert kept["w"].shape == (3,) and kept["tag"] == "run" and kept["ids"] == [2, 4]
    nested = take(
        (torch.arange(4), (torch.arange(4) * 2, ["a", "b", "c", "d"])), torch.tensor([0]), 4
    )
    assert nested[0].tolist() == [0] and nested[1][0].tolist() == [0] and nested[1][1] == ["a"]


def _infobatch_pipeline(stage_type):
    from torch.utils.data import TensorDataset

    from adaptive_batch import IndexedDataset
    from adaptive_batch.policies import InfoBatch

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 4), torch.randint(0, 3, (64,)))
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    sampler = AdaptiveBatchSampler(
        data, policy=InfoBatch(prune_ratio=0.5, num_epochs=4), batch_size=16
    )
    loader = DataLoader(IndexedDataset(data), batch_sampler=sampler)
    return data, model, sampler, stage_type(loader, model, sampler=sampler)


def test_the_weighted_loss_gives_the_kept_rows_their_plan_weights():
    data, model, sampler, batches = _infobatch_pipeline(SubsetFilter)
    criterion = batches.weighted(
        lambda out, y: nn.functional.cross_entropy(out, y, reduction="none")
    )
    for epoch in range(2):
        for x, y in batches:
            loss = criterion(model(x), y)
            # the reference: the rows' dataset indices looked up in the plan, one by one
            kept = batches.last_feedback.kept.tolist()
            plan = sampler.weights_of(torch.tensor(kept))
            weights = (
                [1.0] * len(kept) if plan is None else [float(plan[i]) for i in range(len(kept))]
            )
            per_sample = nn.functional.cross_entropy(model(x), y, reduction="none").detach()
            expected = sum(w * float(v) for w, v in zip(weights, per_sample, strict=True)) / len(
                kept
            )
            assert loss.item() == pytest.approx(expected, rel=1e-5)
            assert torch.equal(data.tensors[1][torch.tensor(kept)], y)  # rows in kept order
            if epoch == 1:
                assert plan is not None and set(plan.tolist()) <= {1.0, 2.0}
            loss.backward()


@pytest.mark.parametrize("stage", ["SubsetFilter", "StepFeedback"])
def test_plan_weights_that_never_reach_the_loss_are_said_once(stage):
    import adaptive_batch

    _data, model, _sampler, batches = _infobatch_pipeline(getattr(adaptive_batch, stage))
    with pytest.warns(AdaptiveBatchWarning, match=r"did not go through batches.weighted") as seen:
        for _ in range(3):
            for x, y in batches:
                nn.functional.cross_entropy(model(x), y).backward()
    assert len([w for w in seen if "batches.weighted" in str(w.message)]) == 1


@pytest.mark.parametrize("stage", ["SubsetFilter", "StepFeedback"])
def test_the_sampler_given_as_sampler_is_met_with_batch_sampler_advice(stage):
    from torch.utils.data import TensorDataset

    import adaptive_batch
    from adaptive_batch import IndexedDataset

    data = TensorDataset(torch.randn(40, 3), torch.randint(0, 2, (40,)))
    sampler = AdaptiveBatchSampler(data, batch_size=10)
    loader = DataLoader(IndexedDataset(data), sampler=sampler)  # the likeliest slip
    with pytest.raises(
        adaptive_batch.AdaptiveBatchError, match=r"pass it as batch_sampler= instead"
    ):
        getattr(adaptive_batch, stage)(loader, nn.Linear(3, 2), sampler=sampler)


def test_an_indexed_dataset_fetches_a_batch_at_once_through_the_dataset_s_own_getitems():
    class Batched(TensorDataset):
        calls = 0

        def __getitems__(self, indices):
            Batched.calls += 1
            return [self[i] for i in indices]

    for base in (TensorDataset, Batched):
        data = base(torch.arange(10.0), torch.arange(10) % 3)
        sampler = AdaptiveBatchSampler(data, batch_size=4, min_batch_size=2, seed=1)
        batches = list(DataLoader(IndexedDataset(data), batch_sampler=sampler))
        assert [b.index.tolist() for b in batches] == [b.sample[0].long().tolist() for b in batches]
        assert sorted(torch.cat([b.index for b in batches]).tolist()) == list(range(10))
    assert Batched.calls == len(batches)  # one call per batch, none per sample
