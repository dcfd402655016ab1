"""Exactly once per epoch, every batch within the caps, nothing outside the index set: for random
caps, index sets, sizing answers, chunk sizes, and loaders with 0 and 2 workers."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from adaptive_batch import (
    AdaptiveBatchSampler,
    IndexedDataset,
    SizeBuckets,
    SubsetFilter,
    fetch_batch,
)
from adaptive_batch.load import ChunkAssembler

from .scripted import ScriptedSizes, keep_all, zero_probe

sizes_strategy = st.lists(
    st.one_of(st.integers(-5, 130), st.sampled_from([math.nan, math.inf, -math.inf, 0.4])),
    min_size=1,
    max_size=12,
)


@st.composite
def configs(draw, chunked: bool | None = None):
    dataset_size = draw(st.integers(1, 120))
    subset = draw(
        st.one_of(st.none(), st.lists(st.integers(0, dataset_size - 1), unique=True, min_size=1))
    )
    low = draw(st.integers(1, 16))
    high = draw(st.integers(low, 60))
    use_chunks = draw(st.booleans()) if chunked is None else chunked
    chunk = draw(st.integers(1, high)) if use_chunks else None
    allowed = SizeBuckets(multiple=chunk).within(low, high) if chunk else list(range(low, high + 1))
    assume(allowed)
    return {
        "data_source": dataset_size,
        "indices": subset,
        "min_batch_size": low,
        "max_batch_size": high,
        "chunk_size": chunk,
        "batch_size": draw(st.sampled_from(allowed)),
        "seed": draw(st.integers(0, 1000)),
        "shuffle": draw(st.booleans()),
    }


def caps_allow_every_batch(config: dict, epoch_size: int) -> bool:
    """Whether the caps admit a split of the epoch with every batch within them (the sampler then
    guarantees it for the last batch too; see fold_tail)."""
    low, high, chunk = config["min_batch_size"], config["max_batch_size"], config["chunk_size"] or 1
    if epoch_size < low:
        return False
    return high >= 2 * low - 1 if chunk == 1 else high >= 2 * low + chunk - 1


def check_epochs(config: dict, epochs: list[list[list[int]]]) -> None:
    index_set = config["indices"] or list(range(config["data_source"]))
    low, high = config["min_batch_size"], config["max_batch_size"]
    for number, batches in enumerate(epochs):
        assert sorted(i for b in batches for i in b) == sorted(index_set), f"epoch {number}"
        assert all(low <= len(b) <= high for b in batches[:-1]), [len(b) for b in batches]
        last = len(batches[-1])
        assert last <= high
        if caps_allow_every_batch(config, len(index_set)):
            assert last >= low, [len(b) for b in batches]


def run_sampler(sampler: AdaptiveBatchSampler, epochs: int) -> list[list[list[int]]]:
    """Consume the sampler as a loader and filter would: whole batches, or chunks assembled."""
    data = IndexedDataset(torch.arange(sampler.dataset_size))
    out = []
    for _ in range(epochs):
        batches: list[list[int]] = []
        if sampler.chunk_size is None:
            for batch in sampler:
                batches.append(batch)
                sampler.feedback(keep_all(batch))
        else:
            assembler = ChunkAssembler(sampler)
            chunks = (fetch_batch(data, chunk) for chunk in sampler)
            while (batch := assembler.next_batch(chunks)) is not None:
                batches.append(batch.index.tolist())
                sampler.feedback(keep_all(batches[-1]))
        out.append(batches)
    return out


@given(config=configs(), sizes=sizes_strategy)
def test_each_epoch_covers_the_index_set_exactly_once_within_the_caps(config, sizes):
    sampler = AdaptiveBatchSampler(**config, policy=ScriptedSizes(sizes))
    check_epochs(config, run_sampler(sampler, 2))


@pytest.mark.parametrize("workers", [0, 2])
@settings(max_examples=12)
@given(config=configs(), sizes=sizes_strategy)
def test_through_a_dataloader_and_a_filter(workers, config, sizes):
    sampler = AdaptiveBatchSampler(**config, policy=ScriptedSizes(sizes))
    data = IndexedDataset(TensorDataset(torch.arange(config["data_source"]).float()))
    extra = {"num_workers": workers, "persistent_workers": True} if workers else {}
    loader = DataLoader(data, batch_sampler=sampler, **extra)
    batches = SubsetFilter(loader, zero_probe, sampler=sampler, targets=0)
    epochs = []
    for _ in range(2):
        epoch = []
        for (x,) in batches:
            epoch.append(x.flatten().long().tolist())
        epochs.append(epoch)
    check_epochs(config, epochs)
    if sampler.chunk_size is not None or workers == 0:  # sized where consumed: no lag
        assert set(sampler.feedback_lag) == {0}
