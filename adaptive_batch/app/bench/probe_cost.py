"""Probe math cost: the closed-form Gram path vs the torch.func path, side by side in one run.

Times only what differs between the two paths -- per-sample losses and the ``B x B`` Gram
matrix from the head's captured inputs and outputs -- plus the scoring of EDBA's 64 random
subsets, on the device given (synchronised on CUDA).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from adaptive_batch import ProbeResult
from adaptive_batch.policies.subsets import random_subset_masks
from adaptive_batch.probe import LOSSES, PerSampleGradients, functorch_gram, linear_head_gram

from .common import peak_memory_bytes

__all__ = ["DEFAULT_SHAPES", "ProbeCost", "format_probe_cost", "measure_probe_cost"]

DEFAULT_SHAPES = ((100, 64, 10), (1000, 512, 10), (256, 2048, 1000))


@dataclass
class ProbeCost:
    batch: int
    features: int
    classes: int
    gram_ms: float
    func_ms: float
    func_chunks: int
    scoring_ms: float
    max_abs_diff: float
    func_peak_ratio: float  # peak extra memory of the torch.func path / its budget (max_grad_numel)

    @property
    def speedup(self) -> float:
        return self.func_ms / self.gram_ms


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    _synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]  # median


def measure_probe_cost(
    batch: int,
    features: int,
    classes: int,
    *,
    device: torch.device | str = "cpu",
    repeats: int = 5,
    max_grad_numel: int = 2**26,
    num_subsets: int = 64,
    seed: int = 0,
    measure_memory: bool = True,
) -> ProbeCost:
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(features, classes).to(device)
    inputs = torch.randn(batch, features, generator=gen).to(device)
    targets = torch.randint(0, classes, (batch,), generator=gen).to(device)
    with torch.no_grad():
        logits = head(inputs)

    ce = LOSSES["cross_entropy"]

    def closed_form() -> torch.Tensor:
        ce.per_sample(logits, targets)
        return linear_head_gram(inputs, ce.gradients(logits, targets))

    def func() -> torch.Tensor:
        ce.per_sample(logits, targets)
        return functorch_gram(head, inputs, targets, ce.per_sample, max_grad_numel=max_grad_numel)

    gram = closed_form()
    masks = random_subset_masks(batch, num_subsets, max(1, batch // 10), gen).to(device)
    result = ProbeResult(losses=ce.per_sample(logits, targets), gram=gram)
    chunks = len(
        PerSampleGradients(head, ce.per_sample, max_grad_numel=max_grad_numel).chunk_slices(
            batch, 1
        )
    )
    peak = peak_memory_bytes(func, device) if measure_memory else float("nan")
    return ProbeCost(
        batch=batch,
        features=features,
        classes=classes,
        gram_ms=_time_ms(closed_form, device, repeats),
        func_ms=_time_ms(func, device, max(1, repeats // 2)),
        func_chunks=chunks,
        scoring_ms=_time_ms(lambda: result.subset_mean_grad_sq_norms(masks), device, repeats),
        max_abs_diff=float((func() - gram).abs().max() / gram.abs().max().clamp_min(1e-30)),
        func_peak_ratio=peak / (max_grad_numel * inputs.element_size()),
    )


def format_probe_cost(costs: list[ProbeCost], device: str, threads: int) -> str:
    lines = [
        f"probe math, ms per batch (median), device {device}, {threads} torch threads",
        "     B      D      C | closed form | torch.func (chunks) | func/closed | score 64 subsets "
        "| rel. diff | func peak memory / budget",
        "-" * 129,
    ]
    for c in costs:
        lines.append(
            f"{c.batch:>6} {c.features:>6} {c.classes:>6} | {c.gram_ms:>11.2f} | "
            f"{c.func_ms:>11.1f} ({c.func_chunks:>4}) | {c.speedup:>10.0f}x | {c.scoring_ms:>16.2f} "
            f"| {c.max_abs_diff:9.1e} | {c.func_peak_ratio:>25.3f}"
        )
    return "\n".join(lines)
