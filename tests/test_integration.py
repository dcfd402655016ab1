"""End to end: DataLoader workers and torchdata.nodes pipelines with sampler + filter + EDBA."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchdata.nodes import Loader, Mapper, SamplerWrapper

from adaptive_batch import AdaptiveBatchSampler, IndexedDataset, SubsetFilter, fetch_batch
from adaptive_batch.nodes import SubsetFilterNode
from adaptive_batch.policies import EDBA

from .synthetic import blobs


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))


def full_loss(model: nn.Module, data: TensorDataset) -> float:
    with torch.no_grad():
        return F.cross_entropy(model(data.tensors[0]), data.tensors[1]).item()


def test_dataloader_with_workers_trains_and_feedback_reaches_the_right_indices():
    data = blobs(240, spread=2.5)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_idx = torch.arange(0, 240, 2)  # only even indices may ever be used
    sampler = AdaptiveBatchSampler(
        data,
        policy=EDBA(seed=1),
        batch_size=24,
        min_batch_size=6,
        max_batch_size=96,
        indices=train_idx,
    )
    loader = DataLoader(
        IndexedDataset(data), batch_sampler=sampler, num_workers=2, prefetch_factor=2
    )
    filt = SubsetFilter(loader, model, sampler=sampler)
    before = full_loss(model, data)
    epochs = 3
    for _ in range(epochs):
        for x, y in filt:
            feedback = filt.last_feedback
            # The yielded rows are exactly the dataset rows the feedback names.
            assert torch.equal(x, data.tensors[0][feedback.kept])
            assert torch.equal(y, data.tensors[1][feedback.kept])
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert full_loss(model, data) < 0.5 * before
    seen = sampler.times_kept + sampler.times_dropped
    assert seen[train_idx].tolist() == [epochs] * 120  # every allowed index, once per epoch
    assert seen[1::2].sum() == 0  # nothing outside the index set
    assert sampler.num_feedback == filt.num_batches


def build_pipeline(data: IndexedDataset):
    torch.manual_seed(0)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sampler = AdaptiveBatchSampler(
        data,
        policy=EDBA(seed=2, factor=1.3),
        batch_size=12,
        min_batch_size=4,
        max_batch_size=40,
        seed=5,
    )
    batches = Mapper(SamplerWrapper(sampler), partial(fetch_batch, data))
    node = SubsetFilterNode(batches, model, sampler=sampler)
    return model, optimizer, Loader(node), node


def train_steps(model, optimizer, loader, node, iterator, steps, log):
    for _ in range(steps):
        try:
            x, y = next(iterator)
        except StopIteration:  # end of an epoch: the loader starts the next one
            iterator = iter(loader)
            x, y = next(iterator)
        feedback = node.filter.last_feedback
        log.append((feedback.kept.tolist(), feedback.batch_size))
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return iterator


TOTAL_STEPS = 40


@pytest.fixture(scope="module")
def uninterrupted_run():
    data = IndexedDataset(blobs(90, spread=2.5))
    model, optimizer, loader, node = build_pipeline(data)
    log: list = []
    train_steps(model, optimizer, loader, node, iter(loader), TOTAL_STEPS, log)
    return data, log


@settings(max_examples=12)
@given(stop=st.integers(1, TOTAL_STEPS - 1))
def test_nodes_pipeline_resumes_exactly_from_state_dict(uninterrupted_run, stop):
    data, expected = uninterrupted_run
    model, optimizer, loader, node = build_pipeline(data)
    log: list = []
    train_steps(model, optimizer, loader, node, iter(loader), stop, log)
    checkpoint = copy.deepcopy(
        {
            "loader": loader.state_dict(),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
        }
    )

    model, optimizer, loader, node = build_pipeline(data)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    loader.load_state_dict(checkpoint["loader"])
    train_steps(model, optimizer, loader, node, iter(loader), TOTAL_STEPS - stop, log)
    assert log == expected
    assert len({size for _, size in expected}) > 1  # the batch size did change along the way
