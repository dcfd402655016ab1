"""Noisy labels on CIFAR-10: does a policy filter the mislabelled samples out of training?

A fixed fraction of the training labels (20% and 40%) is replaced by a label drawn uniformly from
the other nine classes (symmetric noise), seeded by the seed and the rate; the test labels stay
clean. Every arm trains the same schedule (:class:`~.schedule.EpochSetup`). Beside the test
accuracy, each run counts the **mislabelled fraction among the samples it actually trained on**:
the honest test of a noise filter (the candidates carry the full noise rate).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from adaptive_batch.optional import require

from .cifar import CifarData
from .common import Results, floats, markdown_table, mean_std
from .schedule import EpochSetup, allowed_indices, curve_cell, run_epochs
from .time_to_accuracy import setup_key

__all__ = ["corrupt_labels", "format_noisy", "run_noisy"]

FIELDS = (
    "noise",
    "policy",
    "seed",
    "setup",
    "final_accuracy",
    "best_accuracy",
    "trained_noisy_fraction",
    "trained",
    "train_seconds",
    "cpu_seconds",
    "indices_inside",
    "curve",
)


def corrupt_labels(
    labels: Tensor, rate: float, seed: int, among: Tensor | None = None, classes: int = 10
) -> tuple[Tensor, Tensor]:
    """``(labels, corrupted)``: exactly ``round(rate * n)`` of the ``n`` indices ``among``
    (default all) relabelled uniformly among the other classes; ``corrupted`` marks them.

    Example:
        >>> import torch
        >>> labels, corrupted = corrupt_labels(torch.arange(100) % 10, 0.4, seed=0)
        >>> int(corrupted.sum()), bool((labels[corrupted] != (torch.arange(100) % 10)[corrupted]).all())
        (40, True)
    """
    among = torch.arange(labels.numel()) if among is None else among
    generator = torch.Generator().manual_seed(10_007 * seed + round(1000 * rate))
    chosen = among[
        torch.randperm(among.numel(), generator=generator)[: round(rate * among.numel())]
    ]
    shift = torch.randint(1, classes, (chosen.numel(),), generator=generator)
    noisy = labels.clone()
    noisy[chosen] = (labels[chosen] + shift) % classes
    corrupted = torch.zeros(labels.numel(), dtype=torch.bool)
    corrupted[chosen] = True
    return noisy, corrupted


def run_noisy(
    data: CifarData,
    rates: Sequence[float],
    policies: Sequence[str],
    seeds: Sequence[int],
    *,
    setup: EpochSetup,
    out_dir: str | Path,
    device: torch.device,
    show_progress: bool = True,
) -> Results:
    """Every rate, seed and arm (the fixed baseline first); resumable."""
    results = Results(out_dir, "noisy-cifar", FIELDS, key=("noise", "policy", "seed", "setup"))
    tqdm = require("tqdm", "demo", "the benchmark").tqdm
    key = setup_key(setup)
    arms = ["fixed", *[p for p in policies if p != "fixed"]]
    todo = [
        (rate, seed, p)
        for rate in rates
        for seed in seeds
        for p in arms
        if not results.has(noise=rate, policy=p, seed=seed, setup=key)
    ]
    allowed = allowed_indices(data, setup)
    with tqdm(
        total=len(todo) * setup.epochs * allowed.numel(),
        desc="noisy-cifar",
        unit="sample",
        disable=not show_progress,
    ) as progress:
        for rate, seed, policy in todo:
            labels, corrupted = corrupt_labels(data.train_y, rate, seed, among=allowed)
            result = run_epochs(
                data,
                policy,
                seed,
                setup,
                device=device,
                labels=labels,
                noisy=corrupted,
                progress=progress,
                trajectory=Path(out_dir) / "trajectories" / f"noisy-{rate:g}-{policy}-{seed}.csv",
            )
            results.add(
                {
                    "noise": rate,
                    "policy": policy,
                    "seed": seed,
                    "setup": key,
                    "final_accuracy": result.test_accuracy,
                    "best_accuracy": result.best_accuracy,
                    "trained_noisy_fraction": result.noisy_fraction,
                    "trained": result.trained,
                    "train_seconds": result.train_seconds,
                    "cpu_seconds": result.cpu_seconds,
                    "indices_inside": result.indices_inside,
                    "curve": curve_cell(result),
                }
            )
    return results


def format_noisy(
    results: Results, rates: Sequence[float], policies: Sequence[str], setup: EpochSetup
) -> str:
    key = setup_key(setup)
    header = [
        "noise",
        "policy",
        "seeds",
        "final acc %",
        "best acc %",
        "vs fixed (final)",
        "mislabelled among trained %",
        "samples trained",
        "train CPU s",
    ]
    rows = []
    for rate in rates:
        fixed = floats(results.select(noise=rate, policy="fixed", setup=key), "final_accuracy")
        for policy in ["fixed", *[p for p in policies if p != "fixed"]]:
            runs = results.select(noise=rate, policy=policy, setup=key)
            if not runs:
                continue
            final = floats(runs, "final_accuracy")
            gap = (
                100 * (sum(final) / len(final) - sum(fixed) / len(fixed)) if fixed else float("nan")
            )
            rows.append(
                [
                    f"{100 * rate:g}%",
                    policy,
                    len(runs),
                    mean_std(final, 100),
                    mean_std(floats(runs, "best_accuracy"), 100),
                    f"{gap:+.2f}",
                    mean_std(floats(runs, "trained_noisy_fraction"), 100, digits=1),
                    f"{sum(floats(runs, 'trained')) / len(runs):.0f}",
                    mean_std(floats(runs, "cpu_seconds"), digits=0),
                ]
            )
    return markdown_table(header, rows)
