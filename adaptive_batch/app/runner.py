"""One training run with a named policy (or plain fixed batches), recorded step by step.

The demo and the benchmarks train through :func:`train`, so every figure they report comes from
the same loop: an unmodified SGD step on whatever batches the loader (and, for a policy, the
sampler with its stage: a SubsetFilter, StepFeedback or the per-layer backward) provides, with the
same learning-rate schedule for every run. Training time covers everything a policy costs (its
probe, its bookkeeping, its data loading) and excludes evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, SubsetRandomSampler

from adaptive_batch import (
    AdaptiveBatchSampler,
    BatchSizeLR,
    IndexedDataset,
    IndexedSample,
    PerLayerBackward,
    StepFeedback,
    SubsetFilter,
    TrajectoryLogger,
)

from .clock import Clock
from .recipes import (
    POLICY_NAMES,
    Recipe,
    forget_rate,
    infobatch_setting,
    recipe,
    rs2_fraction,
    small_loss_fraction,
)

__all__ = ["RunResult", "RunSpec", "check_run_name", "fixed_batch_size", "train"]

FIXED_BATCH_SIZE = 100  # EDBA's starting size; a plain "fixed" run keeps it
POSTFIX_EVERY = 20  # steps between progress-bar loss readouts (each one syncs with the device)
SCHEDULES = ("constant", "cosine")


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
    named = name in POLICY_NAMES or forget_rate(name) is not None
    named = named or infobatch_setting(name) is not None or small_loss_fraction(name) is not None
    if not named and fixed_batch_size(name) is None and rs2_fraction(name) is None:
        raise ValueError(
            f"unknown run {name!r}: fixed, fixed-<size>, rs2-<fraction>, "
            f"small-loss-<fraction>, small-loss-inbatch-<rate>, infobatch-r<ratio>, "
            f"infobatch-d<delta> or one of "
            f"{', '.join(POLICY_NAMES)}"
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
        eval_each_epoch: evaluate after every epoch too.
        optimizer: ``torch.optim.SGD`` keyword arguments.
        schedule: ``"constant"`` or ``"cosine"`` (the learning rate annealed to 0 over ``epochs``,
            stepped once per epoch, so pruned epochs of different lengths follow the same curve).
        batch_size: the batch size of ``"fixed"`` and of the recipes that keep the baseline's
            (epoch plans, constant-size selection); ``"fixed-<size>"`` overrides it.
        stage: feed the recipe's policy from this stage instead of its usual one (``recipe``'s
            ``stage``).
        batch_caps: ``(min, max)`` batch sizes of a sizing recipe, which then starts at
            ``batch_size`` (default: the recipe's own start and caps).
    """

    name: str
    seed: int = 0
    epochs: int | None = None
    candidate_budget: int | None = None
    time_limit: float | None = None
    target_accuracy: float | None = None
    eval_every: int | None = None
    eval_each_epoch: bool = False
    optimizer: dict[str, Any] = field(
        default_factory=lambda: {"lr": 0.05, "momentum": 0.9, "nesterov": True}
    )
    schedule: str = "constant"
    batch_size: int = FIXED_BATCH_SIZE
    stage: str | None = None
    batch_caps: tuple[int, int] | None = None


@dataclass
class RunResult:
    name: str
    seed: int = 0
    test_accuracy: float = 0.0
    best_accuracy: float = 0.0
    steps: int = 0
    trained: int = 0  # samples the steps trained on
    candidates: int = 0  # samples the loader provided
    trained_noisy: int = 0  # of the trained, how many carried a corrupted label (noisy runs)
    train_seconds: float = 0.0
    indices_inside: bool = True  # every index the sampler used lay in the allowed subset
    losses: list[float] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    candidate_sizes: list[int] = field(default_factory=list)
    # (train seconds, candidates, trained, accuracy) at each evaluation
    curve: list[tuple[float, int, int, float]] = field(default_factory=list)
    cpu_seconds: float = 0.0  # the process's CPU time while training (all threads)
    cpu_curve: list[float] = field(default_factory=list)  # CPU seconds at each evaluation
    noisy_curve: list[int] = field(default_factory=list)  # trained_noisy at each evaluation

    @property
    def mean_batch_size(self) -> float:
        return self.trained / max(self.steps, 1)

    @property
    def noisy_fraction(self) -> float:
        """The mislabelled share of the samples trained on."""
        return self.trained_noisy / max(self.trained, 1)

    def first_reaching(self, accuracy: float) -> tuple[float, int, int] | None:
        """(train seconds, candidates, trained) at the first evaluation reaching it."""
        for seconds, candidates, trained, acc in self.curve:
            if acc >= accuracy:
                return seconds, candidates, trained
        return None


@dataclass
class _Pipeline:
    """The batches a run trains on, and the parts that produced them."""

    batches: Any
    sampler: AdaptiveBatchSampler | None = None
    recipe: Recipe | None = None
    stage: Any = None  # SubsetFilter, StepFeedback or PerLayerBackward
    coupling: BatchSizeLR | None = None


def _pipeline(
    spec: RunSpec, train_data: Dataset, allowed: Tensor, model: nn.Module, optimizer: Any
) -> _Pipeline:
    data = IndexedDataset(train_data)
    size = fixed_batch_size(spec.name)
    if size is not None:
        if spec.name == "fixed":
            size = spec.batch_size
        order = SubsetRandomSampler(
            allowed.tolist(), generator=torch.Generator().manual_seed(spec.seed)
        )
        return _Pipeline(DataLoader(data, sampler=order, batch_size=size))
    r = recipe(
        spec.name,
        seed=spec.seed,
        lr=spec.optimizer["lr"],
        total_candidates=_total(spec, allowed),
        epochs=spec.epochs,
        epoch_size=allowed.numel(),
        batch_size=spec.batch_size,
        stage=spec.stage,
        current_lr=lambda: optimizer.param_groups[0]["lr"],
    )
    if spec.name == "infobatch-balanced":  # class-balanced: the classes of the index set
        labels = getattr(train_data, "labels", None)
        if labels is None:
            labels = train_data.tensors[1]  # type: ignore[attr-defined]
        r.policy.classes = torch.as_tensor(labels)[allowed].long()
    if spec.batch_caps is not None:
        low, high = spec.batch_caps
        r = replace(r, batch_size=spec.batch_size, min_batch_size=low, max_batch_size=high)
    sampler = AdaptiveBatchSampler(
        train_data, policy=r.policy, indices=allowed, seed=spec.seed, **r.sampler_kwargs()
    )
    loader = DataLoader(data, batch_sampler=sampler)
    coupling = BatchSizeLR(optimizer, sampler, r.lr_rule) if r.lr_rule else None
    if r.stage == "per_layer":
        stage: Any = PerLayerBackward(model, r.policy, sampler=sampler)
        return _Pipeline(loader, sampler, r, stage, coupling)
    if r.stage == "none":  # the plan needs no feedback: the loader alone
        return _Pipeline(loader, sampler, r, None, coupling)
    if r.stage == "training_step":
        stage = StepFeedback(loader, model, sampler=sampler)
    else:
        stage = SubsetFilter(loader, model, sampler=sampler)
    return _Pipeline(stage, sampler, r, stage, coupling)


def train(
    spec: RunSpec,
    make_model: Callable[[], nn.Module],
    train_data: Dataset,
    allowed: Tensor,
    *,
    evaluate: Callable[[nn.Module], float] | None = None,
    device: torch.device | str = "cpu",
    progress: Any = None,
    noisy: Tensor | None = None,
    trajectory: str | Path | None = None,
) -> RunResult:
    """Train ``make_model()`` on ``train_data[allowed]`` as ``spec`` says; ``train_data[i]`` is
    ``(input, label)``. ``evaluate(model) -> accuracy`` runs at ``spec.eval_every``, after each
    epoch with ``spec.eval_each_epoch``, and at the end. ``progress`` (a tqdm bar) is advanced by
    candidates. ``noisy`` (``bool`` per dataset index) marks corrupted labels: the run counts how
    many of the samples it trained on carry one. ``trajectory``: a CSV file where a
    :class:`~adaptive_batch.TrajectoryLogger` records what the sampler did, batch by batch (runs
    with a sampler only; a fixed run has none), written afresh: a run here never resumes, so it
    does not append to an earlier run's file as a resumed training run would."""
    if not any((spec.epochs, spec.candidate_budget, spec.time_limit, spec.target_accuracy)):
        raise ValueError(
            "give the run a limit: epochs, candidate_budget, time_limit or target_accuracy"
        )
    if spec.schedule not in SCHEDULES or (spec.schedule == "cosine" and not spec.epochs):
        raise ValueError(
            f"schedule must be one of {SCHEDULES} (cosine needs epochs); got {spec.schedule!r}"
        )
    check_run_name(spec.name)
    device = torch.device(device)
    torch.manual_seed(spec.seed)
    model = make_model().to(device)
    optimizer = torch.optim.SGD(model.parameters(), **spec.optimizer)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    pipeline = _pipeline(spec, train_data, allowed, model, optimizer)
    weighted = pipeline.recipe is not None and pipeline.recipe.weighted
    # An in-batch rule picks the trained samples on the device: counted without reading them back.
    in_batch = isinstance(pipeline.stage, StepFeedback) and pipeline.stage.in_batch is not None
    criterion: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy
    if weighted and isinstance(pipeline.stage, StepFeedback):  # its loss: cross-entropy, shared
        criterion = pipeline.stage.weighted()
    elif weighted:
        criterion = pipeline.stage.weighted(
            lambda out, y: F.cross_entropy(out, y, reduction="none")
        )
    logger = None
    if trajectory is not None and pipeline.sampler is not None:
        Path(trajectory).unlink(missing_ok=True)
        logger = TrajectoryLogger(pipeline.sampler, csv_path=trajectory, optimizer=optimizer)
    result = RunResult(spec.name, spec.seed)
    clock = Clock(device)
    next_eval = spec.eval_every or 0

    def record_evaluation() -> bool:
        """Evaluate with the clock stopped; whether the target is reached."""
        if noisy is not None and in_batch:  # what the in-batch rule kept, as the sampler counts
            pipeline.stage.flush()
            result.trained_noisy = int(pipeline.sampler.times_kept[noisy].sum())
        result.noisy_curve.append(result.trained_noisy)
        accuracy = evaluate(model) if evaluate else float("nan")
        result.curve.append((clock.total, result.candidates, result.trained, accuracy))
        result.cpu_curve.append(clock.cpu_total)
        result.best_accuracy = max(result.best_accuracy, accuracy)
        return spec.target_accuracy is not None and accuracy >= spec.target_accuracy

    def limit_reached() -> bool:
        if spec.candidate_budget is not None and result.candidates >= spec.candidate_budget:
            return True
        return spec.time_limit is not None and clock.elapsed() >= spec.time_limit

    def set_lr(epoch: int) -> None:
        factor = 1.0
        if spec.schedule == "cosine":
            assert spec.epochs is not None
            factor = 0.5 * (1 + math.cos(math.pi * epoch / spec.epochs))
        if pipeline.coupling is not None:
            factor *= pipeline.coupling.factor()
        for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
            group["lr"] = base * factor

    step_losses: list[Tensor] = []
    epoch, done = 0, False
    clock.start()
    while not done and (spec.epochs is None or epoch < spec.epochs):
        for batch in pipeline.batches:
            set_lr(epoch)
            model.train()
            optimizer.zero_grad()
            if isinstance(pipeline.stage, PerLayerBackward):
                loss = pipeline.stage(batch)
                feedback = pipeline.stage.last_feedback
                assert feedback is not None
                trained_indices = feedback.kept
                candidates = feedback.batch_size
                trained = round(feedback.stats["kept_fraction"] * candidates)
            else:
                indices, batch = _indices_of(batch, pipeline)
                x, y = batch
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                loss = criterion(model(x), y)
                loss.backward()
                trained_indices, trained = indices, len(y)
                if in_batch:
                    trained_indices, trained = None, pipeline.stage.trained_rows
                elif weighted and (weights := pipeline.stage.batch_weights()) is not None:
                    trained_indices = indices[weights.cpu() > 0]  # weight 0: scored, not trained
                    trained = trained_indices.numel()
                if isinstance(pipeline.stage, SubsetFilter):
                    candidates = pipeline.stage.last_feedback.batch_size  # type: ignore[union-attr]
                else:
                    candidates = trained
            optimizer.step()
            result.steps += 1
            result.trained += trained
            result.candidates += candidates
            if noisy is not None and trained_indices is not None:
                result.trained_noisy += int(noisy[trained_indices].sum())
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
        epoch += 1
        if spec.eval_each_epoch and not done:
            clock.stop()
            done = record_evaluation()
            clock.start()
    clock.stop()
    if isinstance(pipeline.stage, StepFeedback):
        pipeline.stage.close()
    if logger is not None:
        logger.close()
    result.losses = torch.stack(step_losses).float().tolist() if step_losses else []
    if not result.curve or result.curve[-1][1] != result.candidates:
        record_evaluation()
    result.train_seconds = clock.total
    result.cpu_seconds = clock.cpu_total
    result.test_accuracy = result.curve[-1][3]
    sampler = pipeline.sampler
    if sampler is not None:
        used = (sampler.times_kept + sampler.times_dropped).nonzero().flatten()
        result.indices_inside = bool(torch.isin(used, allowed).all())
        if not result.indices_inside:
            raise RuntimeError(f"{spec.name}: the sampler used an index outside the allowed subset")
    return result


def _indices_of(batch: Any, pipeline: _Pipeline) -> tuple[Tensor, Any]:
    """The dataset indices a step trains on, and the batch without them."""
    if isinstance(batch, IndexedSample):  # a plain loader over an IndexedDataset
        return batch.index, batch.sample
    if isinstance(pipeline.stage, SubsetFilter):
        return pipeline.stage.last_feedback.kept, batch  # type: ignore[union-attr]
    return pipeline.stage.current_indices, batch


def _total(spec: RunSpec, allowed: Tensor) -> int:
    """Candidates over the whole run, for rules with an active window (Selective-Backprop)."""
    if spec.candidate_budget is not None:
        return spec.candidate_budget
    return (spec.epochs or 1) * allowed.numel()
