"""What a sampler checkpoint records about the sampler that wrote it, and how it is checked."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import AdaptiveBatchError
from .passes import SamplerPass

if TYPE_CHECKING:
    from .sampler import AdaptiveBatchSampler

__all__ = ["VERSION", "SamplerCheckpoint", "check_state", "sampler_config"]

VERSION = 3


def sampler_config(sampler: AdaptiveBatchSampler) -> dict[str, Any]:
    """The settings a checkpoint must match to be loaded (and that every rank must share)."""
    return {
        "dataset_size": sampler.dataset_size,
        "num_indices": sampler.order.indices.numel(),
        "indices_digest": sampler.order.digest(),
        "min_batch_size": sampler.min_batch_size,
        "max_batch_size": sampler.max_batch_size,
        "shuffle": sampler.order.shuffle,
        "seed": sampler.order.seed,
        "drop_last": sampler.drop_last,
        "chunk_size": sampler.chunk_size,
        "buckets": repr(sampler.buckets),
        "num_replicas": sampler.num_replicas,
        "sizing": type(sampler.sizing).__name__ if sampler.sizing is not None else None,
        "planning": type(sampler.planning).__name__ if sampler.planning is not None else None,
    }


def check_state(state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """``state`` in today's layout, after checking it was written by a sampler with ``config``."""
    if state.get("version") == 2:
        state = _from_version_2(state)
    if state.get("version") != VERSION:
        raise AdaptiveBatchError(
            f"unsupported AdaptiveBatchSampler state version {state.get('version')!r}"
        )
    saved = {"planning": None, **state["config"]}  # checkpoints before epoch plans had none
    differing = sorted(k for k in config if config[k] != saved.get(k))
    if differing:
        details = ", ".join(f"{k}: saved {saved.get(k)!r}, here {config[k]!r}" for k in differing)
        raise AdaptiveBatchError(
            f"the state_dict comes from a differently configured sampler ({details})"
        )
    return state


def _from_version_2(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint of adaptive_batch 0.1 in today's layout."""
    config = dict(state["config"])
    config["dataset_size"] = config.pop("num_samples", None)
    position = state.get("consumed", state.get("position", 0))
    converted: dict[str, Any] = {
        "version": VERSION,
        "config": config,
        "epoch": state["epoch"],
        "pass": {"epoch": state["epoch"], "position": position},
    }
    if "batch_size" in state:  # it holds the feedback side
        lags = state["ledger"].get("lags", {})
        converted["sizer"] = {
            "batch_size": state["batch_size"],
            "requested_batch_size": state["requested_batch_size"],
            "decisions": state["decisions"],
            "rule": state["sizing"],
            "lags": lags,
        }
        converted["ledger"] = state["ledger"]
        converted["num_dropped_tails"] = state["num_dropped_tails"]
    return converted


class SamplerCheckpoint:
    """Mixin: :class:`~adaptive_batch.AdaptiveBatchSampler`'s ``state_dict`` and its feedback side."""

    VERSION_KEY, CONFIG_KEY, EPOCH_KEY, PASS_KEY = "version", "config", "epoch", "pass"
    SIZER_KEY, LEDGER_KEY, TAILS_KEY, ORDER_KEY = "sizer", "ledger", "num_dropped_tails", "order"
    IN_TRANSIT_KEY = "in_transit"

    def feedback_state_dict(self) -> dict[str, Any]:
        """The feedback side: the sizing rule, the current size and the per-index counts. With
        a ``chunk_size`` the consumer saves it (as of the last batch it consumed)."""
        self.receiver.flush_reporters()
        return {
            self.VERSION_KEY: VERSION,
            self.CONFIG_KEY: sampler_config(self),
            self.SIZER_KEY: self.sizer.state_dict(),
            self.LEDGER_KEY: self._table.state_dict(),
            self.TAILS_KEY: self.num_dropped_tails,
            # DDP: every rank's feedback sent but not applied yet (applied where the run would)
            self.IN_TRANSIT_KEY: self.receiver.in_transit_state(),
        }

    def load_feedback_state_dict(self, state: dict[str, Any]) -> None:
        state = check_state(state, sampler_config(self))
        self.sizer.load_state_dict(state[self.SIZER_KEY])
        self._table.load_state_dict(state[self.LEDGER_KEY])
        self.num_dropped_tails = state[self.TAILS_KEY]
        self.receiver.load_in_transit_state(state.get(self.IN_TRANSIT_KEY, []))

    def state_dict(self) -> dict[str, Any]:
        """The epoch, the position of the pass that handed out the latest batch and, without a
        ``chunk_size``, the feedback side (:meth:`feedback_state_dict`). Whole batches handed
        out but awaiting feedback (fetched ahead of training by a prefetching loader or trainer)
        are handed back: a resumed pass hands them out again, at the same sizes, first."""
        run = self._pending or self.active
        state = {
            self.VERSION_KEY: VERSION,
            self.CONFIG_KEY: sampler_config(self),
            self.EPOCH_KEY: self._epoch,
            self.PASS_KEY: None,
            self.ORDER_KEY: self.order.state_dict(),
        }
        if self.chunk_size is None:
            state.update(self.feedback_state_dict())  # reporters flush first: then count
        if run is not None:
            unsettled = 0
            if self.chunk_size is None and self.expects_feedback and run is self.active:
                # Batches fetched ahead of training (a prefetching loader or trainer) are handed
                # back, to be handed out again at the same sizes after a resume.
                unsettled = self._unsettled(run)
            state[self.PASS_KEY] = run.state_dict(unsettled)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: the next ``iter()`` resumes the saved pass."""
        state = check_state(state, sampler_config(self))
        if self.chunk_size is None:
            self.load_feedback_state_dict(state)
        self._table.clear_in_flight()
        self._chunks.clear()
        self.order.load_state_dict(state.get(self.ORDER_KEY, {}))
        self._epoch, self.active, self._pending = state[self.EPOCH_KEY], None, None
        self._loaded = True
        if (saved := state[self.PASS_KEY]) is not None:
            self._pending = SamplerPass(
                self,
                saved[SamplerPass.EPOCH_KEY],
                saved[SamplerPass.POSITION_KEY],
                saved.get(SamplerPass.REPLAY_KEY, ()),
            )
