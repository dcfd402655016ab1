"""One training run with a named policy (or plain fixed batches), recorded step by step.

The demo and the benchmarks train through :func:`train`, so every figure they report comes from
the same loop: an unmodified SGD step on whatever batches the loader (and, for a policy, the
sampler and filter or per-layer backward) provides. Training time excludes evaluation.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from adaptive_batch import (
    AdaptiveBatchSampler,
    BatchSizeLR,
    IndexedDataset,
    PerLayerBackward,
    SubsetFilter,
)

from .recipes import POLICY_NAMES, recipe

__all__ = ["RunResult", "RunSpec", "fixed_batch_size", "train"]

FIXED_BATCH_SIZE = 100  # EDBA's starting size; a plain "fixed" run keeps it
POSTFIX_EVERY = 20  # steps between progress-bar loss readouts (each one syncs with the device)


def fixed_batch_size(name: str) -> int | None:
    """The batch size of a plain-DataLoader run: ``"fixed"`` (100) or ``"fixed-<size>"``;
    ``None`` for a policy."""
    if name == "fixed":
        return FIXED_BATCH_SIZE
    prefix, _, size = name.partition("-")
    if prefix == "fixed" and size.isdigit() and int(size) >= 1:
        return int(size)
    return None


def check_run_name(name: str) -> None:
    if name not in POLICY_NAMES and fixed_batch_size(name) is None:
        raise ValueError(
            f"unknown run {name!r}: fixed, fixed-<size> or one of {', '.join(POLICY_NAMES)}"
        )


@dataclass
class RunSpec:
    """What to train and when to stop (whichever limit comes first).

    Attributes:
        name: ``"fixed"``, ``"fixed-<size>"`` or a policy recipe name.
        seed: seeds the model's initialisation, the order of the data and the policy.
        epochs: passes over the allowed indices.
        candidate_budget: candidates (samples the loader provided) to process.
        time_limit: seconds of training time.
        target_accuracy: stop at the first evaluation that reaches it.
        eval_every: candidates between evaluations (``None``: only at the end).
        optimizer: ``torch.optim.SGD`` keyword arguments.
    """

    name: str
    seed: int = 0
    epochs: int | None = None
    candidate_budget: int | None = None
    time_limit: float | None = None
    target_accuracy: float | None = None
    eval_every: int | None = None
    optimizer: dict[str, Any] = field(
        default_factory=lambda: {"lr": 0.05, "momentum": 0.9, "nesterov": True}
    )


@dataclass
class RunResult:
    name: str
    seed: int = 0
    test_accuracy: float = 0.0
    steps: int = 0
    trained: int = 0  # samples the steps trained on
    candidates: int = 0  # samples the loader provided
    train_seconds: float = 0.0
    indices_inside: bool = True  # every index the sampler used lay in the allowed subset
    losses: list[float] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    candidate_sizes: list[int] = field(default_factory=list)
    # (train seconds, candidates, trained, accuracy) at each evaluation
    curve: list[tuple[float, int, int, float]] = field(default_factory=list)

    @property
    def mean_batch_size(self) -> float:
        return self.trained / max(self.steps, 1)

    def first_reaching(self, accuracy: float) -> tuple[float, int, int] | None:
        """(train seconds, candidates, trained) at the first evaluation reaching it."""
        for seconds, candidates, trained, acc in self.curve:
            if acc >= accuracy:
                return seconds, candidates, trained
        return None


class _Clock:
    """Training time, excluding evaluation; synchronises CUDA before reading."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.total = 0.0
        self._start: float | None = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self._sync()
        self._start = time.perf_counter()

    def stop(self) -> float:
        self._sync()
        assert self._start is not None
        self.total += time.perf_counter() - self._start
        self._start = None
        return self.total

    def elapsed(self) -> float:
        """Training time so far, without synchronising."""
        running = 0.0 if self._start is None else time.perf_counter() - self._start
        return self.total + running


def train(
    spec: RunSpec,
    make_model: Callable[[], nn.Module],
    train_data: Dataset,
    allowed: torch.Tensor,
    *,
    evaluate: Callable[[nn.Module], float] | None = None,
    device: torch.device | str = "cpu",
    progress: Any = None,
) -> RunResult:
    """Train ``make_model()`` on ``train_data[allowed]`` as ``spec`` says; ``train_data[i]`` is
    ``(input, label)``. ``evaluate(model) -> accuracy`` runs at ``spec.eval_every`` and at the end.
    ``progress`` (a tqdm bar) is advanced by candidates."""
    if not any((spec.epochs, spec.candidate_budget, spec.time_limit, spec.target_accuracy)):
        raise ValueError(
            "give the run a limit: epochs, candidate_budget, time_limit or target_accuracy"
        )
    check_run_name(spec.name)
    device = torch.device(device)
    torch.manual_seed(spec.seed)
    model = make_model().to(device)
    optimizer = torch.optim.SGD(model.parameters(), **spec.optimizer)
    result = RunResult(spec.name, spec.seed)
    clock = _Clock(device)
    next_eval = spec.eval_every or 0
    sampler = scheduler = backward = None
    size = fixed_batch_size(spec.name)
    if size is not None:
        subset = Subset(train_data, allowed.tolist())
        loader: Any = DataLoader(
            subset,
            batch_size=size,
            shuffle=True,
            generator=torch.Generator().manual_seed(spec.seed),
        )
    else:
        r = recipe(
            spec.name,
            seed=spec.seed,
            lr=spec.optimizer["lr"],
            total_candidates=_total(spec, allowed),
        )
        sampler = AdaptiveBatchSampler(
            train_data, policy=r.policy, indices=allowed, seed=spec.seed, **r.sampler_kwargs()
        )
        loader = DataLoader(IndexedDataset(train_data), batch_sampler=sampler)
        scheduler = BatchSizeLR(optimizer, sampler, r.lr_rule) if r.lr_rule else None
        if r.per_layer:
            backward = PerLayerBackward(model, r.policy, sampler=sampler)
        else:
            loader = SubsetFilter(loader, model, sampler=sampler)

    def record_evaluation() -> bool:
        """Evaluate with the clock stopped; whether the target is reached."""
        accuracy = evaluate(model) if evaluate else float("nan")
        result.curve.append((clock.total, result.candidates, result.trained, accuracy))
        return spec.target_accuracy is not None and accuracy >= spec.target_accuracy

    def limit_reached() -> bool:
        if spec.candidate_budget is not None and result.candidates >= spec.candidate_budget:
            return True
        return spec.time_limit is not None and clock.elapsed() >= spec.time_limit

    step_losses: list[torch.Tensor] = []
    epoch, done = 0, False
    clock.start()
    while not done and (spec.epochs is None or epoch < spec.epochs):
        epoch += 1
        for batch in loader:
            model.train()
            optimizer.zero_grad()
            if backward is not None:
                loss = backward(batch)
                fb = backward.last_feedback
                trained, candidates = (
                    round(fb.stats["kept_fraction"] * fb.batch_size),
                    fb.batch_size,
                )
            else:
                x, y = batch
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                trained = len(y)
                candidates = loader.last_feedback.batch_size if sampler is not None else trained
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            result.steps += 1
            result.trained += trained
            result.candidates += candidates
            step_losses.append(loss.detach())  # read back once at the end: no sync per step
            result.batch_sizes.append(trained)
            result.candidate_sizes.append(candidates)
            if progress is not None:
                progress.update(candidates)
                if result.steps % POSTFIX_EVERY == 1 and not getattr(progress, "disable", False):
                    progress.set_postfix(
                        run=spec.name, loss=f"{loss.item():.3f}", batch=trained, refresh=False
                    )
            if spec.eval_every and result.candidates >= next_eval:
                next_eval += spec.eval_every
                clock.stop()
                done = record_evaluation()
                clock.start()
                if done:
                    break
            if limit_reached():
                done = True
                break
    clock.stop()
    result.losses = torch.stack(step_losses).float().tolist() if step_losses else []
    if not result.curve or result.curve[-1][1] != result.candidates:
        record_evaluation()
    result.train_seconds = clock.total
    result.test_accuracy = result.curve[-1][3]
    if sampler is not None:
        used = (sampler.times_kept + sampler.times_dropped).nonzero().flatten()
        result.indices_inside = bool(torch.isin(used, allowed).all())
        if not result.indices_inside:
            raise RuntimeError(f"{spec.name}: the sampler used an index outside the allowed subset")
    return result


def _total(spec: RunSpec, allowed: torch.Tensor) -> int:
    """Candidates over the whole run, for rules with an active window (Selective-Backprop)."""
    if spec.candidate_budget is not None:
        return spec.candidate_budget
    return (spec.epochs or 1) * allowed.numel()
