"""The policy interface: a selection rule, a sizing rule, or both.

A *selection rule* maps a :class:`~adaptive_batch.ProbeResult` to a
:class:`~adaptive_batch.Selection` (the SubsetFilter calls it on every candidate batch). A *sizing
rule* maps the current batch size and a :class:`~adaptive_batch.Feedback` to the next batch size
(the AdaptiveBatchSampler calls it with a :class:`~adaptive_batch.Progress` and clamps the answer
to its caps; the unclamped answer stays visible as ``sampler.requested_batch_size``, which the
learning-rate coupling reads). Rules are plain objects over
tensors and numbers: they import neither the model nor ``torch.utils.data``. Each keeps its state
in ``state_dict()`` so that a checkpoint restores it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ..feedback import Feedback, Progress, Reason, Selection
from ..probe_result import ProbeResult

__all__ = [
    "KeepAll",
    "Policy",
    "SelectionRule",
    "SizingRule",
    "Stateless",
    "probe_scope_of",
    "selection_rule_of",
    "sizing_rule_of",
]


@runtime_checkable
class SelectionRule(Protocol):
    def select(self, result: ProbeResult) -> Selection: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class SizingRule(Protocol):
    def next_batch_size(self, batch_size: int, feedback: Feedback, progress: Progress) -> float: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Stateless:
    """Mixin for rules without state."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no state; got keys {sorted(state)}")


class KeepAll(Stateless):
    """Selection rule that keeps every candidate (the filter then only measures)."""

    def select(self, result: ProbeResult) -> Selection:
        return Selection.keep_all(result.batch_size, Reason.KEEP_ALL)


@dataclass
class Policy:
    """A selection rule and a sizing rule used together; either may be ``None``.

    Pass the same policy to the sampler (which uses ``sizing``) and to the filter (which uses
    ``selection``); each saves the state of the half it uses.
    """

    selection: SelectionRule | None = None
    sizing: SizingRule | None = None

    def __post_init__(self) -> None:
        if self.selection is not None and not isinstance(self.selection, SelectionRule):
            raise TypeError(
                f"{self.selection!r} is not a selection rule (select, state_dict, load_state_dict)"
            )
        if self.sizing is not None and not isinstance(self.sizing, SizingRule):
            raise TypeError(
                f"{self.sizing!r} is not a sizing rule (next_batch_size, state_dict, load_state_dict)"
            )


def _rule_of(policy: Any, attribute: str, protocol: type) -> Any:
    if policy is None:
        return None
    if isinstance(policy, protocol):
        return policy
    if isinstance(policy, Policy):
        return getattr(policy, attribute)
    if isinstance(policy, SelectionRule | SizingRule):
        return None  # a bare rule of the other kind
    raise TypeError(
        f"expected a Policy, a selection rule or a sizing rule; got {type(policy).__name__}"
    )


def selection_rule_of(policy: Any) -> SelectionRule | None:
    """The selection half of ``policy`` (a Policy or a bare rule), or ``None``."""
    return _rule_of(policy, "selection", SelectionRule)


def sizing_rule_of(policy: Any) -> SizingRule | None:
    """The sizing half of ``policy`` (a Policy or a bare rule), or ``None``."""
    return _rule_of(policy, "sizing", SizingRule)


def probe_scope_of(policy: Any) -> str:
    """``"model"`` when a rule of ``policy`` needs every parameter's per-sample gradients
    (its ``probe_scope`` attribute says so), else ``"head"``."""
    rules = [policy.selection, policy.sizing] if isinstance(policy, Policy) else [policy]
    return "model" if any(getattr(r, "probe_scope", "head") == "model" for r in rules) else "head"
