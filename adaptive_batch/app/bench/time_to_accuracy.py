"""Time to accuracy on CIFAR-10: does a policy reach the fixed baseline's final test accuracy
sooner, and does it end as high?

Every arm -- the fixed baseline and each policy -- trains the same schedule
(:class:`~.schedule.EpochSetup`: the same subset, network, optimizer, cosine learning rate stepped
per epoch, number of epochs) and is evaluated on all 10,000 test images after every epoch, the
clock stopped. The target of each seed is its baseline's final accuracy; a policy's time to it is
its training time at the first evaluation that reaches it. Training time covers everything a
policy costs.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

import torch

from adaptive_batch.optional import require

from .cifar import CifarData
from .common import Results, floats, markdown_table, mean_std
from .schedule import EpochSetup, curve_cell, parse_curve, run_epochs

__all__ = ["format_time_to_accuracy", "plot_curves", "run_time_to_accuracy", "setup_key"]

FIELDS = (
    "policy",
    "seed",
    "setup",
    "final_accuracy",
    "best_accuracy",
    "train_seconds",
    "cpu_seconds",
    "steps",
    "trained",
    "candidates",
    "indices_inside",
    "curve",
)


def setup_key(setup: EpochSetup) -> str:
    """The settings a stored row must match to count for this setup."""
    opt = setup.optimizer
    return f"{setup.subset}/{setup.epochs}/{setup.batch_size}/{opt['lr']}/{opt['weight_decay']}"


def run_time_to_accuracy(
    data: CifarData,
    policies: Sequence[str],
    seeds: Sequence[int],
    *,
    setup: EpochSetup,
    out_dir: str | Path,
    device: torch.device,
    show_progress: bool = True,
) -> Results:
    """The baseline and every policy, per seed (arms interleaved, so a change in the machine's
    load falls on all of them); resumable: rows already in ``out_dir`` are not run again."""
    results = Results(out_dir, "time-to-accuracy", FIELDS, key=("policy", "seed", "setup"))
    tqdm = require("tqdm", "demo", "the benchmark").tqdm
    key = setup_key(setup)
    arms = ["fixed", *[p for p in policies if p != "fixed"]]
    todo = [
        (seed, p) for seed in seeds for p in arms if not results.has(policy=p, seed=seed, setup=key)
    ]
    images = setup.subset or data.train_y.numel()
    with tqdm(
        total=len(todo) * setup.epochs * images,
        desc="time-to-accuracy",
        unit="sample",
        disable=not show_progress,
    ) as progress:
        for seed, policy in todo:
            trajectory = Path(out_dir) / "trajectories" / f"time-to-accuracy-{policy}-{seed}.csv"
            result = run_epochs(
                data, policy, seed, setup, device=device, progress=progress, trajectory=trajectory
            )
            results.add(
                {
                    "policy": policy,
                    "seed": seed,
                    "setup": key,
                    "final_accuracy": result.test_accuracy,
                    "best_accuracy": result.best_accuracy,
                    "train_seconds": result.train_seconds,
                    "cpu_seconds": result.cpu_seconds,
                    "steps": result.steps,
                    "trained": result.trained,
                    "candidates": result.candidates,
                    "indices_inside": result.indices_inside,
                    "curve": curve_cell(result),
                }
            )
    return results


def time_to_target(row: dict[str, str], target: float, clock: int = 1) -> float | None:
    """Training seconds (``clock`` 0: wall, 1: CPU) at the first evaluation reaching ``target``
    (``None``: never)."""
    for point in parse_curve(row["curve"]):
        if point[3] >= target:
            return point[clock]
    return None


def format_time_to_accuracy(results: Results, policies: Sequence[str], setup: EpochSetup) -> str:
    """The table, and how flat the baseline ended (what the target means).

    Times are training time up to the first evaluation reaching the seed's baseline's final
    accuracy, over the baseline's whole training time: in CPU time of the run's process (all its
    threads; what other work on the machine cannot inflate) and in wall time.
    """
    key = setup_key(setup)
    baselines = {r["seed"]: r for r in results.select(policy="fixed", setup=key)}
    header = [
        "policy",
        "seeds",
        "reached baseline",
        "time to baseline's final acc / baseline's (CPU)",
        "(wall)",
        "final acc %",
        "best acc %",
        "samples trained",
        "steps",
        "train CPU s",
        "train wall s",
    ]
    rows = []
    for policy in ["fixed", *[p for p in policies if p != "fixed"]]:
        runs = [r for r in results.select(policy=policy, setup=key) if r["seed"] in baselines]
        if not runs:
            continue
        cpu_ratios, wall_ratios = [], []
        for run in runs:
            baseline = baselines[run["seed"]]
            target = float(baseline["final_accuracy"])
            cpu = time_to_target(run, target, clock=1)
            wall = time_to_target(run, target, clock=0)
            if cpu is not None and wall is not None:
                cpu_ratios.append(cpu / float(baseline["cpu_seconds"]))
                wall_ratios.append(wall / float(baseline["train_seconds"]))
        rows.append(
            [
                policy,
                len(runs),
                f"{len(cpu_ratios)}/{len(runs)}",
                mean_std(cpu_ratios) if cpu_ratios else "never",
                mean_std(wall_ratios) if wall_ratios else "never",
                mean_std(floats(runs, "final_accuracy"), 100),
                mean_std(floats(runs, "best_accuracy"), 100),
                f"{statistics.fmean(floats(runs, 'trained')):.0f}",
                f"{statistics.fmean(floats(runs, 'steps')):.0f}",
                mean_std(floats(runs, "cpu_seconds"), digits=0),
                mean_std(floats(runs, "train_seconds"), digits=0),
            ]
        )
    table = markdown_table(header, rows)
    gains = []
    for baseline in baselines.values():
        curve = [point[3] for point in parse_curve(baseline["curve"])]
        if len(curve) >= 5:
            gains.append(curve[-1] - curve[int(0.8 * len(curve)) - 1])
    if gains:
        table += (
            f"\n\nThe baseline's last 20% of epochs added {mean_std(gains, 100)} points of test "
            "accuracy (mean ± std over seeds)."
        )
    return table


def plot_curves(results: Results, setup: EpochSetup, path: Path) -> Path:
    """Test accuracy against training CPU time, every run."""
    figure_module = require("matplotlib.figure", "demo", "the benchmark's plots")
    figure = figure_module.Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.subplots()
    colours: dict[str, str] = {}
    for row in results.select(setup=setup_key(setup)):
        points = parse_curve(row["curve"])
        label = row["policy"] if row["policy"] not in colours else None
        (line,) = axes.plot(
            [p[1] for p in points],
            [100 * p[3] for p in points],
            color=colours.get(row["policy"]),
            label=label,
            linewidth=1,
        )
        colours.setdefault(row["policy"], line.get_color())
    axes.set(
        xlabel="training CPU time (s, all threads)",
        ylabel="test accuracy (%)",
        title="CIFAR-10, ResNet-8",
    )
    axes.legend(fontsize="small")
    figure.savefig(path, dpi=100)
    return path
