"""EDBA, Efficient Dynamic Batch Adaptation (Simionescu & Stoica; seed 003).

Selection: draw random subsets of the candidate batch and keep the one minimising the margin loss

    | (M - M_ema) / (G_S - G_ema) - 1 |

where ``M`` is the mean loss of the candidate batch (the model metric, the same for every subset),
``G_S`` the norm of subset ``S``'s mean last-layer gradient (the gradient metric) and ``M_ema``,
``G_ema`` exponential running averages of both. Sizing: grow or shrink the candidate batch from
margin statistics, starting at 100 within caps 10 and 1000 (those are the sampler's defaults).

The paper leaves open: the number of subsets, their size distribution, the running-average
factor, what to do when the denominator is ~0, and the exact grow/shrink rule. Each is a named
parameter below; ``docs/policies.md`` gives the reasoning.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..contract import (
    Feedback,
    Policy,
    ProbeResult,
    Progress,
    Reason,
    Selection,
    Stateless,
    check_state_keys,
)
from ..errors import AdaptiveBatchError
from .margin import margin_loss
from .subsets import random_subset_masks

__all__ = ["EDBA", "EDBASelection", "EDBASizing"]


def _ema(average: float | None, value: float, decay: float) -> float:
    return value if average is None else decay * average + (1.0 - decay) * value


class EDBASelection:
    """EDBA's subset selection: the random subset with the smallest margin loss.

    Args:
        num_subsets: random subsets scored per batch. Not given in the paper; 64 is the count
            anchors.md measured the Gram path at (23 ms for B=256, D=2048, C=1000 on 2 CPU cores).
        min_kept: smallest subset drawn, in samples (capped at the batch size). Default 10, the
            paper's lower cap on the batch size, so a step never trains on fewer samples than
            EDBA's smallest batch.
        min_kept_fraction: smallest subset drawn, as a fraction of the batch; the larger of the two
            bounds applies. Default 0.1.
        ema_decay: factor of the running averages ``M_ema`` and ``G_ema``. Not given in the paper;
            0.9 (a memory of about ten steps) follows the loss trend without tracking each batch's
            noise.
        include_full_batch: also score the whole candidate batch, so a step never does worse than
            no selection by the margin criterion. Not in the paper; on by default.
        denominator_eps: a subset whose ``|G_S - G_ema|`` is at most
            ``denominator_eps * max(G_ema, 1e-12)`` has an undefined score and is not eligible.
            When no subset is eligible the whole batch is kept (reason ``degenerate``).
        seed: seed of the CPU generator that draws the subsets; the same seed gives the same
            subsets on every device.

    Subset sizes are uniform in ``[max(min_kept, ceil(min_kept_fraction * B)), B]`` and each subset
    is uniform given its size: "random subsets using a uniform distribution" in the paper, with a
    spread of sizes so the argmin can prefer small or large subsets as the paper describes.

    Degenerate batches keep every candidate and say why: a one-sample batch (``single_sample``);
    the first batch, which initialises the running averages (``warmup``); a NaN or inf loss or
    gradient norm (``nonfinite``; running averages left untouched).
    """

    def __init__(
        self,
        *,
        num_subsets: int = 64,
        min_kept: int = 10,
        min_kept_fraction: float = 0.1,
        ema_decay: float = 0.9,
        include_full_batch: bool = True,
        denominator_eps: float = 1e-6,
        seed: int = 0,
    ) -> None:
        if num_subsets < 1:
            raise AdaptiveBatchError(f"num_subsets must be at least 1; got {num_subsets}")
        if min_kept < 1:
            raise AdaptiveBatchError(f"min_kept must be at least 1; got {min_kept}")
        if not 0.0 <= min_kept_fraction <= 1.0:
            raise AdaptiveBatchError(
                f"min_kept_fraction must lie in [0, 1]; got {min_kept_fraction}"
            )
        if not 0.0 <= ema_decay < 1.0:
            raise AdaptiveBatchError(f"ema_decay must lie in [0, 1); got {ema_decay}")
        if denominator_eps < 0:
            raise AdaptiveBatchError(f"denominator_eps must be non-negative; got {denominator_eps}")
        self.num_subsets = num_subsets
        self.min_kept = min_kept
        self.min_kept_fraction = min_kept_fraction
        self.ema_decay = ema_decay
        self.include_full_batch = include_full_batch
        self.denominator_eps = denominator_eps
        self._generator = torch.Generator().manual_seed(seed)
        self.loss_ema: float | None = None
        self.grad_ema: float | None = None

    def min_subset_size(self, batch_size: int) -> int:
        return min(batch_size, max(self.min_kept, math.ceil(self.min_kept_fraction * batch_size)))

    def select(self, result: ProbeResult) -> Selection:
        size = result.batch_size
        if size == 1:
            return Selection.keep_all(1, Reason.SINGLE_SAMPLE)
        subsets = random_subset_masks(
            size, self.num_subsets, self.min_subset_size(size), self._generator
        )
        masks = torch.cat([torch.ones(1, size, dtype=torch.bool), subsets])  # row 0: whole batch
        sq_norms = result.subset_mean_grad_sq_norms(masks.to(result.device, non_blocking=True))
        # One device-to-host transfer per batch: the decision is made on the host in float64.
        host = torch.cat([result.losses.mean().reshape(1), sq_norms]).double().cpu()
        loss, grad_norms = float(host[0]), host[1:].sqrt()
        if not (math.isfinite(loss) and bool(grad_norms.isfinite().all())):
            return Selection.keep_all(size, Reason.NONFINITE, loss=loss)
        full_norm = float(grad_norms[0])
        if self.loss_ema is None or self.grad_ema is None:
            self.loss_ema, self.grad_ema = loss, full_norm
            return Selection.keep_all(size, Reason.WARMUP, loss=loss, grad_norm=full_norm)

        margins = self.margins(loss, grad_norms)
        if not self.include_full_batch:
            margins[0] = math.inf
        best = int(margins.argmin())
        eligible = grad_norms if self.include_full_batch else grad_norms[1:]
        stats = {
            "loss": loss,
            "loss_ema": self.loss_ema,
            "grad_ema": self.grad_ema,
            "target_grad_norm": self.grad_ema + (loss - self.loss_ema),
            "min_grad_norm": float(eligible.min()),
            "max_grad_norm": float(eligible.max()),
            "full_grad_norm": full_norm,
            "full_margin": float(margins[0]),
        }
        if not math.isfinite(float(margins[best])):
            self._update(loss, full_norm)
            return Selection.keep_all(size, Reason.DEGENERATE, **stats)
        chosen_norm = float(grad_norms[best])
        self._update(loss, chosen_norm)
        kept = masks[best].nonzero().flatten()
        return Selection(
            kept,
            size,
            Reason.SELECTED,
            {**stats, "grad_norm": chosen_norm, "margin": float(margins[best])},
        )

    def margins(self, loss: float, grad_norms: torch.Tensor) -> torch.Tensor:
        """Margin loss of each gradient norm against the current running averages (``inf`` where
        the denominator is ~0)."""
        assert self.loss_ema is not None and self.grad_ema is not None
        return margin_loss(loss - self.loss_ema, grad_norms, self.grad_ema, self.denominator_eps)

    def _update(self, loss: float, grad_norm: float) -> None:
        self.loss_ema = _ema(self.loss_ema, loss, self.ema_decay)
        self.grad_ema = _ema(self.grad_ema, grad_norm, self.ema_decay)

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self._generator.get_state(),
            "loss_ema": self.loss_ema,
            "grad_ema": self.grad_ema,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_keys(self, state)
        self._generator.set_state(state["generator"])
        self.loss_ema = state["loss_ema"]
        self.grad_ema = state["grad_ema"]


class EDBASizing(Stateless):
    """EDBA's batch sizing from margin statistics (the paper gives no formula; this is ours).

    The margin loss is zero where a subset's gradient norm equals the *target*
    ``G* = G_ema + (M - M_ema)``. Where the target lies relative to the gradient norms the
    candidate subsets offer says whether the batch size is the bottleneck:

    * ``G*`` below every subset's norm: even the best-averaged subset is too noisy -- more
      candidates are needed, next size ``ceil(size * factor)``;
    * ``G*`` above every subset's norm: even the smallest subsets average too much -- next size
      ``floor(size / factor)``;
    * otherwise some subset can match the loss trend: size unchanged.

    Batches whose selection was not ``selected`` (warmup, degenerate, non-finite) leave the size
    unchanged. The sampler clamps the result to its caps. The rule reads the statistics
    ``target_grad_norm``, ``min_grad_norm`` and ``max_grad_norm`` that
    :class:`EDBASelection` reports.
    """

    feedback_source = "look_ahead"  # the margin statistics come from EDBASelection's probe

    def __init__(self, *, factor: float = 1.1) -> None:
        if not factor > 1.0:
            raise AdaptiveBatchError(f"factor must exceed 1; got {factor}")
        self.factor = factor

    def next_batch_size(self, batch_size: int, feedback: Feedback, progress: Progress) -> int:
        stats = feedback.stats
        if feedback.reason != Reason.SELECTED or "target_grad_norm" not in stats:
            return batch_size
        target = stats["target_grad_norm"]
        if target < stats["min_grad_norm"]:
            return math.ceil(batch_size * self.factor)
        if target > stats["max_grad_norm"]:
            return max(1, math.floor(batch_size / self.factor))
        return batch_size


class EDBA(Policy):
    """EDBA selection and sizing together; see :class:`EDBASelection` and :class:`EDBASizing`.

    Keyword arguments go to the half that takes them.

    Example:
        >>> policy = EDBA(num_subsets=32, seed=1)
        >>> type(policy.selection).__name__, type(policy.sizing).__name__
        ('EDBASelection', 'EDBASizing')
    """

    def __init__(
        self,
        *,
        num_subsets: int = 64,
        min_kept: int = 10,
        min_kept_fraction: float = 0.1,
        ema_decay: float = 0.9,
        include_full_batch: bool = True,
        denominator_eps: float = 1e-6,
        factor: float = 1.1,
        seed: int = 0,
    ) -> None:
        super().__init__(
            selection=EDBASelection(
                num_subsets=num_subsets,
                min_kept=min_kept,
                min_kept_fraction=min_kept_fraction,
                ema_decay=ema_decay,
                include_full_batch=include_full_batch,
                denominator_eps=denominator_eps,
                seed=seed,
            ),
            sizing=EDBASizing(factor=factor),
        )
