"""Every policy on scikit-learn's digits over several seeds: mean and spread, resumable.

Each (policy, seed) run appends one row to ``policies.csv`` in the output folder; a later call
skips the rows already there, so an interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

from adaptive_batch.optional import require

from ..demo import load_digits_split, train_run
from .common import Results, floats, markdown_table, mean_std

__all__ = ["FIELDS", "format_policy_table", "run_policy_bench"]

FIELDS = (
    "policy",
    "seed",
    "data_fraction",
    "epochs",
    "test_accuracy",
    "steps",
    "trained",
    "candidates",
    "wall_seconds",
)


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
    results = Results(
        out_dir, "policies", FIELDS, key=("policy", "seed", "data_fraction", "epochs")
    )
    # A string, as earlier releases wrote it ("1.0"), so their CSVs still resume.
    settings = {"data_fraction": str(data_fraction), "epochs": epochs}
    todo = [
        (p, s) for p in policies for s in seeds if not results.has(policy=p, seed=s, **settings)
    ]
    splits = {seed: load_digits_split(seed, data_fraction) for seed in {s for _, s in todo}}
    total = sum(epochs * len(splits[seed][2]) for _, seed in todo)
    with tqdm(total=total, desc="policies", unit="sample", disable=not show_progress) as progress:
        for policy, seed in todo:
            train, test, allowed = splits[seed]
            result = train_run(
                policy, train, test, allowed, seed=seed, epochs=epochs, progress=progress
            )
            results.add(
                {
                    "policy": policy,
                    "seed": seed,
                    **settings,
                    "test_accuracy": f"{result.test_accuracy:.6f}",
                    "steps": result.steps,
                    "trained": result.trained,
                    "candidates": result.candidates,
                    "wall_seconds": f"{result.train_seconds:.3f}",
                }
            )
    return [
        r for p in policies for s in seeds for r in results.select(policy=p, seed=s, **settings)
    ]


def format_policy_table(rows: list[dict[str, str]], policies: Sequence[str]) -> str:
    """A markdown table: one line per policy, mean ± sample std over its seeds."""
    header = [
        "policy",
        "seeds",
        "test acc %",
        "steps",
        "trained",
        "candidates",
        "wall s",
    ]
    table = []
    for policy in policies:
        runs = [r for r in rows if r["policy"] == policy]
        if runs:
            table.append(
                [
                    policy,
                    len(runs),
                    mean_std(floats(runs, "test_accuracy"), 100),
                    f"{statistics.fmean(floats(runs, 'steps')):.0f}",
                    f"{statistics.fmean(floats(runs, 'trained')):.0f}",
                    f"{statistics.fmean(floats(runs, 'candidates')):.0f}",
                    mean_std(floats(runs, "wall_seconds")),
                ]
            )
    return markdown_table(header, table)
