"""The training setup the CIFAR-10 benchmarks share: a class-balanced subset, a small network (a
3-stage conv net or ResNet-8), SGD with a cosine learning rate stepped once per epoch, evaluation
on all test images after every epoch.

Every arm of a comparison (the fixed baseline and each policy) runs with this same setup and the
same tuning; only the batches differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..runner import RunResult, RunSpec, train
from .cifar import AugmentedImages, CifarData, evaluate, stratified_subset
from .models import cifar_resnet, small_convnet

__all__ = ["EpochSetup", "curve_cell", "fixed_alternatives", "parse_curve", "run_epochs"]

SUBSET_SEED = 1234  # the same training subset for every seed and arm
MODELS = {"convnet": small_convnet, "resnet8": cifar_resnet}
MODEL_NAMES = {"convnet": "a 3-stage 16/32/64 conv net", "resnet8": "ResNet-8"}


@dataclass(frozen=True)
class EpochSetup:
    """What every arm trains with.

    Attributes:
        subset: training images, class-balanced (``None``: all 50,000).
        epochs: epochs per run; the cosine schedule anneals over them.
        batch_size: the baseline's batch size, kept by the policies that do not size batches.
        optimizer: SGD settings (learning rate, Nesterov momentum, weight decay).
        model: ``"convnet"`` (:func:`~.models.small_convnet`, 24k parameters) or ``"resnet8"``.
        augment: random crop and flip (default); without them a network memorises sooner.
    """

    subset: int | None = 10_000
    epochs: int = 30
    batch_size: int = 128
    optimizer: dict[str, Any] = field(
        default_factory=lambda: {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}
    )
    model: str = "convnet"
    augment: bool = True

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {sorted(MODELS)}; got {self.model!r}")

    def describe(self) -> str:
        images = "all 50,000" if self.subset is None else f"a class-balanced {self.subset:,}"
        opt = self.optimizer
        return (
            f"{MODEL_NAMES[self.model]} on {images} CIFAR-10 training images, {self.epochs} epochs, batch "
            f"{self.batch_size}, SGD lr {opt['lr']} (cosine, stepped per epoch), Nesterov "
            f"momentum {opt['momentum']}, weight decay {opt['weight_decay']}, "
            f"{'random crop and flip' if self.augment else 'no augmentation'}; "
            "test accuracy on all test images after every epoch"
        )


def allowed_indices(data: CifarData, setup: EpochSetup) -> Tensor:
    if setup.subset is None or setup.subset >= data.train_y.numel():
        return torch.arange(data.train_y.numel())
    return stratified_subset(data.train_y, setup.subset, SUBSET_SEED)


def run_epochs(
    data: CifarData,
    policy: str,
    seed: int,
    setup: EpochSetup,
    *,
    device: torch.device,
    labels: Tensor | None = None,
    noisy: Tensor | None = None,
    progress: Any = None,
    trajectory: Path | None = None,
    epochs: int | None = None,
    **overrides: Any,
) -> RunResult:
    """One arm: ``policy`` (``"fixed"`` or a recipe name) trained as ``setup`` says, on the
    training labels ``labels`` (default the true ones; ``noisy`` marks the corrupted ones).
    ``trajectory``: a CSV file for the sampler's batch-by-batch record. ``epochs`` shortens the
    schedule (the cosine anneals over it) for a budget-matched control. ``overrides``: further
    :class:`~adaptive_batch.app.runner.RunSpec` fields (``schedule``, ``stage``, ``optimizer``,
    ``batch_caps``), overriding the setup's."""
    fields: dict[str, Any] = {
        "optimizer": dict(setup.optimizer),
        "schedule": "cosine",
        "batch_size": setup.batch_size,
    }
    spec = RunSpec(
        policy,
        seed=seed,
        epochs=epochs or setup.epochs,
        eval_each_epoch=True,
        **(fields | overrides),
    )
    train_labels = data.train_y if labels is None else labels
    return train(
        spec,
        MODELS[setup.model],
        AugmentedImages(data.train_x, train_labels, augment=setup.augment, seed=seed),
        allowed_indices(data, setup),
        evaluate=partial(evaluate, images=data.test_x, labels=data.test_y),
        device=device,
        progress=progress,
        noisy=noisy,
        trajectory=trajectory,
    )


def fixed_alternatives(setup: EpochSetup) -> dict[str, dict[str, Any]]:
    """The tuned fixed baseline's other batch sizes, 4x smaller and 4x larger, each with the
    learning rate scaled by the square-root rule: run name -> ``run_epochs`` overrides.

    Example:
        >>> {name: o["optimizer"]["lr"] for name, o in fixed_alternatives(EpochSetup()).items()}
        {'fixed-32': 0.05, 'fixed-512': 0.2}
    """
    base = setup.optimizer["lr"]
    return {
        f"fixed-{size}": {
            "optimizer": setup.optimizer | {"lr": base * math.sqrt(size / setup.batch_size)}
        }
        for size in (setup.batch_size // 4, setup.batch_size * 4)
    }


def curve_cell(result: RunResult) -> str:
    """The per-epoch curve as one CSV cell: ``wall seconds:cpu seconds:trained:accuracy;...``."""
    return ";".join(
        f"{s:.2f}:{c:.2f}:{t}:{a:.6g}"
        for (s, _, t, a), c in zip(result.curve, result.cpu_curve, strict=True)
    )


def parse_curve(cell: str) -> list[tuple[float, float, int, float]]:
    """``(wall seconds, cpu seconds, trained, accuracy)`` per evaluation."""
    return [
        (float(s), float(c), int(t), float(a))
        for s, c, t, a in (p.split(":") for p in cell.split(";") if p)
    ]
