"""Every policy on scikit-learn's digits over several seeds: mean and spread, resumable.

Each (policy, seed) run appends one row to ``policies.csv`` in the output folder; a later call
skips the rows already there, so an interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import csv
import statistics
from collections.abc import Sequence
from pathlib import Path

from .._optional import require
from ..demo import load_digits_split, train_run

__all__ = ["FIELDS", "format_policy_table", "run_policy_bench"]

FIELDS = (
    "policy",
    "seed",
    "data_fraction",
    "epochs",
    "test_accuracy",
    "steps",
    "samples_trained",
    "samples_probed",
    "wall_seconds",
)


def _read(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def run_policy_bench(
    policies: Sequence[str],
    seeds: Sequence[int],
    *,
    epochs: int = 30,
    data_fraction: float = 1.0,
    out_dir: str | Path = "bench-output",
    show_progress: bool = True,
) -> list[dict[str, str]]:
    """Run what is missing from ``out_dir/policies.csv``; return the rows for these settings."""
    tqdm = require("tqdm", "demo", "the benchmark").tqdm
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "policies.csv"
    rows = _read(path)
    key = (str(data_fraction), str(epochs))
    done = {(r["policy"], r["seed"]) for r in rows if (r["data_fraction"], r["epochs"]) == key}
    todo = [(p, s) for p in policies for s in seeds if (p, str(s)) not in done]
    total = sum(epochs * len(load_digits_split(seed, data_fraction)[2]) for _, seed in todo)
    with tqdm(total=total, desc="policies", unit="sample", disable=not show_progress) as progress:
        for policy, seed in todo:
            train, test, allowed = load_digits_split(seed, data_fraction)
            result = train_run(
                policy, train, test, allowed, seed=seed, epochs=epochs, progress=progress
            )
            row = {
                "policy": policy,
                "seed": str(seed),
                "data_fraction": str(data_fraction),
                "epochs": str(epochs),
                "test_accuracy": f"{result.test_accuracy:.6f}",
                "steps": str(result.steps),
                "samples_trained": str(result.samples_trained),
                "samples_probed": str(result.samples_probed),
                "wall_seconds": f"{result.train_seconds:.3f}",
            }
            new_file = not path.exists()
            with path.open("a", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=FIELDS)
                if new_file:
                    writer.writeheader()
                writer.writerow(row)
            rows.append(row)
    wanted = {(p, str(s)) for p in policies for s in seeds}
    return [
        r
        for r in rows
        if (r["policy"], r["seed"]) in wanted and (r["data_fraction"], r["epochs"]) == key
    ]


def _mean_std(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    mean = statistics.fmean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def format_policy_table(rows: list[dict[str, str]], policies: Sequence[str]) -> str:
    """A markdown table: one line per policy, mean ± sample std over its seeds."""
    lines = [
        "| policy | seeds | test acc % | steps | samples trained | samples probed | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for policy in policies:
        runs = [r for r in rows if r["policy"] == policy]
        if not runs:
            continue

        def col(field: str, runs: list[dict[str, str]] = runs) -> list[float]:
            return [float(r[field]) for r in runs]

        lines.append(
            f"| {policy} | {len(runs)} | {_mean_std(col('test_accuracy'), 100)} | "
            f"{statistics.fmean(col('steps')):.0f} | {statistics.fmean(col('samples_trained')):.0f} | "
            f"{statistics.fmean(col('samples_probed')):.0f} | {_mean_std(col('wall_seconds'))} |"
        )
    return "\n".join(lines)
