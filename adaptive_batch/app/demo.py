"""The demo: fixed batches vs an adaptive policy on scikit-learn's digits, side by side.

Both runs share the model initialisation, optimizer settings, data split and number of epochs;
only the batches differ. The fixed run is what a PyTorch user does today (a shuffled
``DataLoader``); the adaptive run adds the sampler, the filter (or, for DBA, the per-layer
backward) and the policy's learning-rate coupling where its paper has one (see ``recipes.py``).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from adaptive_batch.optional import require

from .recipes import POLICY_NAMES
from .runner import RunResult, RunSpec, fixed_batch_size, train

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
) -> RunResult:
    """Train the demo MLP for ``epochs`` with ``name`` ("fixed", "fixed-<size>" or a policy)."""
    spec = RunSpec(name, seed=seed, epochs=epochs, optimizer=dict(OPTIMIZER))
    return train(
        spec,
        make_model,
        train_data,
        allowed,
        evaluate=partial(accuracy, data=test),
        progress=progress,
    )


def run_demo(
    *,
    seed: int = 0,
    data_fraction: float = 1.0,
    epochs: int = 30,
    out_dir: str | Path = "demo-output",
    policy: str = "edba",
    show_progress: bool = True,
) -> list[RunResult]:
    """Train twice (fixed batches, then ``policy``), print a table, save a plot and JSON."""
    if not 0.0 < data_fraction <= 1.0:
        raise ValueError(f"data_fraction must lie in (0, 1]; got {data_fraction}")
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1; got {epochs}")
    if policy not in POLICY_NAMES:
        raise ValueError(f"unknown policy {policy!r}; choose from {', '.join(POLICY_NAMES)}")
    tqdm = require("tqdm", "demo", "the demo").tqdm
    train, test, allowed = load_digits_split(seed, data_fraction)
    total = 2 * epochs * len(allowed)
    with tqdm(total=total, desc="demo", unit="sample", disable=not show_progress) as progress:
        results = [
            train_run(name, train, test, allowed, seed=seed, epochs=epochs, progress=progress)
            for name in ("fixed", policy)
        ]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(format_table(results, seed=seed, data_fraction=data_fraction, num_train=len(allowed)))
    save_plot(results, out / "demo.png")
    (out / "results.json").write_text(json.dumps([summary(r) for r in results], indent=2) + "\n")
    print(
        f"index set check: every index the sampler used lies in the {len(allowed)}-sample training subset"
    )
    print(f"wrote {out / 'demo.png'} and {out / 'results.json'}")
    return results


def summary(result: RunResult) -> dict[str, Any]:
    row = {k: v for k, v in asdict(result).items() if not isinstance(v, list)}
    return {**row, "mean_batch_size": result.mean_batch_size}


COLUMNS = [
    ("run", "{:<18}", lambda r: r.name),
    ("test acc %", "{:>10}", lambda r: f"{100 * r.test_accuracy:.2f}"),
    ("steps", "{:>6}", lambda r: str(r.steps)),
    ("trained", "{:>8}", lambda r: str(r.trained)),
    ("candidates", "{:>10}", lambda r: str(r.candidates)),
    ("mean batch", "{:>10}", lambda r: f"{r.mean_batch_size:.1f}"),
    ("train s", "{:>7}", lambda r: f"{r.train_seconds:.2f}"),
]


def format_table(
    results: list[RunResult], *, seed: int, data_fraction: float, num_train: int
) -> str:
    header = " | ".join(fmt.format(name) for name, fmt, _ in COLUMNS)
    lines = [
        f"digits, seed {seed}, {num_train} training samples ({100 * data_fraction:g}% of the split)",
        header,
        "-" * len(header),
    ]
    lines += [" | ".join(fmt.format(get(r)) for _, fmt, get in COLUMNS) for r in results]
    return "\n".join(lines)


def save_plot(results: list[RunResult], path: Path) -> Path:
    """Training loss and batch size per step for each run (matplotlib, no display needed)."""
    figure_module = require("matplotlib.figure", "demo", "the demo's plot")
    figure = figure_module.Figure(figsize=(10, 4), layout="constrained")
    loss_axes, size_axes = figure.subplots(1, 2)
    for result in results:
        (line,) = loss_axes.plot(result.losses, label=result.name, linewidth=1)
        size_axes.plot(
            result.batch_sizes,
            color=line.get_color(),
            label=f"{result.name}: trained on",
            linewidth=1,
        )
        if fixed_batch_size(result.name) is None:
            size_axes.plot(
                result.candidate_sizes,
                color=line.get_color(),
                linestyle="--",
                label=f"{result.name}: candidates",
                linewidth=1,
            )
    loss_axes.set(xlabel="step", ylabel="training loss (batch)", yscale="log", title="loss")
    size_axes.set(xlabel="step", ylabel="samples", title="batch size")
    loss_axes.legend()
    size_axes.legend()
    figure.savefig(path, dpi=100)
    return path
