"""The run's length, for the epoch plans that anneal toward its end (InfoBatch, stale
Selective-Backprop): said once when it is missing or the run goes past it, since either way the
plan's schedule no longer matches the run and nothing else would tell."""

from __future__ import annotations

import warnings

from ..errors import AdaptiveBatchError, AdaptiveBatchWarning

__all__ = ["RunLength"]


class RunLength:
    """Mixin: ``num_epochs`` checked, and :meth:`check_epoch` -- which the sampler calls when an
    epoch starts handing out batches after the first feedback (a ``len()`` that only looks at a
    plan does not count) -- warns once per rule when the run's length is unknown or the epoch lies
    past it."""

    num_epochs: int | None
    #: what the plan does at the end of the run, for the messages
    ANNEALS = "trains on everything for the last epochs"

    @property
    def anneals(self) -> bool:
        """Whether the plan's schedule changes toward the run's end (it needs its length)."""
        return True

    def _set_num_epochs(self, num_epochs: int | None) -> None:
        if num_epochs is not None and num_epochs < 1:
            raise AdaptiveBatchError(f"num_epochs must be positive; got {num_epochs}")
        self.num_epochs = num_epochs
        self._said: set[str] = set()

    def check_epoch(self, epoch: int) -> None:
        name = type(self).__name__
        if not self.anneals:
            return
        said = self._said
        if self.num_epochs is None and "unset" not in said:
            said.add("unset")
            warnings.warn(
                f"{name}(num_epochs=None) never anneals: the plan {self.ANNEALS} only when it "
                "knows the run's length. Give num_epochs=<the epochs you train> (the integrations "
                "set it from the trainer's max_epochs).",
                AdaptiveBatchWarning,
                stacklevel=2,
            )
        elif self.num_epochs is not None and epoch >= self.num_epochs and "past" not in said:
            said.add("past")
            warnings.warn(
                f"epoch {epoch} lies past {name}'s num_epochs={self.num_epochs}: the plan's "
                f"schedule ended (it {self.ANNEALS}), so every epoch from here trains on "
                "everything. If the run is longer (a candidate budget counted in samples, say), "
                "give num_epochs=<its length in epochs>.",
                AdaptiveBatchWarning,
                stacklevel=2,
            )
