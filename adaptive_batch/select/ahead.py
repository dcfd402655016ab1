"""FetchedAhead: a look-ahead filter's selections of batches a trainer fetched before their steps.

A trainer that fetches one batch ahead (Lightning's) makes the filter probe and select batch
``k+1`` before step ``k`` runs. The feedback of such a batch is held until its step begins, so a
checkpoint taken between the steps leaves it awaiting feedback: the sampler hands it back, and a
resumed run fetches it again. Probing it again would see the model after step ``k``, not before,
and could select otherwise, so the held selections are saved with the filter and replayed: the
resumed batch keeps exactly the samples the uninterrupted run kept.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch
from torch import Tensor

from ..contract import Feedback

__all__ = ["FetchedAhead"]

KEPT, DROPPED, REASON, STATS, LOSSES = "kept", "dropped", "reason", "stats", "losses"


class FetchedAhead:
    """Feedback held until its step begins, and saved selections awaiting their replay."""

    def __init__(self) -> None:
        self.held: deque[Feedback] = deque()
        self.replays: deque[Feedback] = deque()

    def hold(self, feedback: Feedback) -> None:
        self.held.append(feedback)

    def release(self) -> Feedback | None:
        """The oldest held feedback (its step begins), or ``None``."""
        return self.held.popleft() if self.held else None

    def replay(self, indices: Tensor) -> tuple[Feedback, Tensor] | None:
        """The saved feedback of this candidate batch and the positions of its kept samples in
        it, when it is the next batch to replay; ``None`` otherwise (then it is probed)."""
        if not self.replays:
            return None
        saved = self.replays[0]
        candidates = saved.candidates
        if candidates.numel() != indices.numel() or not torch.equal(
            candidates.sort().values, indices.cpu().sort().values
        ):
            self.replays.clear()  # another batch: the saved ones no longer apply
            return None
        self.replays.popleft()
        position = {index: p for p, index in enumerate(indices.tolist())}
        kept = torch.tensor([position[i] for i in saved.kept.tolist()], dtype=torch.long)
        return saved, kept

    def state_dict(self) -> list[dict[str, Any]]:
        """The held feedback, then the replays not yet used, as plain tensors and numbers."""
        return [
            {
                KEPT: f.kept.cpu(),
                DROPPED: f.dropped.cpu(),
                REASON: str(f.reason),
                STATS: dict(f.stats),
                LOSSES: None if f.losses is None else f.losses.cpu(),
            }
            for f in (*self.held, *self.replays)
        ]

    def load_state_dict(self, state: list[dict[str, Any]]) -> None:
        self.held.clear()
        self.replays = deque(
            Feedback(s[KEPT], s[DROPPED], s[REASON], dict(s[STATS]), losses=s[LOSSES])
            for s in state
        )
