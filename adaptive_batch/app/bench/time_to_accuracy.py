"""Time to accuracy on full CIFAR-10: does a policy reach the fixed-batch baseline's final test
accuracy sooner, in wall time and in samples?

The baseline trains ResNet-8 with fixed batches of 100 for a set number of epochs, evaluating on a
fixed 2,000-image test subset every ``eval_every`` candidates. Each policy then trains with the
same optimizer until its evaluation reaches the baseline's final subset accuracy, or until it has
used the baseline's training time. Training time excludes evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch

from adaptive_batch.optional import require

from ..runner import RunResult, RunSpec, train
from .cifar import AugmentedImages, CifarData, evaluate
from .common import Results, floats, markdown_table, mean_std
from .models import cifar_resnet
from .scarce import CIFAR_OPTIMIZER

__all__ = ["format_time_to_accuracy", "run_time_to_accuracy"]

FIELDS = (
    "policy",
    "seed",
    "epochs",
    "target",
    "reached",
    "seconds_to_target",
    "candidates_to_target",
    "trained_to_target",
    "final_subset_accuracy",
    "final_test_accuracy",
    "train_seconds",
    "candidates",
    "indices_inside",
    "curve",
)
EVAL_IMAGES = 2000


def run_time_to_accuracy(
    data: CifarData,
    policies: Sequence[str],
    seeds: Sequence[int],
    *,
    epochs: int,
    eval_every: int,
    out_dir: str | Path,
    device: torch.device,
    show_progress: bool = True,
) -> Results:
    """Baseline first (per seed), then each policy against its target; resumable."""
    results = Results(out_dir, "time-to-accuracy", FIELDS, key=("policy", "seed", "epochs"))
    tqdm = require("tqdm", "demo", "the benchmark").tqdm
    eval_subset = torch.randperm(
        data.test_y.numel(), generator=torch.Generator().manual_seed(1234)
    )[:EVAL_IMAGES]
    on_subset = partial(evaluate, images=data.test_x[eval_subset], labels=data.test_y[eval_subset])
    everything = torch.arange(data.train_y.numel())
    for seed in seeds:
        names = ["fixed", *[p for p in policies if p != "fixed"]]
        todo = [p for p in names if not results.has(policy=p, seed=seed, epochs=epochs)]
        total = len(todo) * epochs * everything.numel()
        with tqdm(
            total=total,
            desc=f"time-to-accuracy seed {seed}",
            unit="sample",
            disable=not show_progress,
        ) as progress:
            for policy in todo:
                spec = RunSpec(
                    policy, seed=seed, eval_every=eval_every, optimizer=dict(CIFAR_OPTIMIZER)
                )
                if policy == "fixed":
                    spec.epochs = epochs
                else:
                    baseline = results.select(policy="fixed", seed=seed, epochs=epochs)[0]
                    spec.target_accuracy = float(baseline["target"])
                    spec.time_limit = float(baseline["train_seconds"])
                model_holder: list = []

                def make_model(holder: list = model_holder) -> torch.nn.Module:
                    holder.append(cifar_resnet())
                    return holder[-1]

                train_data = AugmentedImages(data.train_x, data.train_y, seed=seed)
                result = train(
                    spec,
                    make_model,
                    train_data,
                    everything,
                    evaluate=on_subset,
                    device=device,
                    progress=progress,
                )
                final_test = evaluate(model_holder[-1], data.test_x, data.test_y)
                results.add(_row(policy, seed, epochs, spec, result, final_test))
    return results


def _row(
    policy: str, seed: int, epochs: int, spec: RunSpec, result: RunResult, final_test: float
) -> dict:
    target = spec.target_accuracy if spec.target_accuracy is not None else result.curve[-1][3]
    reached = result.first_reaching(target)
    curve = ";".join(f"{s:.1f}:{p}:{a:.4f}" for s, p, _, a in result.curve)
    return {
        "policy": policy,
        "seed": seed,
        "epochs": epochs,
        "target": target,
        "reached": reached is not None,
        "seconds_to_target": reached[0] if reached else float("nan"),
        "candidates_to_target": reached[1] if reached else -1,
        "trained_to_target": reached[2] if reached else -1,
        "final_subset_accuracy": result.curve[-1][3],
        "final_test_accuracy": final_test,
        "train_seconds": result.train_seconds,
        "candidates": result.candidates,
        "indices_inside": result.indices_inside,
        "curve": curve,
    }


def format_time_to_accuracy(results: Results, policies: Sequence[str], epochs: int) -> str:
    header = [
        "policy",
        "seeds",
        "reached target",
        "time to target s",
        "time / baseline's training time",
        "candidates to target",
        "trained to target",
        "final test acc %",
        "train s",
    ]
    rows = []
    # The target: reach the baseline's final accuracy in at most half the baseline's training time.
    baseline_times = {
        r["seed"]: float(r["train_seconds"]) for r in results.select(policy="fixed", epochs=epochs)
    }
    for policy in ["fixed", *[p for p in policies if p != "fixed"]]:
        runs = results.select(policy=policy, epochs=epochs)
        if not runs:
            continue
        reached = [r for r in runs if r["reached"] == "True"]
        ratios = [
            float(r["seconds_to_target"]) / baseline_times[r["seed"]]
            for r in reached
            if r["seed"] in baseline_times
        ]
        rows.append(
            [
                policy,
                len(runs),
                f"{len(reached)}/{len(runs)}",
                mean_std(floats(reached, "seconds_to_target"), digits=0)
                if reached
                else "not reached",
                mean_std(ratios) if ratios else "—",
                mean_std(floats(reached, "candidates_to_target"), digits=0) if reached else "—",
                mean_std(floats(reached, "trained_to_target"), digits=0) if reached else "—",
                mean_std(floats(runs, "final_test_accuracy"), 100),
                mean_std(floats(runs, "train_seconds"), digits=0),
            ]
        )
    return markdown_table(header, rows)


def plot_curves(results: Results, epochs: int, path: Path) -> Path:
    """Subset accuracy against training time, every run."""
    figure_module = require("matplotlib.figure", "demo", "the benchmark's plots")
    figure = figure_module.Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.subplots()
    colours: dict[str, str] = {}
    for row in results.select(epochs=epochs):
        points = [tuple(map(float, p.split(":"))) for p in row["curve"].split(";") if p]
        seconds, accuracy = [p[0] for p in points], [100 * p[2] for p in points]
        label = row["policy"] if row["policy"] not in colours else None
        (line,) = axes.plot(
            seconds, accuracy, color=colours.get(row["policy"]), label=label, linewidth=1
        )
        colours.setdefault(row["policy"], line.get_color())
    axes.set(
        xlabel="training time (s)",
        ylabel=f"test accuracy on {EVAL_IMAGES} images (%)",
        title="CIFAR-10, ResNet-8",
    )
    axes.legend()
    figure.savefig(path, dpi=100)
    return path
