"""Feedback lag: how many batches' feedback is still missing when a batch size is decided.

With ``DataLoader(num_workers=W, prefetch_factor=P)`` the loader asks the sampler for batches
``W * P`` ahead of the training loop, so a sampler that sizes batches when they are handed out
decides each size before the feedback of the batches in between has arrived. A chunked sampler
(``chunk_size=...``) sizes each batch where it is consumed, after all earlier feedback.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adaptive_batch import AdaptiveBatchSampler, IndexedDataset, SubsetFilter
from adaptive_batch.policies import EDBA

__all__ = ["LagResult", "format_lag", "measure_lag"]


@dataclass
class LagResult:
    mode: str
    num_workers: int
    prefetch: int
    steps: int
    mean_lag: float
    max_lag: int
    steady_lag: int  # the most common lag


def _blobs(num: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(num) % 4
    return TensorDataset(
        torch.randn(4, 16, generator=gen)[labels] * 2 + torch.randn(num, 16, generator=gen), labels
    )


def measure_lag(
    num_workers: int,
    *,
    chunk_size: int | None,
    prefetch_factor: int = 2,
    samples: int = 2048,
    seed: int = 0,
) -> LagResult:
    """Train a small MLP for one epoch with EDBA; return the lag the sampler recorded."""
    torch.manual_seed(seed)
    data = IndexedDataset(_blobs(samples))
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    sampler = AdaptiveBatchSampler(
        data,
        policy=EDBA(seed=seed),
        batch_size=32,
        min_batch_size=8,
        max_batch_size=128,
        chunk_size=chunk_size,
        seed=seed,
    )
    extra = {"prefetch_factor": prefetch_factor} if num_workers else {}
    loader = DataLoader(data, batch_sampler=sampler, num_workers=num_workers, **extra)
    for x, y in SubsetFilter(loader, model, sampler=sampler):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    lags = sampler.feedback_lag
    steps = sum(lags.values())
    return LagResult(
        mode="chunks" if chunk_size else "batches",
        num_workers=num_workers,
        prefetch=prefetch_factor * num_workers,
        steps=steps,
        mean_lag=sum(k * v for k, v in lags.items()) / steps,
        max_lag=max(lags),
        steady_lag=max(lags, key=lambda k: lags[k]),
    )


def format_lag(results: list[LagResult]) -> str:
    lines = [
        "| sizing | num_workers | batches prefetched | sizes decided | mean lag | most common lag | max lag |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        where = "where consumed (chunk_size=8)" if r.mode == "chunks" else "when handed out"
        lines.append(
            f"| {where} | {r.num_workers} | {r.prefetch} | {r.steps} | {r.mean_lag:.2f} | {r.steady_lag} | {r.max_lag} |"
        )
    return "\n".join(lines)
