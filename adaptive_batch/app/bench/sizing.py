"""Does adaptive sizing pay? Optimizer steps to the fixed baseline's accuracy at equal samples.

The seeds' claim for the sizing rules is about optimizer steps: a batch that grows as training
proceeds reaches the same accuracy in fewer updates, which is what saves time on a GPU, where a
larger batch costs little more per step until the device is full. Every arm trains the same
:class:`~.schedule.EpochSetup` for the same number of epochs (so the same samples):

* ``fixed``: the baseline's batch with the cosine schedule;
* ``fixed-<B/4>`` and ``fixed-<4B>``: the tuned alternatives, learning rate scaled by the
  square-root rule;
* each sizing rule fed by the training step (StepFeedback: no extra forward), coupled to the
  learning rate as its paper couples it (see :data:`ARMS`).

The projected time is a model, not a measurement: a step costs 1 unit up to a saturation batch
``B_sat`` and ``B / B_sat`` beyond it (a device that runs small batches at the same speed until it
is full), applied to each arm's recorded batch sizes.
"""

from __future__ import annotations

import bisect
import itertools
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adaptive_batch.optional import require

from .cifar import CifarData
from .common import Results, floats, markdown_table, mean_std, reached_cell
from .schedule import EpochSetup, curve_cell, fixed_alternatives, parse_curve, run_epochs
from .time_to_accuracy import setup_key

__all__ = ["ARMS", "format_sizing", "parse_sizes", "projected_units", "run_lengths", "run_sizing"]

FIELDS = (
    "arm",
    "seed",
    "setup",
    "final_accuracy",
    "best_accuracy",
    "steps",
    "trained",
    "train_seconds",
    "cpu_seconds",
    "curve",
    "sizes",
)
SIZING_CAPS = (16, 2048)  # the sizing rules' bounds, unless their paper sets its own


@dataclass(frozen=True)
class SizingArm:
    """One arm: a run name for the runner and how its schedule and batch bounds are set."""

    run_as: str
    schedule: str = "cosine"
    own_caps: bool = False  # the recipe's start and caps (the paper's), not SIZING_CAPS
    why: str = ""


#: The sizing arms (beside the fixed ones), each coupled to the learning rate as its paper says.
ARMS: dict[str, SizingArm] = {
    "gns": SizingArm("gns-free", why="AdaptDL: AdaScale gain on the cosine schedule"),
    "cabs": SizingArm("cabs", own_caps=True, why="CABS on the cosine schedule (B follows lr)"),
    "cabs-constant": SizingArm(
        "cabs", schedule="constant", own_caps=True, why="CABS at constant lr, as its paper runs"
    ),
    "adadamp": SizingArm("adadamp", schedule="constant", why="constant lr, damped past the cap"),
    "padadamp": SizingArm("padadamp", schedule="constant", why="constant lr, damped past the cap"),
    "geodamp": SizingArm("geodamp", schedule="constant", why="constant lr, damped past the cap"),
    # The same growth on the baseline's cosine schedule: what the growing batch buys beside the
    # decay every other arm has.
    "adadamp-cosine": SizingArm("adadamp", why="the cosine schedule, damped past the cap"),
    "geodamp-cosine": SizingArm("geodamp", why="the cosine schedule, damped past the cap"),
    "arbiter": SizingArm("arbiter", own_caps=True, why="Arbiter's agent (8-512), cosine lr"),
}


def run_lengths(sizes: Sequence[int]) -> str:
    """Batch sizes step by step as ``size*count`` runs.

    Example:
        >>> run_lengths([128, 128, 128, 16, 256])
        '128*3;16*1;256*1'
    """
    return ";".join(f"{size}*{len(list(run))}" for size, run in itertools.groupby(sizes))


def parse_sizes(cell: str) -> list[int]:
    sizes: list[int] = []
    for part in filter(None, cell.split(";")):
        size, count = part.split("*")
        sizes += [int(size)] * int(count)
    return sizes


def projected_units(sizes: Sequence[int], saturation: int) -> float:
    """Modelled time of the steps: 1 unit per step up to ``saturation``, ``B / saturation`` above.

    Example:
        >>> projected_units([128, 512, 2048], saturation=512)
        6.0
    """
    return sum(max(1.0, size / saturation) for size in sizes)


def run_sizing(
    data: CifarData,
    arms: Sequence[str],
    seeds: Sequence[int],
    *,
    setup: EpochSetup,
    out_dir: str | Path,
    device: torch.device,
    show_progress: bool = True,
) -> Results:
    """Every arm per seed, resumable: rows already in ``out_dir`` are not run again."""
    results = Results(out_dir, "sizing", FIELDS, key=("arm", "seed", "setup"))
    tqdm = require("tqdm", "demo", "the benchmark").tqdm
    alternatives = fixed_alternatives(setup)  # the fixed batch 4x smaller and larger
    every = {name: SizingArm(name) for name in ("fixed", *alternatives)} | ARMS
    names = ["fixed", *[a for a in arms if a != "fixed"]]
    unknown = [a for a in names if a not in every]
    if unknown:
        raise ValueError(f"unknown sizing arms {unknown}; choose from {', '.join(every)}")
    key = setup_key(setup)
    pending = [
        (seed, name)
        for seed in seeds
        for name in names
        if not results.has(arm=name, seed=seed, setup=key)
    ]
    images = setup.subset or data.train_y.numel()
    with tqdm(
        total=len(pending) * setup.epochs * images,
        desc="sizing",
        unit="sample",
        disable=not show_progress,
    ) as progress:
        for seed, name in pending:
            arm = every[name]
            overrides: dict[str, Any] = {"schedule": arm.schedule, **alternatives.get(name, {})}
            if name in ARMS:  # a sizing rule, fed by the training step
                overrides["stage"] = "training_step"
                if not arm.own_caps:
                    overrides["batch_caps"] = SIZING_CAPS
            trajectory = Path(out_dir) / "trajectories" / f"sizing-{name}-{seed}.csv"
            result = run_epochs(
                data, arm.run_as, seed, setup, device=device, progress=progress,
                trajectory=trajectory, **overrides,
            )  # fmt: skip
            results.add(
                {
                    "arm": name,
                    "seed": seed,
                    "setup": key,
                    "final_accuracy": result.test_accuracy,
                    "best_accuracy": result.best_accuracy,
                    "steps": result.steps,
                    "trained": result.trained,
                    "train_seconds": result.train_seconds,
                    "cpu_seconds": result.cpu_seconds,
                    "curve": curve_cell(result),
                    "sizes": run_lengths(result.batch_sizes),
                }
            )
    return results


@dataclass
class _Run:
    """A stored run's sizes and, per evaluation, the steps taken and samples trained so far."""

    row: dict[str, str]
    sizes: list[int]
    steps_at: list[int]
    trained_at: list[int]
    accuracy_at: list[float]

    @classmethod
    def of(cls, row: dict[str, str]) -> _Run:
        sizes = parse_sizes(row["sizes"])
        totals = list(itertools.accumulate(sizes))
        curve = parse_curve(row["curve"])
        steps_at = [bisect.bisect_left(totals, trained) + 1 for _, _, trained, _ in curve]
        return cls(row, sizes, steps_at, [p[2] for p in curve], [p[3] for p in curve])

    def first(self, target: float) -> int | None:
        """The index of the first evaluation reaching ``target`` (``None``: never)."""
        return next((i for i, a in enumerate(self.accuracy_at) if a >= target), None)

    def last_epoch_mean(self) -> float:
        """The mean batch size over the last epoch (between the last two evaluations)."""
        start = self.steps_at[-2] if len(self.steps_at) > 1 else 0
        tail = self.sizes[start:] or self.sizes
        return statistics.fmean(tail)


def format_sizing(results: Results, arms: Sequence[str], setup: EpochSetup, saturation: int) -> str:
    """The table (mean ± std over seeds; ratios against the same seed's fixed run)."""
    key = setup_key(setup)
    fixed_of = {r["seed"]: _Run.of(r) for r in results.select(arm="fixed", setup=key)}
    header = [
        "arm",
        "seeds",
        "final acc %",
        "best acc %",
        "steps (x fixed)",
        "samples (x fixed)",
        "mean / final batch",
        "steps to fixed's final (x)",
        "samples to it (x)",
        "steps to 99% of it (x)",
        f"projected time, B_sat={saturation} (x)",
        "projected time to fixed's final (x)",
        "train CPU s",
    ]
    rows = []
    for name in ["fixed", *[a for a in arms if a != "fixed"]]:
        runs = [_Run.of(r) for r in results.select(arm=name, setup=key) if r["seed"] in fixed_of]
        if not runs:
            continue
        ratios: dict[str, list[Any]] = {
            k: [] for k in ("steps", "samples", "to", "to_n", "to99", "time", "time_to")
        }
        for run in runs:
            base = fixed_of[run.row["seed"]]
            base_units = projected_units(base.sizes, saturation)
            ratios["steps"].append(len(run.sizes) / len(base.sizes))
            ratios["samples"].append(run.trained_at[-1] / base.trained_at[-1])
            ratios["time"].append(projected_units(run.sizes, saturation) / base_units)
            target = base.accuracy_at[-1]
            hit, hit99 = run.first(target), run.first(0.99 * target)
            ratios["to"].append(None if hit is None else run.steps_at[hit] / len(base.sizes))
            ratios["to_n"].append(
                None if hit is None else run.trained_at[hit] / base.trained_at[-1]
            )
            ratios["to99"].append(None if hit99 is None else run.steps_at[hit99] / len(base.sizes))
            ratios["time_to"].append(
                None
                if hit is None
                else projected_units(run.sizes[: run.steps_at[hit]], saturation) / base_units
            )
        rows.append(
            [
                name,
                len(runs),
                mean_std(floats([r.row for r in runs], "final_accuracy"), 100),
                mean_std(floats([r.row for r in runs], "best_accuracy"), 100),
                mean_std(ratios["steps"]),
                mean_std(ratios["samples"]),
                f"{statistics.fmean(r.trained_at[-1] / len(r.sizes) for r in runs):.0f} / "
                f"{statistics.fmean(r.last_epoch_mean() for r in runs):.0f}",
                reached_cell(ratios["to"]),
                reached_cell(ratios["to_n"]),
                reached_cell(ratios["to99"]),
                mean_std(ratios["time"]),
                reached_cell(ratios["time_to"]),
                mean_std(floats([r.row for r in runs], "cpu_seconds"), digits=0),
            ]
        )
    note = (
        f"\n\nProjected time is a model, not a measurement: a step costs 1 unit up to "
        f"B_sat = {saturation} samples and B / B_sat beyond, summed over each run's recorded "
        "batch sizes and divided by the same seed's fixed run. `never (k/n)`: k of n seeds "
        "reached it; the ratio is their mean."
    )
    return markdown_table(header, rows) + note
