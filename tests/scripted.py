"""Rules and probes whose answers are known in advance, for tests of the plumbing around them."""

from __future__ import annotations

from typing import Any

import torch

from adaptive_batch import Feedback, ProbeResult


class ScriptedSizes:
    """A sizing rule that answers from a list, in a cycle (its position is its state)."""

    def __init__(self, sizes: list[Any]) -> None:
        self.sizes = sizes
        self.calls = 0

    def next_batch_size(self, batch_size: int, feedback: Feedback, progress: Any) -> Any:
        size = self.sizes[self.calls % len(self.sizes)]
        self.calls += 1
        return size

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = state["calls"]


def zero_probe(inputs: Any, targets: torch.Tensor) -> ProbeResult:
    """A probe that measures nothing (every statistic 0): for tests of data movement only."""
    size = targets.shape[0]
    return ProbeResult(losses=torch.zeros(size), gram=torch.zeros(size, size))


def keep_all(batch: list[int]) -> Feedback:
    return Feedback(kept=torch.tensor(batch), dropped=torch.tensor([], dtype=torch.long))
