"""What the library adds to a training step, per step, at the dataset sizes users train on.

A tiny model (so the library's own work is not hidden under the network's) trains on batches
computed on the fly from their indices (so only the library's memory grows with the dataset).
Each variant -- the sampler alone, each stage with each kind of policy -- is timed in alternating
rounds against the same plain step (a slice of a permutation, the batch, the step), and the
difference is the library's cost. Times are the timing thread's CPU time, the fastest of the
rounds (other work on a shared machine only adds to a round: its caches, its hyperthreads).
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adaptive_batch import AdaptiveBatchSampler, IndexedSample, StepFeedback, SubsetFilter
from adaptive_batch.policies import (
    GradientNoiseScale,
    InfoBatch,
    KeepAll,
    SmallLoss,
    StaleSelectiveBackprop,
)

from .common import markdown_table

__all__ = ["HostCost", "format_host_cost", "measure_host_cost", "score_table_bytes"]

FEATURES, CLASSES = 32, 10


@dataclass
class HostCost:
    dataset_size: int
    variant: str
    plain_us: float  # a plain step, CPU microseconds
    variant_us: float
    epoch_start_s: float  # CPU seconds of the variant's first batch (its epoch's plan and order)

    @property
    def extra_us(self) -> float:
        return self.variant_us - self.plain_us


def make_batch(indices: Tensor) -> tuple[Tensor, Tensor]:
    """A batch computed from its indices: features that depend on the index, a label that does."""
    angles = indices.to(torch.float32)[:, None] * torch.linspace(1e-3, 1.0, FEATURES)
    return torch.sin(angles), indices % CLASSES


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 64), nn.ReLU(), nn.Linear(64, CLASSES))


class _Plain:
    """The loop without the library: batches of a permutation, as a DataLoader's BatchSampler
    over a RandomSampler hands them out (a list of indices, made a tensor)."""

    def __init__(self, size: int, batch: int, per_sample: bool = False) -> None:
        self.order = torch.randperm(size)
        # per_sample: the loss as per-sample losses weighted by hand (what any pruning method's
        # loop must compute), the floor under the library's figure for an epoch plan
        self.weights = torch.rand(batch) if per_sample else None
        self.batch = batch
        self.position = 0
        self.model = tiny_model()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01)

    def step(self) -> None:
        if self.position + self.batch > self.order.numel():
            self.position = 0
        indices = self.order[self.position : self.position + self.batch].tolist()
        self.position += self.batch
        x, y = make_batch(torch.tensor(indices))
        self.optimizer.zero_grad()
        if self.weights is None:
            F.cross_entropy(self.model(x), y).backward()
        else:
            losses = F.cross_entropy(self.model(x), y, reduction="none")
            (losses.dot(self.weights) / self.batch).backward()
        self.optimizer.step()


class _WithLibrary:
    """The same step, its indices from an AdaptiveBatchSampler and the batch through a stage."""

    def __init__(self, size: int, batch: int, policy: Any, stage: str, scores: bool) -> None:
        self.model = tiny_model()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01)
        self.sampler = AdaptiveBatchSampler(
            size, policy=policy, batch_size=batch, min_batch_size=batch, max_batch_size=batch
        )
        if scores:  # past the first epoch: a loss for every index, so the plan prunes
            _load_random_scores(self.sampler)
        self.stage: Any = None
        self.loss: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy
        if stage in ("step", "step-own-loss"):
            self.stage = StepFeedback(None, self.model, sampler=self.sampler)
            if stage == "step":  # the stage's loss: computed once for the step and the feedback
                self.loss = self.stage.weighted()
            else:  # a loss of the user's: the hook computes the feedback's losses apart
                self.loss = self.stage.weighted(
                    lambda z, y: F.cross_entropy(z, y, reduction="none")
                )
        elif stage == "step-plain-loss":  # a sizing rule weighs nothing: the loop's own loss
            self.stage = StepFeedback(None, self.model, sampler=self.sampler)
        elif stage == "filter":
            self.stage = SubsetFilter(None, self.model, sampler=self.sampler)
        elif self.sampler.expects_feedback:
            raise AssertionError("a variant without a stage must not expect feedback")
        self.batches: Iterator[list[int]] = iter(self.sampler)

    def step(self) -> None:
        indices = next(self.batches, None)
        if indices is None:
            self.batches = iter(self.sampler)
            indices = next(self.batches)
        index = torch.tensor(indices)
        x, y = make_batch(index)
        if isinstance(self.stage, StepFeedback):
            x, y = self.stage.hand_out(IndexedSample(index, (x, y)))
        elif self.stage is not None:
            x, y = self.stage.filter_batch(IndexedSample(index, (x, y)))
        self.optimizer.zero_grad()
        self.loss(self.model(x), y).backward()
        self.optimizer.step()


def _load_random_scores(sampler: AdaptiveBatchSampler) -> None:
    """A loss for every index, through the public checkpoint API."""
    state = sampler.state_dict()
    ledger = state["ledger"]
    generator = torch.Generator().manual_seed(0)
    ledger["losses"] = torch.rand(sampler.dataset_size, generator=generator)
    ledger["times_kept"] = torch.ones_like(ledger["times_kept"])
    sampler.load_state_dict(state)
    sampler.set_epoch(1)


VARIANTS: dict[str, tuple[Callable[[], Any], str, bool]] = {
    "no library: per-sample losses, weighted by hand": (lambda: None, "per-sample", False),
    "sampler alone (no policy)": (lambda: None, "none", False),
    "StepFeedback + InfoBatch (weighted loss)": (lambda: InfoBatch(num_epochs=1000), "step", True),
    "StepFeedback + InfoBatch (weighted(your loss))": (
        lambda: InfoBatch(num_epochs=1000),
        "step-own-loss",
        True,
    ),
    "StepFeedback + stale-SB": (lambda: StaleSelectiveBackprop(num_epochs=1000), "step", True),
    "StepFeedback + small-loss plan": (lambda: SmallLoss(warmup_epochs=0), "step", True),
    "StepFeedback + GNS (moments)": (lambda: GradientNoiseScale(), "step-plain-loss", False),
    "SubsetFilter + keep-all (look-ahead forward)": (lambda: KeepAll(), "filter", False),
}


def _cpu_us_per_step(step: Callable[[], None], steps: int) -> float:
    start = time.thread_time()
    for _ in range(steps):
        step()
    return 1e6 * (time.thread_time() - start) / steps


def measure_host_cost(
    sizes: tuple[int, ...],
    *,
    batch: int = 256,
    rounds: int = 7,
    steps: int = 50,
    variants: tuple[str, ...] = tuple(VARIANTS),
    log: Callable[[str], None] = lambda line: None,
) -> list[HostCost]:
    """Per dataset size and variant: the plain step and the variant's step, in alternating
    rounds of ``steps`` steps (the fastest of ``rounds``). One variant is alive at a time, so
    the largest sizes fit in memory."""
    torch.set_num_threads(1)
    out = []
    for size in sizes:
        plain = _Plain(size, batch)
        for name in variants:
            make_policy, stage, scores = VARIANTS[name]
            start = time.thread_time()
            variant: Any = (
                _Plain(size, batch, per_sample=True)
                if stage == "per-sample"
                else _WithLibrary(size, batch, make_policy(), stage, scores)
            )
            variant.step()  # the epoch's plan and order are decided here
            epoch_start = time.thread_time() - start
            for _ in range(3):  # warm-up
                plain.step()
                variant.step()
            plain_times, variant_times = [], []
            for _ in range(rounds):
                plain_times.append(_cpu_us_per_step(plain.step, steps))
                variant_times.append(_cpu_us_per_step(variant.step, steps))
            cost = HostCost(size, name, min(plain_times), min(variant_times), epoch_start)
            log(
                f"N={size:>11,} {name:<45} plain {cost.plain_us:7.1f} us  with {cost.variant_us:7.1f} us"
                f"  extra {cost.extra_us:+7.1f} us  epoch start {epoch_start:.2f} s"
            )
            out.append(cost)
            del variant
            gc.collect()
    return out


def score_table_bytes(size: int = 100_000) -> float:
    """Bytes per index of the sampler's per-index feedback table (losses and counts)."""
    sampler = AdaptiveBatchSampler(size, policy=InfoBatch(num_epochs=1000))
    return sampler.score_table_bytes() / size


def format_host_cost(costs: list[HostCost], table_bytes: float) -> str:
    """One row per variant, one column per dataset size: extra microseconds per step."""
    sizes = sorted({c.dataset_size for c in costs})
    variants = list(dict.fromkeys(c.variant for c in costs))
    by = {(c.variant, c.dataset_size): c for c in costs}
    header = ["variant", *(f"N = {n:,}" for n in sizes), f"N = {sizes[-1]:,} / N = {sizes[0]:,}"]
    rows = [
        [
            "plain step (us)",
            *(
                f"{statistics.median(c.plain_us for c in costs if c.dataset_size == n):.0f}"
                for n in sizes
            ),
            "",
        ]
    ]
    for variant in variants:
        cells = [by[(variant, n)] for n in sizes if (variant, n) in by]
        first, last = cells[0].extra_us, cells[-1].extra_us
        ratio = f"{last / first:.2f}x" if first > 0 and len(cells) > 1 else ""
        rows.append([f"{variant}: extra us", *(f"{c.extra_us:+.0f}" for c in cells), ratio])
    starts = [
        [
            f"{variant}: epoch start (s)",
            *(f"{by[(variant, n)].epoch_start_s:.2f}" for n in sizes if (variant, n) in by),
            "",
        ]
        for variant in variants
    ]
    return (
        markdown_table(header, rows + starts)
        + f"\n\nScore table: {table_bytes:.1f} bytes per dataset index. A batch of 256 from a tiny "
        f"MLP ({FEATURES}-64-{CLASSES}) computed from its indices; extra = the step with the "
        "library minus the plain step timed in the same rounds (the fastest of each), CPU time of "
        "the training thread."
    )
