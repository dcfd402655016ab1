"""Time to accuracy on CIFAR-10, at equal samples: does a pruning policy beat the cheapest honest
ways of spending the same number of samples?

Every arm trains the same schedule (:class:`~.schedule.EpochSetup`: subset, network, optimizer,
cosine learning rate stepped per epoch) and is evaluated on all test images after every epoch,
the clock stopped. Beside the full fixed run, each policy ``P`` that trains on a fraction ``f`` of
the full run's samples gets two controls, run per seed at that seed's ``f``:

* ``short@P``: the fixed run with its schedule shortened to ``round(f * epochs)`` epochs (the
  cosine anneals over them);
* ``rs2@P``: RS2 (:class:`~adaptive_batch.policies.RandomSubset`), a fresh random ``f`` of the
  data each epoch over the full schedule.

The *saving at equal accuracy* of an arm is ``1 - (its samples / the samples a plain run needs to
reach its final accuracy)``, the latter interpolated linearly between the plain runs of the seed
(the shortened schedules and the full one): what the arm saves over simply training less.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Sequence
from pathlib import Path

import torch

from adaptive_batch.optional import require

from .cifar import CifarData
from .common import Results, floats, markdown_table, mean_std, reached_cell
from .schedule import EpochSetup, curve_cell, parse_curve, run_epochs

__all__ = [
    "control_run",
    "format_time_to_accuracy",
    "plain_samples_for",
    "plot_curves",
    "run_time_to_accuracy",
    "setup_key",
]

FIELDS = (
    "policy",
    "seed",
    "setup",
    "epochs",
    "fraction",
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
#: A policy that trains on more than this fraction of the full run's samples gets no controls.
CONTROL_BELOW = 0.98
CONTROLS = ("short", "rs2")


def setup_key(setup: EpochSetup) -> str:
    """The settings a stored row must match to count for this setup."""
    opt = setup.optimizer
    key = (
        f"{setup.model}/{setup.subset}/{setup.epochs}/{setup.batch_size}/{opt['lr']}/"
        f"{opt['weight_decay']}"
    )
    return key if setup.augment else key + "/plain"


def control_name(kind: str, policy: str) -> str:
    return f"{kind}@{policy}"


def control_run(kind: str, fraction: float, epochs: int) -> tuple[str, int | None]:
    """How a control at ``fraction`` of the full run's samples runs: ``(run name, epochs)``
    (``None``: the full schedule). ``"short"``: the fixed run over ``round(fraction * epochs)``
    epochs; ``"rs2"``: RS2 at ``fraction`` over the full schedule.

    Example:
        >>> control_run("short", 0.74, 32), control_run("rs2", 0.74, 32)
        (('fixed', 24), ('rs2-0.7400', None))
    """
    if kind == "short":
        return "fixed", max(1, round(fraction * epochs))
    return f"rs2-{fraction:.4f}", None


def run_time_to_accuracy(
    data: CifarData,
    policies: Sequence[str],
    seeds: Sequence[int],
    *,
    setup: EpochSetup,
    out_dir: str | Path,
    device: torch.device,
    show_progress: bool = True,
    controls: Sequence[str] = CONTROLS,
) -> Results:
    """Per seed: the full fixed run, every policy, then each policy's ``controls`` at the
    fraction of samples it trained on (none: an ablation beside runs controlled already);
    resumable: rows already in ``out_dir`` are not run again."""
    results = Results(out_dir, "time-to-accuracy", FIELDS, key=("policy", "seed", "setup"))
    tqdm = require("tqdm", "demo", "the benchmark").tqdm
    key = setup_key(setup)
    arms = ["fixed", *[p for p in policies if p != "fixed"]]
    images = setup.subset or data.train_y.numel()
    pending = [
        (seed, arm)
        for seed in seeds
        for arm in [*arms, *(control_name(k, p) for p in arms[1:] for k in controls)]
        if not results.has(policy=arm, seed=seed, setup=key)
    ]
    with tqdm(
        total=len(pending) * setup.epochs * images,
        desc="time-to-accuracy",
        unit="sample",
        disable=not show_progress,
    ) as progress:
        for seed in seeds:
            for arm in arms:
                if not results.has(policy=arm, seed=seed, setup=key):
                    _run_arm(results, data, arm, arm, seed, setup, device, progress, out_dir)
            fixed = results.select(policy="fixed", seed=seed, setup=key)[0]
            for policy in arms[1:]:
                row = results.select(policy=policy, seed=seed, setup=key)[0]
                fraction = float(row["trained"]) / float(fixed["trained"])
                for kind in controls:
                    name = control_name(kind, policy)
                    if results.has(policy=name, seed=seed, setup=key):
                        continue  # stored: not counted in the bar's total
                    if fraction > CONTROL_BELOW:  # no control needed: counted, so step over it
                        progress.update(setup.epochs * images)
                        continue
                    run_as, epochs = control_run(kind, fraction, setup.epochs)
                    _run_arm(
                        results, data, name, run_as, seed, setup, device, progress, out_dir,
                        epochs=epochs, fraction=fraction,
                    )  # fmt: skip
    return results


def _run_arm(
    results: Results,
    data: CifarData,
    name: str,
    run_as: str,
    seed: int,
    setup: EpochSetup,
    device: torch.device,
    progress: object,
    out_dir: str | Path,
    *,
    epochs: int | None = None,
    fraction: float | None = None,
) -> None:
    trajectory = Path(out_dir) / "trajectories" / f"time-to-accuracy-{name}-{seed}.csv"
    result = run_epochs(
        data,
        run_as,
        seed,
        setup,
        device=device,
        progress=progress,
        trajectory=trajectory,
        epochs=epochs,
    )
    results.add(
        {
            "policy": name,
            "seed": seed,
            "setup": setup_key(setup),
            "epochs": epochs or setup.epochs,
            "fraction": "" if fraction is None else f"{fraction:.4f}",
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


def samples_to(row: dict[str, str], target: float) -> int | None:
    """Samples trained at the first evaluation reaching ``target`` (``None``: never)."""
    for _, _, trained, accuracy in parse_curve(row["curve"]):
        if accuracy >= target:
            return trained
    return None


def plain_samples_for(accuracy: float, plain: Sequence[tuple[float, float]]) -> tuple[float, str]:
    """The samples (as a fraction of the full run's) a plain run needs to end at ``accuracy``,
    interpolated linearly between the plain runs ``(fraction, final accuracy)``; and ``""``,
    ``">"`` or ``"<"`` when it lies beyond them (the nearest end is returned, a bound).

    Example:
        >>> needed, bound = plain_samples_for(0.65, [(0.5, 0.60), (1.0, 0.70)])
        >>> round(needed, 6), bound
        (0.75, '')
        >>> plain_samples_for(0.72, [(0.5, 0.60), (1.0, 0.70)])
        (1.0, '>')
    """
    points = sorted(plain)
    if accuracy >= points[-1][1]:
        return points[-1][0], ">" if accuracy > points[-1][1] else ""
    if accuracy < points[0][1]:
        return points[0][0], "<"
    for (f0, a0), (f1, a1) in itertools.pairwise(points):
        if a0 <= accuracy <= a1 and a1 > a0:
            return f0 + (accuracy - a0) / (a1 - a0) * (f1 - f0), ""
    # The plain runs are not monotone in samples here: the smallest that reaches it.
    return min(f for f, a in points if a >= accuracy), ""


def _saving(
    row: dict[str, str], fixed: dict[str, str], plain: list[tuple[float, float]]
) -> tuple[float, str]:
    """The saving at equal accuracy, and ``">="`` / ``"<="`` where it is only a bound (the arm's
    accuracy lies beyond every plain run of the seed)."""
    fraction = float(row["trained"]) / float(fixed["trained"])
    needed, bound = plain_samples_for(float(row["final_accuracy"]), plain)
    return 1 - fraction / needed, {"": "", ">": ">=", "<": "<="}[bound]


def _savings_cell(savings: list[tuple[float, str]]) -> str:
    if all(bound == "" for _, bound in savings):
        return mean_std([value for value, _ in savings], 100, digits=1) + " %"
    return " / ".join(f"{bound}{100 * value:.0f}%" for value, bound in savings)


def format_time_to_accuracy(results: Results, policies: Sequence[str], setup: EpochSetup) -> str:
    """The table (mean ± std over seeds), then each policy against its controls, paired by seed."""
    key = setup_key(setup)
    fixed_of = {r["seed"]: r for r in results.select(policy="fixed", setup=key)}
    arms = ["fixed"]
    for policy in [p for p in policies if p != "fixed"]:
        arms += [policy, *(control_name(k, policy) for k in CONTROLS)]
    plain: dict[str, list[tuple[float, float]]] = {}
    for seed, fixed in fixed_of.items():
        plain[seed] = [(1.0, float(fixed["final_accuracy"]))] + [
            (float(r["trained"]) / float(fixed["trained"]), float(r["final_accuracy"]))
            for r in results.rows
            if r["setup"] == key and r["seed"] == seed and r["policy"].startswith("short@")
        ]
    header = [
        "arm",
        "seeds",
        "final acc %",
        "best acc %",
        "samples (x full)",
        "steps",
        "samples to full's final (x)",
        "to 99% of it (x)",
        "saving at equal acc",
        "train CPU s",
        "train wall s",
    ]
    rows = []
    for arm in arms:
        runs = [r for r in results.select(policy=arm, setup=key) if r["seed"] in fixed_of]
        if not runs:
            continue
        fractions, to_final, to_99, savings = [], [], [], []
        for run in runs:
            fixed = fixed_of[run["seed"]]
            full = float(fixed["trained"])
            fractions.append(float(run["trained"]) / full)
            target = float(fixed["final_accuracy"])
            reached = samples_to(run, target)
            reached_99 = samples_to(run, 0.99 * target)
            to_final.append(None if reached is None else reached / full)
            to_99.append(None if reached_99 is None else reached_99 / full)
            savings.append(_saving(run, fixed, plain[run["seed"]]))
        rows.append(
            [
                arm,
                len(runs),
                mean_std(floats(runs, "final_accuracy"), 100),
                mean_std(floats(runs, "best_accuracy"), 100),
                mean_std(fractions),
                f"{statistics.fmean(floats(runs, 'steps')):.0f}",
                reached_cell(to_final),
                reached_cell(to_99),
                _savings_cell(savings),
                mean_std(floats(runs, "cpu_seconds"), digits=0),
                mean_std(floats(runs, "train_seconds"), digits=0),
            ]
        )
    table = markdown_table(header, rows)
    paired = _paired(results, key, [p for p in policies if p != "fixed"])
    if paired:
        table += "\n\n" + paired
    gains = []
    for baseline in fixed_of.values():
        curve = [point[3] for point in parse_curve(baseline["curve"])]
        if len(curve) >= 5:
            gains.append(curve[-1] - curve[int(0.8 * len(curve)) - 1])
    if gains:
        table += (
            f"\n\nThe full run's last 20% of epochs added {mean_std(gains, 100)} points of test "
            "accuracy (mean ± std over seeds)."
        )
    return table


def _paired(results: Results, key: str, policies: Sequence[str]) -> str:
    """Each policy's final accuracy minus each comparison's, seed by seed."""
    rows = []
    for policy in policies:
        mine = {
            r["seed"]: float(r["final_accuracy"]) for r in results.select(policy=policy, setup=key)
        }
        for other in ("fixed", *(control_name(k, policy) for k in CONTROLS)):
            theirs = {
                r["seed"]: float(r["final_accuracy"])
                for r in results.select(policy=other, setup=key)
            }
            seeds = sorted(set(mine) & set(theirs))
            if not seeds:
                continue
            diffs = [mine[s] - theirs[s] for s in seeds]
            wins = sum(d > 0 for d in diffs)
            rows.append([policy, other, mean_std(diffs, 100), f"{wins}/{len(seeds)}"])
    if not rows:
        return ""
    return "Paired by seed (final accuracy, points):\n\n" + markdown_table(
        ["policy", "minus", "difference", "seeds it is ahead"], rows
    )


def plot_curves(results: Results, setup: EpochSetup, path: Path) -> Path:
    """Test accuracy against samples trained, every run."""
    figure_module = require("matplotlib.figure", "demo", "the benchmark's plots")
    figure = figure_module.Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.subplots()
    colours: dict[str, str] = {}
    for row in results.select(setup=setup_key(setup)):
        points = parse_curve(row["curve"])
        label = row["policy"] if row["policy"] not in colours else None
        (line,) = axes.plot(
            [p[2] for p in points],
            [100 * p[3] for p in points],
            color=colours.get(row["policy"]),
            label=label,
            linewidth=1,
        )
        colours.setdefault(row["policy"], line.get_color())
    axes.set(
        xlabel="samples trained",
        ylabel="test accuracy (%)",
        title=f"CIFAR-10, {setup.model}, {setup.epochs} epochs",
    )
    axes.legend(fontsize="small")
    figure.savefig(path, dpi=100)
    return path
