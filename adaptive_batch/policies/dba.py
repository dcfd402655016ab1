"""DBA, Dynamic Batch Adaptation (Simionescu, Stoica & Herscovici; seed 000).

For every layer separately, DBA picks the subset of the batch whose mean per-sample gradient
minimises the margin loss ``| (M - M_ema) / (G_l(S) - G_l_ema) - 1 |`` (as in EDBA, but with the
gradient metric ``G_l`` of layer ``l`` and a running average per layer), growing or shrinking the
subset one sample at a time. Each layer then steps along its own subset's mean gradient, which no
filtering of the batch can express: :class:`~adaptive_batch.PerLayerBackward` computes these
gradients and writes them into ``.grad`` in place of ``loss.backward()``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..contract import Feedback, LayerSelection, Policy, Progress, Reason, check_state_keys
from ..errors import AdaptiveBatchError, renamed_arguments
from .margin import margin_loss

__all__ = ["DBA", "DBASelection", "DBASizing", "LayerSelection", "greedy_margin_subset"]


def _margin(
    loss_delta: float, sq_norm: Tensor, count: Tensor, grad_ema: float, eps: float
) -> Tensor:
    """The margin of subsets given ``s^T K s`` and their sizes (``inf`` for empty ones)."""
    margins = margin_loss(loss_delta, sq_norm.clamp_min(0).sqrt() / count, grad_ema, eps)
    return torch.where(count > 0, margins, torch.full_like(margins, math.inf))


@renamed_arguments(min_size="min_kept")
def greedy_margin_subset(
    gram: Tensor, loss_delta: float, grad_ema: float, *, min_kept: int = 1, eps: float = 1e-6
) -> tuple[Tensor, float]:
    """The subset DBA reaches from the whole batch by removing, then adding back, one sample at a
    time while the margin loss falls.

    Each step takes the single removal (then addition) that lowers the margin most, computed for
    all candidates at once from the Gram matrix: removing ``j`` changes ``s^T K s`` by
    ``K[j, j] - 2 (K s)_j``.

    Args:
        gram: ``[B, B]`` Gram matrix of the layer's per-sample gradients.
        loss_delta: ``M - M_ema``.
        grad_ema: ``G_ema`` of the layer.
        min_kept: the subset never shrinks below this.

    Returns:
        A ``[B]`` boolean mask and its margin (``inf`` when no subset has a defined margin; the
        mask is then the whole batch).
    """
    f64 = torch.float64
    k = gram.to(f64).cpu()
    size = k.shape[0]
    mask = torch.ones(size, dtype=torch.bool)
    ks = k.sum(dim=1)  # K s for the current subset s
    quad = float(ks.sum())  # s^T K s
    count = size
    diag = k.diagonal()
    current = float(
        _margin(
            loss_delta,
            torch.tensor([quad], dtype=f64),
            torch.tensor([count], dtype=f64),
            grad_ema,
            eps,
        )[0]
    )
    for removing in (True, False):
        while (count > min_kept) if removing else (count < size):
            sign = -1.0 if removing else 1.0
            quads = quad + sign * 2 * ks + diag
            margins = _margin(
                loss_delta, quads, torch.full((size,), count + sign, dtype=f64), grad_ema, eps
            )
            margins[mask if not removing else ~mask] = (
                math.inf
            )  # only members can leave, only others join
            best = int(margins.argmin())
            if not float(margins[best]) < current:
                break
            mask[best] = not removing
            ks = ks + sign * k[:, best]
            quad, count, current = float(quads[best]), count + int(sign), float(margins[best])
    return mask, current


class DBASelection:
    """Per-layer margin-loss subsets (see :func:`greedy_margin_subset`).

    Args:
        min_kept: smallest subset per layer, in samples (capped at the batch size). Default 1:
            the paper grows and shrinks sample by sample with no stated floor.
        ema_decay: factor of the running averages ``M_ema`` and each layer's ``G_ema`` (0.9,
            as for EDBA; not given in the paper).
        denominator_eps: as in EDBA: a margin whose denominator is at most
            ``denominator_eps * G_ema`` is undefined.

    The first batch initialises the running averages and every layer uses the whole batch
    (``warmup``); a NaN or inf loss or gradient keeps the whole batch for every layer
    (``nonfinite``) and leaves the averages alone.
    """

    def __init__(
        self, *, min_kept: int = 1, ema_decay: float = 0.9, denominator_eps: float = 1e-6
    ) -> None:
        if min_kept < 1:
            raise AdaptiveBatchError(f"min_kept must be at least 1; got {min_kept}")
        if not 0.0 <= ema_decay < 1.0:
            raise AdaptiveBatchError(f"ema_decay must lie in [0, 1); got {ema_decay}")
        self.min_kept = min_kept
        self.ema_decay = ema_decay
        self.denominator_eps = denominator_eps
        self.loss_ema: float | None = None
        self.grad_emas: dict[str, float] = {}

    def select_layers(self, losses: Tensor, grams: dict[str, Tensor]) -> LayerSelection:
        size = losses.shape[0]
        everything = {layer: torch.ones(size, dtype=torch.bool) for layer in grams}
        loss = float(losses.double().mean())
        finite = math.isfinite(loss) and all(bool(g.isfinite().all()) for g in grams.values())
        if not finite:
            return LayerSelection(everything, Reason.NONFINITE, {"loss": loss})
        full_norms = {
            layer: math.sqrt(max(float(g.double().sum()), 0.0)) / size for layer, g in grams.items()
        }
        if self.loss_ema is None:
            self.loss_ema, self.grad_emas = loss, dict(full_norms)
            return LayerSelection(everything, Reason.WARMUP, {"loss": loss})
        if size == 1:
            return LayerSelection(everything, Reason.SINGLE_SAMPLE, {"loss": loss})
        masks, margins = {}, []
        for layer, gram in grams.items():
            grad_ema = self.grad_emas.setdefault(layer, full_norms[layer])
            mask, margin = greedy_margin_subset(
                gram,
                loss - self.loss_ema,
                grad_ema,
                min_kept=min(self.min_kept, size),
                eps=self.denominator_eps,
            )
            masks[layer] = mask
            margins.append(margin)
            chosen = mask.double()
            norm = math.sqrt(max(float(chosen @ gram.double().cpu() @ chosen), 0.0)) / float(
                chosen.sum()
            )
            self.grad_emas[layer] = self.ema_decay * grad_ema + (1 - self.ema_decay) * norm
        self.loss_ema = self.ema_decay * self.loss_ema + (1 - self.ema_decay) * loss
        finite_margins = [m for m in margins if math.isfinite(m)]
        if not finite_margins:
            return LayerSelection(everything, Reason.DEGENERATE, {"loss": loss})
        selection = LayerSelection(masks, Reason.SELECTED, {"loss": loss})
        selection.stats["margin"] = sum(finite_margins) / len(finite_margins)
        selection.stats["kept_fraction"] = selection.kept_fraction
        return selection

    def state_dict(self) -> dict[str, Any]:
        return {"loss_ema": self.loss_ema, "grad_emas": dict(self.grad_emas)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_keys(self, state)
        self.loss_ema = state["loss_ema"]
        self.grad_emas = dict(state["grad_emas"])


class DBASizing:
    """The next batch size follows how many gradients the layers chose recently.

    ``next = ceil(kept_avg / target_fraction)`` where ``kept_avg`` is a running average (factor
    ``ema_decay``, formerly ``decay``) of the mean number of samples the layers kept. In
    equilibrium the layers keep ``target_fraction`` of each batch: when they keep more the batch
    grows, when fewer it shrinks. The paper states only that the batch size follows the number of
    gradients chosen; the form and both defaults (``target_fraction`` 0.75, ``ema_decay`` 0.9)
    are ours.
    """

    feedback_source = "per_layer"  # kept_fraction comes from PerLayerBackward

    @renamed_arguments(decay="ema_decay")
    def __init__(self, *, target_fraction: float = 0.75, ema_decay: float = 0.9) -> None:
        if not 0.0 < target_fraction <= 1.0:
            raise AdaptiveBatchError(f"target_fraction must lie in (0, 1]; got {target_fraction}")
        if not 0.0 <= ema_decay < 1.0:
            raise AdaptiveBatchError(f"ema_decay must lie in [0, 1); got {ema_decay}")
        self.target_fraction = target_fraction
        self.ema_decay = ema_decay
        self.kept_avg: float | None = None

    def next_batch_size(self, batch_size: int, feedback: Feedback, progress: Progress) -> float:
        fraction = feedback.stats.get("kept_fraction")
        if feedback.reason != Reason.SELECTED or fraction is None or not math.isfinite(fraction):
            return batch_size
        kept = fraction * feedback.batch_size
        self.kept_avg = (
            kept
            if self.kept_avg is None
            else self.ema_decay * self.kept_avg + (1 - self.ema_decay) * kept
        )
        return math.ceil(self.kept_avg / self.target_fraction)

    def state_dict(self) -> dict[str, Any]:
        return {"kept_avg": self.kept_avg}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_keys(self, state)
        self.kept_avg = state["kept_avg"]


class DBA(Policy):
    """DBA's per-layer selection (:attr:`per_layer`) and sizing (:attr:`sizing`).

    The per-layer selection is applied by :class:`~adaptive_batch.PerLayerBackward`, not by a
    SubsetFilter (which refuses this policy): per-layer subsets cannot be expressed by filtering.
    """

    def __init__(
        self,
        *,
        min_kept: int = 1,
        ema_decay: float = 0.9,
        denominator_eps: float = 1e-6,
        target_fraction: float = 0.75,
    ) -> None:
        super().__init__(
            sizing=DBASizing(target_fraction=target_fraction, ema_decay=ema_decay),
            per_layer=DBASelection(
                min_kept=min_kept, ema_decay=ema_decay, denominator_eps=denominator_eps
            ),
        )
