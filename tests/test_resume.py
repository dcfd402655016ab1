"""Exact resume: a checkpoint at any step continues with the uninterrupted run's batches."""

from __future__ import annotations

import copy
import gc
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torchdata.nodes import Loader, Mapper, Prefetcher, SamplerWrapper
from torchdata.stateful_dataloader import StatefulDataLoader

from adaptive_batch import AdaptiveBatchSampler, IndexedDataset, SubsetFilter, fetch_batch
from adaptive_batch.nodes import SubsetFilterNode
from adaptive_batch.policies import EDBA

from .synthetic import blobs

STEPS = 36


def dataset() -> IndexedDataset:
    return IndexedDataset(blobs(160))


DATA = dataset()


class Run:
    """Model, optimizer, sampler, filter and loader, built the same way every time."""

    def __init__(self, kind: str) -> None:
        torch.manual_seed(0)
        self.kind = kind
        self.model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)
        chunk = None if kind == "dataloader-batches" else 8
        self.sampler = AdaptiveBatchSampler(
            DATA,
            policy=EDBA(seed=2, factor=1.5),
            batch_size=16,
            min_batch_size=8,
            max_batch_size=48,
            chunk_size=chunk,
            seed=4,
        )
        if kind == "nodes-prefetch":
            source = Prefetcher(
                Mapper(SamplerWrapper(self.sampler), partial(fetch_batch, DATA)), prefetch_factor=3
            )
            self.node = SubsetFilterNode(source, self.model, sampler=self.sampler)
            self.loader = self.iterable = Loader(self.node)
            self.filter = self.node.filter
        else:
            workers = (
                {"num_workers": 2, "prefetch_factor": 2} if kind == "dataloader-workers" else {}
            )
            self.loader = StatefulDataLoader(DATA, batch_sampler=self.sampler, **workers)
            self.filter = self.iterable = SubsetFilter(
                self.loader, self.model, sampler=self.sampler
            )
        self.iterator = iter(self.iterable)
        self.log: list[tuple[list[int], int]] = []

    def train(self, steps: int) -> None:
        for _ in range(steps):
            try:
                x, y = next(self.iterator)
            except StopIteration:  # end of an epoch
                self.iterator = iter(self.iterable)
                x, y = next(self.iterator)
            feedback = self.filter.last_feedback
            self.log.append((sorted(feedback.kept.tolist()), feedback.batch_size))
            loss = F.cross_entropy(self.model(x), y)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()

    def checkpoint(self) -> dict:
        state = {
            "loader": self.loader.state_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }
        if self.kind != "nodes-prefetch":  # the node's state is inside the Loader's
            state["filter"] = self.filter.state_dict()
        return copy.deepcopy(state)

    def restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if "filter" in state:
            self.filter.load_state_dict(state["filter"])
        self.loader.load_state_dict(state["loader"])
        self.iterator = iter(self.iterable)


KINDS = ["dataloader-workers", "nodes-prefetch", "dataloader-batches"]
REFERENCE: dict[str, Run] = {}


def reference(kind: str) -> Run:
    if kind not in REFERENCE:
        run = Run(kind)
        run.train(STEPS)
        REFERENCE[kind] = run
    return REFERENCE[kind]


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=6)
@given(stop=st.integers(1, STEPS - 1))
def test_checkpoint_at_any_step_resumes_exactly(kind, stop):
    check_resume(kind, stop)
    # torchdata Loaders stopped mid-epoch keep their prefetch threads in a reference cycle; collect
    # them now, on this thread, not whenever an allocation in one of those threads triggers the
    # collector (their __del__ then tries to join the thread it runs on).
    gc.collect()


def check_resume(kind: str, stop: int) -> None:
    expected = reference(kind)
    first = Run(kind)
    first.train(stop)
    state = first.checkpoint()
    resumed = Run(kind)
    resumed.restore(state)
    resumed.train(STEPS - stop)
    assert first.log + resumed.log == expected.log
    assert len({size for _, size in expected.log}) > 1  # the batch size did change
    assert (
        resumed.filter.rule.state_dict()["loss_ema"]
        == expected.filter.rule.state_dict()["loss_ema"]
    )
    sizing = (
        resumed.sampler.consumer_state_dict()
        if resumed.sampler.chunk_size
        else resumed.sampler.state_dict()
    )
    assert sizing["batch_size"] == expected.sampler.batch_size


def test_sizing_where_consumed_has_no_lag_with_workers():
    run = Run("dataloader-workers")
    run.train(STEPS)
    assert run.sampler.feedback_lag == {0: STEPS}
    assert all(size % 8 == 0 for _, size in run.log)  # 160 per epoch: every batch is whole chunks
