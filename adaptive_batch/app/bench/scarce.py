"""Data-scarce training in the EDBA paper's layout, on CIFAR-10, and DBA's analog on digits.

Every run gets the same budget of candidates (samples the loader provides, whatever the policy
keeps), so small subsets are seen for many epochs. Each row records the check that every index
the sampler used lay in the allowed subset: the seeds' data-scarce figures are far beyond known
results, and leakage from outside the subset is the first thing to rule out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from adaptive_batch.optional import require

from ..demo import accuracy as digits_accuracy
from ..demo import load_digits_split
from ..runner import RunResult, RunSpec, train
from .cifar import AugmentedImages, CifarData, evaluate, stratified_subset
from .common import Results, floats, markdown_table, mean_std
from .models import cifar_resnet, mlp

__all__ = [
    "CIFAR_POLICIES",
    "CIFAR_SUBSETS",
    "DIGITS_SUBSETS",
    "format_scarce",
    "plot_scarce",
    "run_cifar_scarce",
    "run_digits_scarce",
]

# DBA needs per-sample gradients of every layer, which BatchNorm in training mode does not have:
# it runs on the digits MLP only. "constant" equals "fixed" plus the probe's cost.
CIFAR_POLICIES = (
    "fixed",
    "edba",
    "selective-backprop",
    "gns",
    "cabs",
    "adadamp",
    "padadamp",
    "geodamp",
    "arbiter",
)
DIGITS_POLICIES = (
    "fixed",
    "dba",
    "edba",
    "selective-backprop",
    "gns",
    "cabs",
    "adadamp",
    "arbiter",
)
CIFAR_SUBSETS = {"100-samples": 100, "1pct": 500, "10pct": 5000}  # of the 50,000 training images
DIGITS_SUBSETS = {"10-per-class": 100, "1pct": 13}  # of the 1,347 training digits

# The EDBA paper's CIFAR-10 table (test %, 5 seeds), for the report.
PAPER_CIFAR = {
    "fixed": {"100-samples": "23.80 ± 1.09", "1pct": "40.52 ± 1.36", "10pct": "71.65 ± 0.09"},
    "edba": {"100-samples": "90.69 ± 0.17", "1pct": "91.51 ± 0.22", "10pct": "91.65 ± 0.17"},
}
# SGD with the EDBA paper's Nesterov momentum 0.9; its learning rate (1e-3 for 300 epochs of
# PreResNet56) raised to 0.05 and its weight decay (1e-5) to 5e-4 for short CPU runs of ResNet-8.
CIFAR_OPTIMIZER = {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}
FIELDS = (
    "subset",
    "policy",
    "seed",
    "budget",
    "test_accuracy",
    "steps",
    "trained",
    "candidates",
    "train_seconds",
    "indices_inside",
)


def _run_subsets(
    part: str,
    subsets: Sequence[str],
    policies: Sequence[str],
    seeds: Sequence[int],
    budget: int,
    out_dir: str | Path,
    show_progress: bool,
    run_one: Callable[[str, RunSpec, Any], RunResult],
) -> Results:
    """Every (subset, seed, policy) run not yet in ``<out>/<part>.csv``, seed by seed."""
    results = Results(out_dir, part, FIELDS, key=("subset", "policy", "seed", "budget"))
    todo = [
        (s, p, seed)
        for s in subsets
        for seed in seeds
        for p in policies
        if not results.has(subset=s, policy=p, seed=seed, budget=budget)
    ]
    tqdm = require("tqdm", "demo", "the benchmark").tqdm
    with tqdm(
        total=len(todo) * budget, desc=part, unit="sample", disable=not show_progress
    ) as progress:
        for subset, policy, seed in todo:
            spec = RunSpec(policy, seed=seed, candidate_budget=budget)
            result = run_one(subset, spec, progress)
            results.add(_row(subset, policy, seed, budget, result))
    return results


def run_cifar_scarce(
    data: CifarData,
    subsets: Sequence[str],
    policies: Sequence[str],
    seeds: Sequence[int],
    *,
    budget: int,
    out_dir: str | Path,
    device: torch.device,
    show_progress: bool = True,
) -> Results:
    """ResNet-8 on stratified CIFAR-10 subsets, ``budget`` candidates per run; resumable."""

    def run_one(subset: str, spec: RunSpec, progress: Any) -> RunResult:
        spec.optimizer = dict(CIFAR_OPTIMIZER)
        return train(
            spec,
            cifar_resnet,
            AugmentedImages(data.train_x, data.train_y, seed=spec.seed),
            stratified_subset(data.train_y, CIFAR_SUBSETS[subset], spec.seed),
            evaluate=partial(evaluate, images=data.test_x, labels=data.test_y),
            device=device,
            progress=progress,
        )

    return _run_subsets(
        "scarce-cifar", subsets, policies, seeds, budget, out_dir, show_progress, run_one
    )


def run_digits_scarce(
    subsets: Sequence[str],
    policies: Sequence[str],
    seeds: Sequence[int],
    *,
    budget: int,
    out_dir: str | Path,
    show_progress: bool = True,
) -> Results:
    """DBA's analog: a one-hidden-layer MLP on stratified digits subsets; resumable."""

    def run_one(subset: str, spec: RunSpec, progress: Any) -> RunResult:
        train_data, test, _ = load_digits_split(spec.seed, 1.0)
        spec.optimizer = {"lr": 0.05, "momentum": 0.9, "nesterov": True}
        return train(
            spec,
            partial(mlp, 64, 128, 10),
            train_data,
            stratified_subset(train_data.tensors[1], DIGITS_SUBSETS[subset], spec.seed),
            evaluate=partial(digits_accuracy, data=test),
            progress=progress,
        )

    return _run_subsets(
        "scarce-digits", subsets, policies, seeds, budget, out_dir, show_progress, run_one
    )


def _row(subset: str, policy: str, seed: int, budget: int, result: RunResult) -> dict[str, Any]:
    return {
        "subset": subset,
        "policy": policy,
        "seed": seed,
        "budget": budget,
        "test_accuracy": result.test_accuracy,
        "steps": result.steps,
        "trained": result.trained,
        "candidates": result.candidates,
        "train_seconds": result.train_seconds,
        "indices_inside": result.indices_inside,
    }


def format_scarce(
    results: Results,
    subsets: Sequence[str],
    policies: Sequence[str],
    budget: int,
    paper: dict | None = None,
) -> str:
    """Test accuracy %, mean ± std over seeds: a row per policy, a column per subset (and the
    paper's figure beside ours where there is one)."""
    header = ["policy"]
    for subset in subsets:
        header += [f"{subset} (ours)"] + ([f"{subset} (paper)"] if paper else [])
    header += ["seeds", "train s (mean)", "index check"]
    rows = []
    for policy in policies:
        runs = [r for r in results.select(policy=policy, budget=budget) if r["subset"] in subsets]
        if not runs:
            continue
        row = [policy]
        for subset in subsets:
            subset_runs = [r for r in runs if r["subset"] == subset]
            row.append(mean_std(floats(subset_runs, "test_accuracy"), 100))
            if paper:
                row.append(paper.get(policy, {}).get(subset, "—"))
        seeds = sorted({r["seed"] for r in runs})
        seconds = floats(runs, "train_seconds")
        inside = all(r["indices_inside"] == "True" for r in runs)
        row += [
            len(seeds),
            f"{sum(seconds) / len(seconds):.0f}",
            "all inside" if inside else "LEAK",
        ]
        rows.append(row)
    return markdown_table(header, rows)


def plot_scarce(
    results: Results, subsets: Sequence[str], policies: Sequence[str], budget: int, path: Path
) -> Path:
    """Test accuracy per subset: a bar per policy (mean over seeds), the spread as error bars."""
    figure_module = require("matplotlib.figure", "demo", "the benchmark's plots")
    figure = figure_module.Figure(figsize=(8, 4), layout="constrained")
    axes = figure.subplots()
    width = 0.8 / max(len(policies), 1)
    for rank, policy in enumerate(policies):
        means, spreads = [], []
        for subset in subsets:
            values = [
                100 * v
                for v in floats(
                    results.select(policy=policy, subset=subset, budget=budget), "test_accuracy"
                )
            ]
            means.append(sum(values) / len(values) if values else float("nan"))
            spreads.append(torch.tensor(values).std().item() if len(values) > 1 else 0.0)
        positions = [i + (rank - (len(policies) - 1) / 2) * width for i in range(len(subsets))]
        axes.bar(positions, means, width, yerr=spreads, label=policy, capsize=2)
    axes.set_xticks(range(len(subsets)), list(subsets))
    axes.set(
        ylabel="test accuracy (%)", title=f"{budget} candidates per run, mean and std over seeds"
    )
    axes.legend(fontsize="small", ncols=3)
    figure.savefig(path, dpi=90)
    return path
