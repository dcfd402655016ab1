"""What a sampler checkpoint records about the sampler that wrote it, and how it is checked."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import AdaptiveBatchError

if TYPE_CHECKING:
    from .sampler import AdaptiveBatchSampler

__all__ = ["VERSION", "check_state", "sampler_config"]

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
