"""The demo: fixed batches vs an adaptive policy on scikit-learn's digits, side by side.

Both runs share the model initialisation, optimizer settings, data split and number of epochs;
only the batches differ. The fixed run is what a PyTorch user does today (a shuffled
``DataLoader``); the adaptive run adds the sampler, its stage (feedback from the training step,
the look-ahead filter, or for DBA the per-layer backward) and the policy's learning-rate
coupling where its paper has one (see ``recipes.py``).
"""

from __future__ import annotations

import bisect
import itertools
import json
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from adaptive_batch.optional import require

from .recipes import DEFAULT_POLICY, POLICY_NAMES
from .runner import RunResult, RunSpec, train

__all__ = ["RunResult", "load_digits_split", "run_demo", "train_run"]

# SGD with the EDBA paper's Nesterov momentum 0.9 and weight decay 1e-5; its learning rate (1e-3,
# for PreResNet56 over hundreds of epochs) is raised to 0.05 so this small MLP trains in seconds.
OPTIMIZER = {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-5}


def load_digits_split(
    seed: int, data_fraction: float
) -> tuple[TensorDataset, TensorDataset, torch.Tensor]:
    """Digits scaled to [0, 1], a stratified 75/25 split, and the training indices to use."""
    datasets = require("sklearn.datasets", "demo", "the demo")
    model_selection = require("sklearn.model_selection", "demo", "the demo")
    features, labels = datasets.load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = model_selection.train_test_split(
        features / 16.0, labels, test_size=0.25, stratify=labels, random_state=seed
    )

    def tensors(x: Any, y: Any) -> TensorDataset:
        return TensorDataset(
            torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.long)
        )

    train = tensors(x_train, y_train)
    count = max(1, round(data_fraction * len(train)))
    allowed = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:count]
    return train, tensors(x_test, y_test), allowed.sort().values


def make_model() -> nn.Module:
    """The demo's MLP: 64 pixels, one hidden layer of 128, 10 classes."""
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def accuracy(model: nn.Module, data: TensorDataset) -> float:
    model.eval()
    with torch.no_grad():
        x, y = data.tensors
        device = next(model.parameters()).device
        return (model(x.to(device)).argmax(dim=1).cpu() == y).float().mean().item()


def train_run(
    name: str,
    train_data: TensorDataset,
    test: TensorDataset,
    allowed: torch.Tensor,
    *,
    seed: int,
    epochs: int,
    progress: Any = None,
    trajectory: str | Path | None = None,
) -> RunResult:
    """Train the demo MLP for ``epochs`` with ``name`` ("fixed", "fixed-<size>" or a policy),
    evaluating on the test split after every epoch."""
    spec = RunSpec(name, seed=seed, epochs=epochs, optimizer=dict(OPTIMIZER), eval_each_epoch=True)
    return train(
        spec,
        make_model,
        train_data,
        allowed,
        evaluate=partial(accuracy, data=test),
        progress=progress,
        trajectory=trajectory,
    )


def run_demo(
    *,
    seed: int = 0,
    data_fraction: float = 1.0,
    epochs: int = 30,
    out_dir: str | Path = "demo-output",
    policy: str = DEFAULT_POLICY,
    show_progress: bool = True,
) -> list[RunResult]:
    """Train twice (fixed batches, then ``policy``), print a table, save a plot, the policy's
    trajectory (CSV) and a JSON summary."""
    if not 0.0 < data_fraction <= 1.0:
        raise ValueError(f"data_fraction must lie in (0, 1]; got {data_fraction}")
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1; got {epochs}")
    if policy not in POLICY_NAMES:
        raise ValueError(f"unknown policy {policy!r}; choose from {', '.join(POLICY_NAMES)}")
    tqdm = require("tqdm", "demo", "the demo").tqdm
    train, test, allowed = load_digits_split(seed, data_fraction)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trajectory = out / f"trajectory-{policy}.csv"
    per_run = epochs * len(allowed)  # candidates of a run that draws every sample every epoch
    results = []
    with tqdm(total=2 * per_run, desc="demo", unit="sample", disable=not show_progress) as progress:
        for name in ("fixed", policy):
            result = train_run(
                name,
                train,
                test,
                allowed,
                seed=seed,
                epochs=epochs,
                progress=progress,
                trajectory=trajectory if name == policy else None,
            )
            progress.total -= per_run - result.candidates  # a pruned run draws fewer
            progress.refresh()
            results.append(result)
    print(format_table(results, seed=seed, data_fraction=data_fraction, num_train=len(allowed)))
    title = (
        f"fixed batches vs {policy} on scikit-learn's digits ({len(allowed)} training samples), "
        f"seed {seed}, {epochs} epochs"
    )
    save_plot(results, out / "demo.png", title=title)
    (out / "results.json").write_text(json.dumps([summary(r) for r in results], indent=2) + "\n")
    print(
        f"index set check: every index the sampler used lies in the {len(allowed)}-sample training subset"
    )
    written = [out / "demo.png", out / "results.json"]
    if trajectory.exists():
        written.append(trajectory)
    print(f"wrote {', '.join(str(path) for path in written)}")
    return results


def summary(result: RunResult) -> dict[str, Any]:
    row = {k: v for k, v in asdict(result).items() if not isinstance(v, list)}
    return {**row, "mean_batch_size": result.mean_batch_size}


COLUMNS = [
    ("run", "{:<18}", lambda r, base: r.name),
    ("test acc %", "{:>10}", lambda r, base: f"{100 * r.test_accuracy:.2f}"),
    ("best acc %", "{:>10}", lambda r, base: f"{100 * r.best_accuracy:.2f}"),
    ("steps", "{:>6}", lambda r, base: str(r.steps)),
    ("trained", "{:>8}", lambda r, base: str(r.trained)),
    ("candidates", "{:>10}", lambda r, base: str(r.candidates)),
    ("trained vs fixed", "{:>16}", lambda r, base: f"{r.trained / max(base.trained, 1):.2f}x"),
    ("mean batch", "{:>10}", lambda r, base: f"{r.mean_batch_size:.1f}"),
    ("train s", "{:>7}", lambda r, base: f"{r.train_seconds:.2f}"),
]


def format_table(
    results: list[RunResult], *, seed: int, data_fraction: float, num_train: int
) -> str:
    """One row per run; ``trained vs fixed`` is against the first run (the fixed baseline)."""
    header = " | ".join(fmt.format(name) for name, fmt, _ in COLUMNS)
    lines = [
        f"digits, seed {seed}, {num_train} training samples ({100 * data_fraction:g}% of the split)",
        header,
        "-" * len(header),
    ]
    base = results[0]
    lines += [" | ".join(fmt.format(get(r, base)) for _, fmt, get in COLUMNS) for r in results]
    return "\n".join(lines)


def _moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _epochs(result: RunResult, processed: list[int]) -> list[tuple[int, int, int, float, float]]:
    """Per epoch: (samples processed at its end, candidates, trained, mean candidate batch, mean
    trained batch), from the evaluation after each epoch; ``processed``: samples processed after
    each step."""
    rows, step, before = [], 0, (0, 0)
    for _, candidates, trained, _ in result.curve:
        end = bisect.bisect_right(processed, candidates)
        steps = max(end - step, 1)
        drawn, kept = candidates - before[0], trained - before[1]
        rows.append((candidates, drawn, kept, drawn / steps, kept / steps))
        step, before = end, (candidates, trained)
    return rows


def save_plot(results: list[RunResult], path: Path, *, title: str = "") -> Path:
    """Save :func:`demo_figure` to ``path``."""
    demo_figure(results, title=title).savefig(path, dpi=90)
    return path


def demo_figure(results: list[RunResult], *, title: str = "") -> Any:
    """Test accuracy, training loss, batch size and samples per epoch against samples processed
    (each sample the loader provided: what the run paid for), and test accuracy and seconds per
    epoch against training seconds (what the run cost in time), one colour per run; dotted: the
    candidates a run drew, where it trained on fewer (matplotlib, no display needed)."""
    figure_module = require("matplotlib.figure", "demo", "the demo's plot")
    figure = figure_module.Figure(figsize=(15, 7.5), layout="constrained")
    (accuracy_axes, time_axes, loss_axes), (size_axes, epoch_axes, pace_axes) = figure.subplots(
        2, 3
    )
    if title:
        figure.suptitle(title)
    for result in results:
        processed = list(itertools.accumulate(result.candidate_sizes))
        (line,) = accuracy_axes.plot(
            [c for _, c, _, _ in result.curve],
            [100 * a for _, _, _, a in result.curve],
            marker="o",
            markersize=2.5,
            linewidth=1.2,
            label=f"{result.name}: {100 * result.test_accuracy:.1f}%, {result.trained} trained",
        )
        colour = line.get_color()
        seconds = [t for t, _, _, _ in result.curve]
        time_axes.plot(
            seconds, [100 * a for _, _, _, a in result.curve], color=colour, marker="o",
            markersize=2.5, linewidth=1.2, label=f"{result.name}: {result.train_seconds:.2f} s",
        )  # fmt: skip
        pace_axes.plot(
            seconds, [b - a for a, b in zip([0.0, *seconds], seconds, strict=False)],
            color=colour, marker="o", markersize=2.5, linewidth=1.2, label=result.name,
        )  # fmt: skip
        window = max(1, len(result.losses) // 40)
        loss_axes.plot(
            processed, _moving_average(result.losses, window), color=colour, linewidth=1.2,
            label=result.name,
        )  # fmt: skip
        epochs = _epochs(result, processed)
        ends = [row[0] for row in epochs]
        drew_more = any(row[1] != row[2] for row in epochs)
        for axes, trained_column, drawn_column in ((size_axes, 4, 3), (epoch_axes, 2, 1)):
            axes.plot(
                ends, [row[trained_column] for row in epochs], color=colour, linewidth=1.2,
                marker="o", markersize=2.5, label=f"{result.name}: trained",
            )  # fmt: skip
            if drew_more:
                axes.plot(
                    ends, [row[drawn_column] for row in epochs], color=colour, linewidth=1.0,
                    linestyle=":", label=f"{result.name}: candidates",
                )  # fmt: skip
    accuracy_axes.set(ylabel="test accuracy (%)", title="test accuracy after each epoch")
    loss_axes.set(ylabel="training loss (moving average)", yscale="log", title="training loss")
    size_axes.set(ylabel="samples per step (epoch mean)", title="batch size")
    epoch_axes.set(ylabel="samples per epoch", title="samples per epoch")
    time_axes.set(ylabel="test accuracy (%)", title="test accuracy against training time")
    pace_axes.set(ylabel="training seconds per epoch", title="time per epoch")
    for axes in (size_axes, epoch_axes, pace_axes):
        axes.set_ylim(bottom=0)
    for axes in (accuracy_axes, loss_axes, size_axes, epoch_axes):
        axes.set_xlabel("samples processed")
    for axes in (time_axes, pace_axes):
        axes.set_xlabel("training seconds (evaluation excluded)")
    for axes in (accuracy_axes, time_axes, loss_axes, size_axes, epoch_axes, pace_axes):
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    return figure
