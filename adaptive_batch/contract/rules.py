"""The policy interface: a selection rule, a sizing rule, or both (or a per-layer rule).

A *selection rule* maps a :class:`~adaptive_batch.ProbeResult` to a
:class:`~adaptive_batch.Selection` (the SubsetFilter calls it on every candidate batch). A *sizing
rule* maps the current batch size and a :class:`~adaptive_batch.Feedback` to the next batch size
(the AdaptiveBatchSampler calls it with a :class:`~adaptive_batch.Progress` and clamps the answer
to its caps; the unclamped answer stays visible as ``sampler.requested_batch_size``). A
*per-layer rule* (DBA) chooses a subset per layer, which filtering cannot express;
:class:`~adaptive_batch.PerLayerBackward` applies it. An *epoch-plan rule* decides at each
epoch's start which indices the epoch draws, from the per-index scores the sampler keeps
(:class:`~adaptive_batch.contract.ScoreTable`). Rules are plain objects over tensors and numbers:
they import neither the model nor ``torch.utils.data``, and each keeps its state in
``state_dict()``.

A rule that can run only on feedback from one kind of stage says so in its ``feedback_source``
attribute: ``"look_ahead"`` (it reads statistics only a look-ahead probe measures: the
SubsetFilter's) or ``"per_layer"`` (PerLayerBackward's); rules without it run on any feedback,
including the training step's own (:class:`~adaptive_batch.StepFeedback`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from ..errors import AdaptiveBatchError, AdaptiveBatchTypeError
from .messages import (
    EpochPlan,
    Feedback,
    LayerSelection,
    ProbeResult,
    Progress,
    Reason,
    ScoreTable,
    Selection,
)
from .stateful import Stateful, Stateless

__all__ = [
    "EpochPlanRule",
    "KeepAll",
    "LayerSelectionRule",
    "Policy",
    "SelectionRule",
    "SizingRule",
    "Stateless",
    "check_feedback_source",
    "check_whole_batch_policy",
    "feedback_source_of",
    "layer_rule_of",
    "plan_rule_of",
    "probe_scope_of",
    "selection_rule_of",
    "sizing_rule_of",
]


@runtime_checkable
class SelectionRule(Stateful, Protocol):
    def select(self, result: ProbeResult) -> Selection: ...


@runtime_checkable
class SizingRule(Stateful, Protocol):
    def next_batch_size(self, batch_size: int, feedback: Feedback, progress: Progress) -> float: ...


@runtime_checkable
class LayerSelectionRule(Stateful, Protocol):
    def select_layers(self, losses: Tensor, grams: dict[str, Tensor]) -> LayerSelection: ...


@runtime_checkable
class EpochPlanRule(Stateful, Protocol):
    """Decides an epoch's draw from the scores, with a generator seeded by the sampler's seed and
    the epoch (the same on every rank, and again on resume)."""

    def plan(self, epoch: int, scores: ScoreTable, generator: torch.Generator) -> EpochPlan: ...


class KeepAll(Stateless):
    """Selection rule that keeps every candidate (the filter then only measures)."""

    def select(self, result: ProbeResult) -> Selection:
        return Selection.keep_all(result.batch_size, Reason.KEEP_ALL)


@dataclass
class Policy:
    """A selection rule and a sizing rule used together; either may be ``None``.

    Pass the same policy to the sampler (which uses ``sizing`` and ``plan``) and to the filter
    (which uses ``selection``); each saves the state of the part it uses. ``per_layer`` holds a
    per-layer rule (DBA's), applied by :class:`~adaptive_batch.PerLayerBackward` instead of a
    filter; ``plan`` an epoch-plan rule (InfoBatch's).
    """

    selection: SelectionRule | None = None
    sizing: SizingRule | None = None
    per_layer: LayerSelectionRule | None = None
    plan: EpochPlanRule | None = None

    def __post_init__(self) -> None:
        checks = (
            ("selection", SelectionRule, "select"),
            ("sizing", SizingRule, "next_batch_size"),
            ("per_layer", LayerSelectionRule, "select_layers"),
            ("plan", EpochPlanRule, "plan"),
        )
        for attribute, protocol, method in checks:
            rule = getattr(self, attribute)
            if rule is not None and not isinstance(rule, protocol):
                raise AdaptiveBatchTypeError(
                    f"{rule!r} is not a {attribute.replace('_', '-')} rule "
                    f"({method}, state_dict, load_state_dict)"
                )


_PROTOCOLS = {
    "selection": SelectionRule,
    "sizing": SizingRule,
    "per_layer": LayerSelectionRule,
    "plan": EpochPlanRule,
}


def _rule_of(policy: Any, attribute: str) -> Any:
    if policy is None:
        return None
    if isinstance(policy, Policy):
        return getattr(policy, attribute)
    if isinstance(policy, _PROTOCOLS[attribute]):
        return policy
    if any(isinstance(policy, protocol) for protocol in _PROTOCOLS.values()):
        return None  # a bare rule of another kind
    raise AdaptiveBatchTypeError(
        f"expected a Policy, a selection rule or a sizing rule; got {type(policy).__name__}"
    )


def selection_rule_of(policy: Any) -> SelectionRule | None:
    """The selection half of ``policy`` (a Policy or a bare rule), or ``None``."""
    return _rule_of(policy, "selection")


def sizing_rule_of(policy: Any) -> SizingRule | None:
    """The sizing half of ``policy`` (a Policy or a bare rule), or ``None``."""
    return _rule_of(policy, "sizing")


def layer_rule_of(policy: Any) -> LayerSelectionRule | None:
    """The per-layer rule of ``policy`` (a Policy or a bare rule), or ``None``."""
    return _rule_of(policy, "per_layer")


def plan_rule_of(policy: Any) -> EpochPlanRule | None:
    """The epoch-plan rule of ``policy`` (a Policy or a bare rule), or ``None``."""
    return _rule_of(policy, "plan")


def probe_scope_of(policy: Any) -> str:
    """``"model"`` when a rule of ``policy`` needs every parameter's per-sample gradients
    (its ``probe_scope`` attribute says so), else ``"head"``."""
    rules = [policy.selection, policy.sizing] if isinstance(policy, Policy) else [policy]
    return "model" if any(getattr(r, "probe_scope", "head") == "model" for r in rules) else "head"


def check_whole_batch_policy(policy: Any, stage: str) -> None:
    """Refuse a per-layer policy in a stage that can only keep a subset of the whole batch."""
    if layer_rule_of(policy) is not None:
        raise AdaptiveBatchTypeError(
            f"this policy selects a subset per layer, which {stage} cannot express: use "
            "adaptive_batch.PerLayerBackward in place of loss.backward() instead"
        )


STAGE_NAMES = {
    "look_ahead": "a look-ahead probe (SubsetFilter)",
    "per_layer": "PerLayerBackward",
    "training_step": "feedback from the training step (StepFeedback)",
}


def feedback_source_of(rule: Any) -> str:
    """``"look_ahead"``, ``"per_layer"`` or ``"any"``: the feedback ``rule`` can run on. A rule
    that needs every parameter's per-sample gradients (``probe_scope == "model"``) needs a
    look-ahead probe of the whole model."""
    if rule is None:
        return "any"
    source = getattr(rule, "feedback_source", "any")
    return "look_ahead" if getattr(rule, "probe_scope", "head") == "model" else source


def check_feedback_source(rule: Any, stage: str) -> None:
    """Refuse a rule that cannot run on the feedback ``stage`` reports (a key of
    :data:`STAGE_NAMES`), naming what it needs."""
    source = feedback_source_of(rule)
    if source not in ("any", stage):
        raise AdaptiveBatchError(
            f"{type(rule).__name__} runs only on feedback from {STAGE_NAMES[source]}; this is "
            f"{STAGE_NAMES[stage]}. Use that stage, or a rule that runs on any feedback"
            + (
                " (CABS(variance='head'), GradientNoiseScale(), AdaDamp(), PadaDamp(), GeoDamp(), "
                "Arbiter())"
                if stage == "training_step"
                else ""
            )
        )
