"""Noisy labels on CIFAR-10: does a policy filter the mislabelled samples out of training?

A fixed fraction of the training labels (20% and 40%) is replaced by a label drawn uniformly from
the other nine classes (symmetric noise), seeded by the seed and the rate; the test labels stay
clean. Every arm trains the same schedule (:class:`~.schedule.EpochSetup`). Beside the test
accuracy, each run counts the **mislabelled fraction among the samples it actually trained on**,
overall and after the warm-up (:data:`WARMUP_EPOCHS`): the honest test of a noise filter (the
candidates carry the full noise rate).

The baselines a filter must beat: the fixed run's final accuracy; the fixed run stopped at its
best epoch (picked on the test set: an upper bound of early stopping, reported as such); and the
tuned fixed run, the best of three batch sizes (the baseline's, 4x smaller and 4x larger, the
learning rate scaled by the square-root rule). ``small-loss-inbatch`` forgets the noise rate
(Co-teaching's assumption, told the true rate); ``small-loss-told`` is the plan told it too (it
otherwise estimates it with a loss mixture).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from adaptive_batch.optional import require

from ..runner import check_run_name
from .cifar import CifarData
from .common import Results, floats, markdown_table, mean_std
from .schedule import (
    EpochSetup,
    allowed_indices,
    curve_cell,
    fixed_alternatives,
    parse_curve,
    run_epochs,
)
from .time_to_accuracy import CONTROL_BELOW, CONTROLS, control_name, control_run, setup_key

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
    "noisy_curve",
)
#: The mislabelled share "after warm-up" counts the samples trained from this epoch on (the
#: longest warm-up among the arms: Co-teaching's ramp).
WARMUP_EPOCHS = 10


def _run_as(arm: str, rate: float, setup: EpochSetup) -> tuple[str, dict[str, Any]]:
    """The runner's name for an arm, and its overrides of the setup."""
    if arm == "small-loss-inbatch":
        return f"small-loss-inbatch-{rate:g}", {}
    if arm == "small-loss-told":  # the plan told the noise rate, as the in-batch form is
        return f"small-loss-{rate:g}", {}
    return arm, fixed_alternatives(setup).get(arm, {})


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
    controls: Sequence[str] = CONTROLS,
) -> Results:
    """Every rate, seed and arm (the fixed baselines first), then, for each policy that trained
    on fewer samples than the fixed run, its ``controls`` at that fraction (``short@P``: the
    schedule shortened; ``rs2@P``: RS2; none: arms beside ones run with theirs); resumable."""
    results = Results(out_dir, "noisy-cifar", FIELDS, key=("noise", "policy", "seed", "setup"))
    tqdm = require("tqdm", "demo", "the benchmark").tqdm
    key = setup_key(setup)
    baselines = ["fixed", *fixed_alternatives(setup)]
    selecting = [p for p in policies if p not in baselines]
    arms = baselines + selecting
    for arm in arms:  # an unknown name fails here, before any training
        check_run_name(_run_as(arm, rates[0], setup)[0])
    pending = sum(
        not results.has(noise=r, policy=p, seed=s, setup=key)
        for r in rates
        for s in seeds
        for p in arms
    )
    allowed = allowed_indices(data, setup)
    with tqdm(
        total=pending * setup.epochs * allowed.numel(),
        desc="noisy-cifar",
        unit="sample",
        disable=not show_progress,
    ) as progress:
        for rate in rates:
            for seed in seeds:
                labels, corrupted = corrupt_labels(data.train_y, rate, seed, among=allowed)
                arm = _Arm(
                    data, setup, results, key, rate, seed, labels, corrupted, device, progress,
                    Path(out_dir) / "trajectories",
                )  # fmt: skip
                for name in arms:
                    run_as, overrides = _run_as(name, rate, setup)
                    arm.run(name, run_as, **overrides)
                fixed = results.select(noise=rate, policy="fixed", seed=seed, setup=key)[0]
                for policy in selecting:
                    row = results.select(noise=rate, policy=policy, seed=seed, setup=key)[0]
                    fraction = float(row["trained"]) / float(fixed["trained"])
                    if fraction > CONTROL_BELOW:
                        continue
                    for kind in controls:
                        run_as, epochs = control_run(kind, fraction, setup.epochs)
                        arm.run(control_name(kind, policy), run_as, epochs=epochs)
    return results


@dataclass
class _Arm:
    """Runs the arms of one noise rate and seed (the same corrupted labels for all)."""

    data: CifarData
    setup: EpochSetup
    results: Results
    key: str
    rate: float
    seed: int
    labels: Tensor
    corrupted: Tensor
    device: torch.device
    progress: Any
    trajectories: Path

    def run(self, name: str, run_as: str, **overrides: Any) -> None:
        """Train ``name`` as ``run_as`` (with RunSpec ``overrides``) unless it is stored."""
        if self.results.has(noise=self.rate, policy=name, seed=self.seed, setup=self.key):
            return
        result = run_epochs(
            self.data, run_as, self.seed, self.setup, device=self.device, labels=self.labels,
            noisy=self.corrupted, progress=self.progress,
            trajectory=self.trajectories / f"noisy-{self.rate:g}-{name}-{self.seed}.csv",
            **overrides,
        )  # fmt: skip
        self.results.add(_row(self.rate, name, self.seed, self.key, result))


def _row(rate: float, name: str, seed: int, key: str, result: Any) -> dict[str, Any]:
    return {
        "noise": rate,
        "policy": name,
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
        "noisy_curve": ";".join(map(str, result.noisy_curve)),
    }


def noisy_share_after(row: dict[str, str], epoch: int) -> float:
    """The mislabelled share among the samples trained from ``epoch`` on (``nan``: none).

    Example (100 samples trained per epoch; 40, 40, 10 and 10 of them mislabelled):
        >>> row = {"curve": "1:1:100:0.1;2:2:200:0.2;3:3:300:0.3;4:4:400:0.4",
        ...        "noisy_curve": "40;80;90;100"}
        >>> noisy_share_after(row, 2)  # epochs 3 and 4: 20 of 200
        0.1
    """
    trained = [p[2] for p in parse_curve(row["curve"])]
    noisy = [int(v) for v in row["noisy_curve"].split(";") if v]
    if len(trained) <= epoch or len(noisy) != len(trained):
        return math.nan
    start = epoch - 1  # evaluations follow epochs: index e - 1 is after epoch e
    count = trained[-1] - trained[start]
    return (noisy[-1] - noisy[start]) / count if count else math.nan


def _final_mean(results: Results, rate: float, key: str, arm: str) -> float:
    values = floats(results.select(noise=rate, policy=arm, setup=key), "final_accuracy")
    return sum(values) / len(values) if values else math.nan


def format_noisy(
    results: Results, rates: Sequence[float], policies: Sequence[str], setup: EpochSetup
) -> str:
    """Per rate: every arm (mean ± std over seeds) against the three baselines."""
    key = setup_key(setup)
    header = [
        "noise",
        "arm",
        "seeds",
        "final acc %",
        "best epoch acc %",
        "vs fixed final",
        "vs fixed early-stopped",
        "vs tuned fixed",
        "mislabelled among trained %",
        f"after epoch {WARMUP_EPOCHS} %",
        "samples trained",
        "train CPU s",
    ]
    rows = []
    notes = []
    for rate in rates:
        fixed_runs = results.select(noise=rate, policy="fixed", setup=key)
        fixed = _final_mean(results, rate, key, "fixed")
        stopped = (
            sum(floats(fixed_runs, "best_accuracy")) / len(fixed_runs) if fixed_runs else math.nan
        )
        sizes = ["fixed", *fixed_alternatives(setup)]
        measured = [a for a in sizes if not math.isnan(_final_mean(results, rate, key, a))]
        tuned_arm = max(measured or ["fixed"], key=lambda a: _final_mean(results, rate, key, a))
        tuned = _final_mean(results, rate, key, tuned_arm)
        notes.append(f"{100 * rate:g}% noise: the tuned fixed run is {tuned_arm}")
        arms = [*sizes]
        for policy in [p for p in policies if p not in sizes]:
            arms += [policy, *(control_name(kind, policy) for kind in CONTROLS)]
        for arm in arms:
            runs = results.select(noise=rate, policy=arm, setup=key)
            if not runs:
                continue
            final = floats(runs, "final_accuracy")
            mean = sum(final) / len(final)
            after = [noisy_share_after(r, WARMUP_EPOCHS) for r in runs]
            rows.append(
                [
                    f"{100 * rate:g}%",
                    arm,
                    len(runs),
                    mean_std(final, 100),
                    mean_std(floats(runs, "best_accuracy"), 100),
                    f"{100 * (mean - fixed):+.2f}",
                    f"{100 * (mean - stopped):+.2f}",
                    f"{100 * (mean - tuned):+.2f}",
                    mean_std(floats(runs, "trained_noisy_fraction"), 100, digits=1),
                    "—" if any(math.isnan(a) for a in after) else mean_std(after, 100, digits=1),
                    f"{sum(floats(runs, 'trained')) / len(runs):.0f}",
                    mean_std(floats(runs, "cpu_seconds"), digits=0),
                ]
            )
    note = (
        "\n\n'vs fixed early-stopped' compares with the fixed run's best epoch, picked on the "
        "test set (an upper bound of early stopping). " + "; ".join(notes) + "."
    )
    return markdown_table(header, rows) + note
