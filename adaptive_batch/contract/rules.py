"""The policy interface: a selection rule, a sizing rule, or both (or a per-layer rule).

A *selection rule* maps a :class:`~adaptive_batch.ProbeResult` to a
:class:`~adaptive_batch.Selection` (the SubsetFilter calls it on every candidate batch). A *sizing
rule* maps the current batch size and a :class:`~adaptive_batch.Feedback` to the next batch size
(the AdaptiveBatchSampler calls it with a :class:`~adaptive_batch.Progress` and clamps the answer
to its caps; the unclamped answer stays visible as ``sampler.requested_batch_size``). A
*per-layer rule* (DBA) chooses a subset per layer, which filtering cannot express;
:class:`~adaptive_batch.PerLayerBackward` applies it. An *epoch-plan rule* decides at each
epoch's start which indices the epoch draws, from the per-index scores the sampler keeps
(:class:`~adaptive_batch.contract.ScoreTable`). An *in-batch rule* picks, inside each batch, the
samples the step trains on from the training forward's own per-sample losses, on their device;
:class:`~adaptive_batch.StepFeedback`'s weighted loss applies it. Rules are plain objects over tensors and numbers:
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
    "InBatchRule",
    "KeepAll",
    "LayerSelectionRule",
    "Policy",
    "SelectionRule",
    "SizingRule",
    "Stateless",
    "check_feedback_source",
    "check_policy_for_stage",
    "check_whole_batch_policy",
    "feedback_source_of",
    "in_batch_rule_of",
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
    the epoch (the same on every rank, and again on resume). A plan may also have
    ``check_epoch(epoch)``, called when an epoch starts handing out batches once feedback has
    come (to say, say, that the run went past the length its schedule was built for)."""

    def plan(self, epoch: int, scores: ScoreTable, generator: torch.Generator) -> EpochPlan: ...


@runtime_checkable
class InBatchRule(Stateful, Protocol):
    """Picks the samples a step trains on from that step's per-sample losses (detached, on the
    model's device), in epoch ``epoch``: a ``bool`` mask on their device and how many it keeps
    (a host number, decided without reading the losses back)."""

    def keep_mask(self, losses: Tensor, epoch: int) -> tuple[Tensor, int]: ...


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
    filter; ``plan`` an epoch-plan rule (InfoBatch's); ``in_batch`` an in-batch rule, applied by
    :class:`~adaptive_batch.StepFeedback`'s weighted loss.
    """

    selection: SelectionRule | None = None
    sizing: SizingRule | None = None
    per_layer: LayerSelectionRule | None = None
    plan: EpochPlanRule | None = None
    in_batch: InBatchRule | None = None

    def __post_init__(self) -> None:
        checks = (
            ("selection", SelectionRule, "select"),
            ("sizing", SizingRule, "next_batch_size"),
            ("per_layer", LayerSelectionRule, "select_layers"),
            ("plan", EpochPlanRule, "plan"),
            ("in_batch", InBatchRule, "keep_mask"),
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
    "in_batch": InBatchRule,
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


def in_batch_rule_of(policy: Any) -> InBatchRule | None:
    """The in-batch rule of ``policy`` (a Policy or a bare rule), or ``None``."""
    return _rule_of(policy, "in_batch")


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


def check_policy_for_stage(policy: Any, stage: str) -> None:
    """Refuse a policy with a rule the stage (a key of :data:`STAGE_NAMES`) cannot run -- one it
    would otherwise ignore in silence -- naming the stage that runs it."""
    if stage != "per_layer":
        check_whole_batch_policy(policy, STAGE_NAMES[stage])
    check_feedback_source(sizing_rule_of(policy), stage)
    in_batch = in_batch_rule_of(policy)
    if in_batch is not None and stage != "training_step":
        raise AdaptiveBatchError(
            f"{type(in_batch).__name__} picks samples inside each batch from the training "
            f"forward's own losses, which only StepFeedback's weighted loss can apply; this is "
            f"{STAGE_NAMES[stage]}. Use StepFeedback(loader, model, sampler=sampler) and "
            "loss_fn = batches.weighted(<per-sample loss>), or a look-ahead rule here "
            "(SmallLoss(stage='look_ahead'))"
        )
    selection = selection_rule_of(policy)
    if selection is not None and stage == "training_step":
        raise AdaptiveBatchError(
            f"{type(selection).__name__} chooses a subset of each candidate batch before the "
            "step (a look-ahead selection rule), but StepFeedback trains on every sample it "
            "yields, so the rule would be ignored. Use SubsetFilter(loader, model, "
            "sampler=sampler) for it, or a rule that runs on the training step: an epoch plan "
            "(SmallLoss(), InfoBatch(), StaleSelectiveBackprop()) or an in-batch rule "
            "(SmallLoss(stage='in_batch', fraction=...))"
        )
