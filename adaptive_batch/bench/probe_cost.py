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

from ..head_gradients import (
    cross_entropy_logit_grads,
    cross_entropy_losses,
    functorch_gram,
    linear_head_gram,
)
from ..policies.subsets import random_subset_masks
from ..probe_result import ProbeResult

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
) -> ProbeCost:
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(features, classes).to(device)
    inputs = torch.randn(batch, features, generator=gen).to(device)
    targets = torch.randint(0, classes, (batch,), generator=gen).to(device)
    with torch.no_grad():
        logits = head(inputs)

    def closed_form() -> torch.Tensor:
        cross_entropy_losses(logits, targets)
        return linear_head_gram(inputs, cross_entropy_logit_grads(logits, targets))

    def func() -> torch.Tensor:
        cross_entropy_losses(logits, targets)
        return functorch_gram(head, inputs, targets, cross_entropy_losses, max_numel=max_grad_numel)

    gram = closed_form()
    masks = random_subset_masks(batch, num_subsets, max(1, batch // 10), gen).to(device)
    result = ProbeResult(losses=cross_entropy_losses(logits, targets), gram=gram)
    num_params = classes * features + classes
    chunks = (
        1
        if batch * num_params <= max_grad_numel
        else -(-batch // max(1, max_grad_numel // (2 * num_params)))
    )
    return ProbeCost(
        batch=batch,
        features=features,
        classes=classes,
        gram_ms=_time_ms(closed_form, device, repeats),
        func_ms=_time_ms(func, device, max(1, repeats // 2)),
        func_chunks=chunks,
        scoring_ms=_time_ms(lambda: result.subset_mean_grad_sq_norms(masks), device, repeats),
        max_abs_diff=float((func() - gram).abs().max() / gram.abs().max().clamp_min(1e-30)),
    )


def format_probe_cost(costs: list[ProbeCost], device: str, threads: int) -> str:
    lines = [
        f"probe math, ms per batch (median), device {device}, {threads} torch threads",
        "     B      D      C | closed form | torch.func (chunks) | func/closed | score 64 subsets | rel. diff",
        "-" * 101,
    ]
    for c in costs:
        lines.append(
            f"{c.batch:>6} {c.features:>6} {c.classes:>6} | {c.gram_ms:>11.2f} | "
            f"{c.func_ms:>11.1f} ({c.func_chunks:>4}) | {c.speedup:>10.0f}x | {c.scoring_ms:>16.2f} | {c.max_abs_diff:.1e}"
        )
    return "\n".join(lines)
