"""Recipes: how each named policy is wired into a run (its stage, caps and learning-rate coupling).

The demo and the benchmarks build every run from a recipe, so the settings of each method live
in one place, each with the source of its numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from adaptive_batch.policies import (
    CABS,
    DBA,
    EDBA,
    AdaDamp,
    Arbiter,
    Constant,
    GeoDamp,
    GradientNoiseScale,
    InfoBatch,
    PadaDamp,
    RandomSubset,
    SelectiveBackprop,
    SmallLoss,
    StaleSelectiveBackprop,
)

__all__ = [
    "DEFAULT_POLICY",
    "POLICY_NAMES",
    "STAGES",
    "Recipe",
    "forget_rate",
    "infobatch_setting",
    "recipe",
    "small_loss_fraction",
]

# The demo's policy: the one that paid best on digits (30 epochs, seeds 0-2; docs/results.md).
# Stale Selective-Backprop kept the fixed run's test accuracy training on 0.57x the samples.
DEFAULT_POLICY = "stale-sb"

POLICY_NAMES = (
    "constant",
    "edba",
    "edba-selection",
    "dba",
    "cabs",
    "adadamp",
    "padadamp",
    "geodamp",
    "arbiter",
    "gns",
    "gns-free",
    "selective-backprop",
    "stale-sb",
    "infobatch",
    "infobatch-no-rescale",
    "infobatch-average",
    "infobatch-balanced",
    "small-loss",
    "small-loss-inbatch",
    "small-loss-lookahead",
    "rs2",
)
RS2_FRACTION = 0.5  # "rs2" alone; "rs2-<fraction>" names another (the benchmarks' matched controls)
# "small-loss-inbatch" alone forgets this share; "small-loss-inbatch-<rate>" names the rate
# (Co-teaching sets it to the noise rate).
FORGET_RATE = 0.2
#: How a recipe's feedback reaches the sampler: a look-ahead probe in a SubsetFilter, the training
#: step's own forward (StepFeedback: no extra forward), DBA's per-layer backward, or no feedback at
#: all (RS2's plan reads no scores).
STAGES = ("look_ahead", "training_step", "per_layer", "none")


def _suffix_fraction(name: str, prefix: str, default: float) -> float | None:
    if name == prefix:
        return default
    head, _, value = name.rpartition("-")
    if head != prefix or not value:
        return None
    try:
        fraction = float(value)
    except ValueError:
        return None
    return fraction if 0.0 < fraction <= 1.0 else None


def rs2_fraction(name: str) -> float | None:
    """The fraction of an ``"rs2"`` or ``"rs2-<fraction>"`` run name (``None``: another name)."""
    return _suffix_fraction(name, "rs2", RS2_FRACTION)


def infobatch_setting(name: str) -> dict[str, float] | None:
    """The InfoBatch setting an ablation run name changes: ``"infobatch-r<ratio>"`` (the prune
    ratio) or ``"infobatch-d<delta>"`` (the annealing point); ``None``: another name.

    Example:
        >>> infobatch_setting("infobatch-r0.3"), infobatch_setting("infobatch-d0.75")
        ({'prune_ratio': 0.3}, {'delta': 0.75})
        >>> infobatch_setting("infobatch-average") is None
        True
    """
    head, _, value = name.partition("-")
    if head != "infobatch" or len(value) < 2 or value[0] not in "rd":
        return None
    try:
        number = float(value[1:])
    except ValueError:
        return None
    key = {"r": "prune_ratio", "d": "delta"}[value[0]]
    return {key: number} if 0.0 <= number <= 1.0 else None


def small_loss_fraction(name: str) -> float | None:
    """The fraction a ``"small-loss-<fraction>"`` plan drops (told, not estimated; ``None``:
    another name).

    Example:
        >>> small_loss_fraction("small-loss-0.4"), small_loss_fraction("small-loss-inbatch")
        (0.4, None)
    """
    fraction = _suffix_fraction(name, "small-loss", math.nan)
    return fraction if fraction is not None and 0.0 < fraction < 1.0 else None


def forget_rate(name: str) -> float | None:
    """The forget rate of a ``"small-loss-inbatch[-<rate>]"`` run name (``None``: another)."""
    rate = _suffix_fraction(name, "small-loss-inbatch", FORGET_RATE)
    return rate if rate is not None and rate < 1.0 else None


@dataclass(frozen=True)
class Recipe:
    """A policy and the stage, sampler settings and learning-rate coupling it runs with.

    ``weighted`` marks a policy whose epoch plan weighs samples (InfoBatch): the run's loss then
    goes through ``StepFeedback.weighted``.
    """

    name: str
    policy: Any
    stage: str = "look_ahead"
    batch_size: int = 100
    min_batch_size: int = 10
    max_batch_size: int = 1000
    lr_rule: str | None = None
    weighted: bool = False

    @property
    def per_layer(self) -> bool:
        return self.stage == "per_layer"

    def sampler_kwargs(self) -> dict[str, int]:
        return {
            "batch_size": self.batch_size,
            "min_batch_size": self.min_batch_size,
            "max_batch_size": self.max_batch_size,
        }


def recipe(
    name: str,
    *,
    seed: int,
    lr: float,
    total_candidates: int,
    epochs: int | None = None,
    epoch_size: int | None = None,
    batch_size: int = 100,
    stage: str | None = None,
    current_lr: Callable[[], float] | None = None,
) -> Recipe:
    """The recipe for ``name`` (one of :data:`POLICY_NAMES`).

    Args:
        seed: seeds the policy's own randomness.
        lr: the optimizer's base learning rate (CABS and Arbiter need it).
        total_candidates: candidates over the whole run (Selective-Backprop's active window).
        epochs: the run's length in epochs (InfoBatch's annealing, stale-SB's window).
        epoch_size: candidates per epoch (the look-ahead small-loss rule's warm-up).
        batch_size: the (starting) batch size of the recipes that keep the baseline's.
        stage: feed the policy from this stage (one of :data:`STAGES`) instead of its usual one;
            CABS then estimates its variance from the head (the only one a training step has).
        current_lr: the optimizer's current learning rate, read by the rules whose formula uses
            it (CABS, Arbiter) so that a schedule reaches them; default ``lr``.

    Start 100 within caps 10 and 1000 (EDBA's) unless the method's paper says otherwise: CABS
    starts at 16 within 16 and 2048; Arbiter's agent spans 8 to 512. The epoch plans (InfoBatch,
    small-loss, stale-SB) keep the run's batch size and change only which samples each epoch
    draws.
    """
    if stage is not None and stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}; got {stage!r}")
    made = _recipe(
        name, seed, current_lr or lr, total_candidates, epochs, epoch_size, batch_size, stage
    )
    return made if stage is None else replace(made, stage=stage)


def _recipe(
    name: str,
    seed: int,
    lr: float | Callable[[], float],
    total_candidates: int,
    epochs: int | None,
    epoch_size: int | None,
    batch_size: int,
    stage: str | None,
) -> Recipe:
    constant = {
        "batch_size": batch_size,
        "min_batch_size": batch_size,
        "max_batch_size": batch_size,
    }
    if name == "constant":
        return Recipe(name, Constant(), **constant)
    if name == "edba":
        return Recipe(name, EDBA(seed=seed))
    if name == "edba-selection":
        # EDBA's subset selection on candidate batches of a constant size: separates what the
        # selection does from what EDBA's growing batch does.
        return Recipe(name, EDBA(seed=seed).selection, **constant)
    if name == "dba":
        return Recipe(name, DBA(), stage="per_layer")
    if name == "cabs":
        variance = "head" if stage == "training_step" else "exact"
        rule = CABS(lr=lr, variance=variance)
        return Recipe(name, rule, batch_size=16, min_batch_size=16, max_batch_size=2048)
    if name in ("adadamp", "padadamp", "geodamp"):
        rule = {"adadamp": AdaDamp, "padadamp": PadaDamp, "geodamp": GeoDamp}[name]()
        return Recipe(name, rule, lr_rule="damp")  # past the largest batch, lower the lr
    if name == "arbiter":
        return Recipe(name, Arbiter(lr=lr, seed=seed), min_batch_size=8, max_batch_size=512)
    if name == "gns":
        return Recipe(name, GradientNoiseScale(), lr_rule="adascale")
    if name == "gns-free":  # the same rule, fed by the training step: no extra forward
        return Recipe(name, GradientNoiseScale(), stage="training_step", lr_rule="adascale")
    if name == "selective-backprop":
        return Recipe(
            name,
            SelectiveBackprop(keep=0.5, total_candidates=total_candidates, seed=seed),
            **constant,
        )
    if name == "stale-sb":
        plan = StaleSelectiveBackprop(keep=0.5, num_epochs=epochs)
        return Recipe(name, plan, stage="training_step", **constant)
    if name in ("infobatch", "infobatch-no-rescale", "infobatch-average", "infobatch-balanced") or (
        infobatch_setting(name) is not None
    ):
        rescale = name != "infobatch-no-rescale"
        settings: dict[str, Any] = {"prune_ratio": 0.5, "delta": 0.875}  # the paper's defaults
        settings |= infobatch_setting(name) or {}
        if name == "infobatch-average":
            settings["score"] = "average"
        # infobatch-balanced: the runner gives the plan the index set's classes (plan.classes)
        plan = InfoBatch(num_epochs=epochs, rescale=rescale, **settings)
        return Recipe(name, plan, stage="training_step", weighted=rescale, **constant)
    if (fraction := rs2_fraction(name)) is not None:
        # RS2: a fresh random part each epoch, the same schedule over the same epochs.
        plan = RandomSubset(fraction, seed=seed)
        return Recipe(name, plan, stage="none", **constant)
    if name == "small-loss" or (told := small_loss_fraction(name)) is not None:
        # weighted: the dropped it scores again are only scored
        plan = SmallLoss() if name == "small-loss" else SmallLoss(fraction=told)
        return Recipe(name, plan, stage="training_step", weighted=True, **constant)
    if (rate := forget_rate(name)) is not None:
        ramp = min(10, max(1, (epochs or 30) // 3))  # Co-teaching's T_k = 10, within short runs
        policy = SmallLoss(stage="in_batch", fraction=rate, warmup_epochs=ramp)
        return Recipe(name, policy, stage="training_step", weighted=True, **constant)
    if name == "small-loss-lookahead":
        policy = SmallLoss(stage="look_ahead", epoch_size=epoch_size or total_candidates)
        return Recipe(name, policy, **constant)
    raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICY_NAMES)}")
