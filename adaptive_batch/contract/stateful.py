"""The one checkpointing protocol every stateful part follows, and helpers for its state dicts."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

from ..errors import AdaptiveBatchError

__all__ = ["Stateful", "Stateless", "check_state_keys", "require_keys"]


@runtime_checkable
class Stateful(Protocol):
    """``state_dict()`` returns what ``load_state_dict()`` needs to continue exactly (the same
    protocol as ``torch.nn.Module``, optimizers and ``torchdata``)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Stateless:
    """Mixin for rules without state."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise AdaptiveBatchError(
                f"{type(self).__name__} has no state; got keys {sorted(state)}"
            )


def require_keys(owner: object, state: Mapping[str, Any], keys: Iterable[str]) -> None:
    """Refuse a state dict that lacks ``keys``, naming the owner and what is missing (a state
    saved by something else fails here, not with a bare ``KeyError`` deep inside)."""
    missing = [k for k in keys if k not in state]
    if missing:
        raise AdaptiveBatchError(
            f"this state_dict was not saved by a {type(owner).__name__}: it lacks "
            f"{', '.join(map(repr, missing))} (it has {sorted(state)})"
        )


def check_state_keys(owner: Stateful, state: Mapping[str, Any]) -> None:
    """Refuse a state dict whose keys are not exactly those ``owner.state_dict()`` writes: the
    state of another rule (even one whose keys are a superset, AdaDamp's for a PadaDamp) fails
    here, naming both, instead of loading in part or with a bare ``KeyError``."""
    expected = set(owner.state_dict())
    if set(state) != expected:
        raise AdaptiveBatchError(
            f"this state_dict was not saved by a {type(owner).__name__}: it has keys "
            f"{sorted(state)}, a {type(owner).__name__} saves {sorted(expected)}. Load each "
            "rule's state into a rule of the same kind (build the policy as it was saved)"
        )
