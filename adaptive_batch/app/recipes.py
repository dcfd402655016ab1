"""Recipes: how each named policy is wired into a run (its caps, its learning-rate coupling).

The demo and the benchmarks build every run from a recipe, so the settings of each method live
in one place, each with the source of its numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    PadaDamp,
    Policy,
    SelectiveBackprop,
)

__all__ = ["POLICY_NAMES", "Recipe", "recipe"]

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
    "selective-backprop",
)


@dataclass(frozen=True)
class Recipe:
    """A policy and the sampler settings and learning-rate coupling it runs with.

    ``per_layer`` marks a policy applied by :class:`~adaptive_batch.PerLayerBackward` instead of
    a :class:`~adaptive_batch.SubsetFilter`.
    """

    name: str
    policy: Any
    batch_size: int = 100
    min_batch_size: int = 10
    max_batch_size: int = 1000
    lr_rule: str | None = None
    per_layer: bool = False

    def sampler_kwargs(self) -> dict[str, int]:
        return {
            "batch_size": self.batch_size,
            "min_batch_size": self.min_batch_size,
            "max_batch_size": self.max_batch_size,
        }


def recipe(name: str, *, seed: int, lr: float, total_candidates: int) -> Recipe:
    """The recipe for ``name`` (one of :data:`POLICY_NAMES`).

    Args:
        seed: seeds the policy's own randomness.
        lr: the optimizer's base learning rate (CABS and Arbiter need it).
        total_candidates: candidates over the whole run (Selective-Backprop's active window).

    Start 100 within caps 10 and 1000 (EDBA's) unless the method's paper says otherwise: CABS
    starts at 16 within 16 and 2048; Arbiter's agent spans 8 to 512.
    """
    if name == "constant":
        return Recipe(name, Constant())
    if name == "edba":
        return Recipe(name, EDBA(seed=seed))
    if name == "edba-selection":
        # EDBA's subset selection on candidate batches of a constant size: separates what the
        # selection does from what EDBA's growing batch does.
        return Recipe(name, Policy(selection=EDBA(seed=seed).selection, sizing=Constant()))
    if name == "dba":
        return Recipe(name, DBA(), per_layer=True)
    if name == "cabs":
        return Recipe(name, CABS(lr=lr), batch_size=16, min_batch_size=16, max_batch_size=2048)
    if name in ("adadamp", "padadamp", "geodamp"):
        rule = {"adadamp": AdaDamp, "padadamp": PadaDamp, "geodamp": GeoDamp}[name]()
        return Recipe(name, rule, lr_rule="damp")  # past the largest batch, lower the lr
    if name == "arbiter":
        return Recipe(name, Arbiter(lr=lr, seed=seed), min_batch_size=8, max_batch_size=512)
    if name == "gns":
        return Recipe(name, GradientNoiseScale(), lr_rule="adascale")
    if name == "selective-backprop":
        return Recipe(
            name, SelectiveBackprop(keep=0.5, total_candidates=total_candidates, seed=seed)
        )
    raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICY_NAMES)}")
